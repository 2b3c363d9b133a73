"""Inside the model: one attention function in transformers' registry, and what rides on it.

`attention` is registered under the name ATTENTION in `AttentionInterface`, and the same name in
`AttentionMaskInterface` (with transformers' own SDPA mask builder: a boolean mask, or none for an
unpadded causal batch). Any model family whose attention modules call
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)` then runs it: Llama once
per layer, DiffLlama twice per layer (the same Q, K and mask, the two halves of V). It computes
eager attention in blocks of query rows, so no L x L matrix ever exists for a long sequence, and
applies causality itself where no mask arrives (SDPA's `is_causal` path, upper-left aligned as SDPA
aligns it). Nothing of the model's code is copied or patched.

On that function ride, per model (`attach`):
- logit quantization (`Quantization`): symmetric absmax round-to-nearest quantization of the
  pre-softmax logits QK^T x scale, masked positions excluded from the absmax. The scale is taken
  per query token: over all heads of that token's logit row (`tensor`) or per head (`head`). A
  token's logits depend only on its prefix, so caching, batching and blocking cannot change them.
- while a probe is active (`probing`): `ActivationProbe` (statistics of the logits at causal
  positions, and of each decoder layer's output through forward hooks) and `AllocationProbe`
  (where the last token's attention goes: the positive and negative mass of its map, for DIFF
  the differential map normalised by 1 - lambda). Probes reduce to statistics inside the
  backend.

DiffLlama pairs Q/K head h with head h + H/2 (the first call's probabilities of heads [0, H/2)
are softmax1, of [H/2, H) softmax2; see `DiffLlamaAttention.forward`): logit maps "1" and "2"
are those head halves, "both" all heads. Its second call per layer is recognised by its Q and K
being the very tensors of the first, and counted once.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffbench.api import ACTIVATION_TYPES, HIST_BINS_PER_OCTAVE, ZERO_BIN, ActivationSummary
from diffbench.errors import DiffbenchError
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "diffbench"
ACTIVATIONS = ACTIVATION_TYPES
LOGIT_QUANT = ("tensor", "head")
# Logits computed at once: B x H x rows x keys elements. 2^20 (4 MiB in float32) keeps a block's
# temporaries small next to a forward's own activations while a row of 16K keys x 8 heads still
# gives blocks of 8 rows, so per-block overhead stays small.
BLOCK_ELEMENTS = 1 << 20
# A DIFF layer whose lambda is this close to 1, or above it, is not normalised by 1 - lambda.
LAMBDA_GUARD = 1e-6
# |x| histogram bins that can occur for a finite float32 (2^-149 .. 2^128), offset to >= 0.
_BIN_LO = -150 * HIST_BINS_PER_OCTAVE
_N_BINS = 280 * HIST_BINS_PER_OCTAVE


@dataclass(frozen=True)
class Quantization:
    """Absmax quantization of attention logits to `bits` (2..15), scale per token or per head."""

    bits: int
    mode: str = "tensor"

    def apply(self, logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """`logits` (B, H, rows, keys) rounded to the grid of their row's (or row-head's) absmax
        over the `allowed` keys."""
        levels = 2 ** (self.bits - 1) - 1
        visible = logits.abs() if allowed is None else logits.abs().masked_fill(~allowed, 0)
        dims = (1, 3) if self.mode == "tensor" else (3,)
        scale = visible.amax(dim=dims, keepdim=True) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.round(logits / scale).clamp_(-levels, levels) * scale


def check_quantization(label: str, bits: int, mode: str) -> None:
    """Refuse logit_bits / logit_quant values that quantize nothing meaningful."""
    if not 2 <= bits <= 16:
        raise DiffbenchError(
            f"{label}:logit_bits must be an integer from 2 to 16 (16 = no quantization), got {bits}"
        )
    if mode not in LOGIT_QUANT:
        raise DiffbenchError(f"{label}:logit_quant must be tensor or head, got {mode!r}")


# ---- mergeable statistics ------------------------------------------------------------------


class Accumulator:
    """Streaming statistics of a stream of values: count, float64 moment sums of x, the top-k
    of |x| (exact: each block's top-k merged with the running one) and the |x| histogram on the
    api's log grid."""

    def __init__(self, top_k: int, device: torch.device) -> None:
        self.top_k = top_k
        self.count = 0
        self.moments = torch.zeros(4, dtype=torch.float64, device=device)
        self.top = torch.empty(0, device=device)
        self.hist = torch.zeros(_N_BINS, dtype=torch.int64, device=device)
        self.zeros = 0

    def add(self, x: torch.Tensor, padded: int = 0) -> None:
        """Take in the values of `x` (any shape), of which `padded` are zeros standing in for
        positions that are not values (masked out): they count nowhere."""
        x = x.reshape(-1)
        if x.numel() == padded:
            return
        self.count += x.numel() - padded
        # Powers summed per block in the activations' float32 (torch sums pairwise, so a block's
        # sum keeps float32's relative precision), blocks added in float64.
        sq = x * x
        sums = (x.sum(), sq.sum())
        cube = (sq * x).sum()
        sq.mul_(sq)
        self.moments += torch.stack((*sums, cube, sq.sum())).double()
        del sq
        a = x.abs().float()
        # Only values above the running k-th largest can enter the top: a cheap filter first.
        pool = a[a > self.top[-1]] if len(self.top) == self.top_k else a
        k = min(self.top_k, pool.numel())
        cand = torch.topk(pool, k, sorted=False).values if pool.numel() > k else pool
        merged = torch.cat((self.top, cand))
        # Stand-in zeros can reach the top only where fewer than top_k values exist.
        self.top = torch.topk(merged, min(self.top_k, merged.numel())).values[: self.count]
        zeros = int((a == 0).sum())
        self.zeros += zeros - padded
        # log2(0) = -inf: clamped into bin 0 and taken out again below.
        bins = a.log2_().mul_(HIST_BINS_PER_OCTAVE).floor_().clamp_(_BIN_LO, _BIN_LO + _N_BINS - 1)
        self.hist += torch.bincount(bins.long().sub_(_BIN_LO), minlength=_N_BINS)
        self.hist[0] -= zeros

    def merged(self, other: Accumulator) -> Accumulator:
        """A new accumulator holding the values of both."""
        out = Accumulator(self.top_k, self.hist.device)
        out.count = self.count + other.count
        out.moments = self.moments + other.moments
        both = torch.cat((self.top, other.top))
        out.top = torch.topk(both, min(self.top_k, both.numel())).values
        out.hist = self.hist + other.hist
        out.zeros = self.zeros + other.zeros
        return out

    def summary(self, activation: str, layer: int, map: str) -> ActivationSummary:
        """The api's plain-Python record of these statistics."""
        nz = torch.nonzero(self.hist).reshape(-1)
        hist = [(int(b) + _BIN_LO, int(self.hist[b])) for b in nz.tolist()]
        if self.zeros:
            hist.insert(0, (ZERO_BIN, self.zeros))
        m = self.moments.tolist()
        return ActivationSummary(
            activation=activation,
            layer=layer,
            map=map,
            count=self.count,
            moments=(m[0], m[1], m[2], m[3]),
            top=tuple(float(v) for v in self.top.tolist()),
            histogram=tuple(hist),
        )


# ---- probes --------------------------------------------------------------------------------


class Probe:
    """What the attention function reports to while a probe is active (no-ops by default)."""

    def __init__(self) -> None:
        self.layers_seen: set[int] = set()
        self._last: tuple[int, Any, Any] | None = None

    def first_call(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> bool:
        """False for a DiffLlama layer's second call (the same Q and K tensors as its first)."""
        layer = int(getattr(module, "layer_idx", -1))
        self.layers_seen.add(layer)
        last = self._last
        if last and last[0] == layer and last[1]() is query and last[2]() is key:
            return False
        self._last = (layer, weakref.ref(query), weakref.ref(key))
        return True

    def logits(
        self, module: torch.nn.Module, logits: torch.Tensor, allowed: torch.Tensor, rows: slice
    ) -> None:
        """A block of pre-softmax logits (B, H, r, keys), `allowed` broadcastable to it."""

    def probs(self, module: torch.nn.Module, probs: torch.Tensor, rows: slice, n_rows: int) -> None:
        """A block of attention probabilities (B, H, r, keys) of query rows `rows` of `n_rows`."""

    def wants_probs(self, rows: slice, n_rows: int) -> bool:
        return False


def is_diff(module: torch.nn.Module) -> bool:
    """Whether an attention module is differential (DiffLlama: lambda parameters, lambda_init)."""
    return hasattr(module, "lambda_init") and hasattr(module, "lambda_q1")


def diff_lambda(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's lambda from its own parameters and `lambda_init`, as DiffLlamaAttention.forward
    combines them (exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, sums in float32)."""
    p: Any = module
    lambda_1 = torch.exp(torch.sum(p.lambda_q1 * p.lambda_k1, dim=-1, dtype=torch.float32))
    lambda_2 = torch.exp(torch.sum(p.lambda_q2 * p.lambda_k2, dim=-1, dtype=torch.float32))
    return lambda_1.to(dtype) - lambda_2.to(dtype) + p.lambda_init


class ActivationProbe(Probe):
    """Statistics of the logits (per layer; per DIFF map) and of each decoder layer's output,
    for each sequence of a batch over its real tokens (`valid`: B x L, False at padding)."""

    def __init__(self, activations: Sequence[str], top_k: int, valid: torch.Tensor) -> None:
        super().__init__()
        self.activations = tuple(activations)
        self.top_k = top_k
        self.valid = valid
        # (row, layer, map) -> statistics; hidden states under map "".
        self.logit_stats: dict[tuple[int, int, str], Accumulator] = {}
        self.hidden_stats: dict[tuple[int, int], Accumulator] = {}

    def _acc(self, table: dict[Any, Accumulator], key: Any) -> Accumulator:
        if key not in table:
            table[key] = Accumulator(self.top_k, self.valid.device)
        return table[key]

    def logits(
        self, module: torch.nn.Module, logits: torch.Tensor, allowed: torch.Tensor, rows: slice
    ) -> None:
        if "attention_logits" not in self.activations:
            return
        b, h, r, k = logits.shape
        # Padding rows attend somewhere too; only real query tokens count.
        real = self.valid[:, rows].reshape(b, 1, r, 1)
        keep = (allowed & real).expand(b, 1, r, k)
        layer = int(getattr(module, "layer_idx", -1))
        if is_diff(module):
            halves = {"1": slice(0, h // 2), "2": slice(h // 2, h)}
        else:
            halves = {"": slice(0, h)}
        # Masked positions become zeros that the accumulator is told to discount: cheaper than
        # gathering the causal positions of every block.
        for row in range(b):
            masked = int(r * k - keep[row].sum())
            for name, heads in halves.items():
                part = logits[row, heads]
                n_heads = part.shape[0]
                values = part.masked_fill(~keep[row], 0) if masked else part
                self._acc(self.logit_stats, (row, layer, name)).add(values, masked * n_heads)

    def hidden(self, layer: int, output: torch.Tensor) -> None:
        """A decoder layer's output (B, L, D) over each sequence's real tokens."""
        for row in range(output.shape[0]):
            real = output[row][self.valid[row, : output.shape[1]]]
            self._acc(self.hidden_stats, (row, layer)).add(real)

    def summaries(self, row: int) -> list[ActivationSummary]:
        """Sequence `row`'s statistics per layer and map; a DIFF layer's maps "1" and "2" also
        merged as map "both"."""
        out = []
        logits = {(layer, m): acc for (i, layer, m), acc in self.logit_stats.items() if i == row}
        for layer in sorted({layer for layer, _ in logits}):
            if (layer, "") in logits:
                out.append(logits[layer, ""].summary("attention_logits", layer, ""))
                continue
            one, two = logits[layer, "1"], logits[layer, "2"]
            out.append(one.merged(two).summary("attention_logits", layer, "both"))
            out.append(one.summary("attention_logits", layer, "1"))
            out.append(two.summary("attention_logits", layer, "2"))
        hidden = {layer: acc for (i, layer), acc in self.hidden_stats.items() if i == row}
        for layer in sorted(hidden):
            out.append(hidden[layer].summary("hidden_states", layer, ""))
        return out


class AllocationProbe(Probe):
    """Where the last query token's attention goes: per layer, per span (`spans`: n_spans x
    keys, True where a key token overlaps the span), the positive mass sum(max(map, 0)) and the
    negative mass sum(max(-map, 0)) over the span's tokens, averaged over heads.

    A Transformer's map is its softmax (negative mass 0). A DIFF layer's map for head pair i is
    the differential map (softmax1_i - lambda softmax2_i) / (1 - lambda): it then sums to 1 over
    the keys, as a softmax does, and positive minus negative mass over every key is 1. Where
    lambda >= 1 (within LAMBDA_GUARD) dividing would flip or blow up the map: the layer keeps
    softmax1_i - lambda softmax2_i, and a line in `warnings` says so."""

    def __init__(self, spans: torch.Tensor) -> None:
        super().__init__()
        self.spans = spans
        self.masses: dict[int, list[float]] = {}
        self.negative: dict[int, list[float]] = {}
        self.warnings: list[str] = []

    def wants_probs(self, rows: slice, n_rows: int) -> bool:
        return rows.stop == n_rows

    def probs(self, module: torch.nn.Module, probs: torch.Tensor, rows: slice, n_rows: int) -> None:
        last = probs[0, :, -1, :].float()  # (H, keys): batch of one, the prompt's last token
        layer = int(getattr(module, "layer_idx", -1))
        if is_diff(module):
            h = last.shape[0]
            lam = float(diff_lambda(module, torch.float32))
            last = last[: h // 2] - lam * last[h // 2 :]
            if lam < 1 - LAMBDA_GUARD:
                last = last / (1 - lam)
            else:
                self.warnings.append(
                    f"layer {layer}: lambda = {lam:.6g} >= 1, so its differential map is not "
                    "divided by 1 - lambda (it does not sum to 1)"
                )
        # Clamped per head before the mean: a head's negative entries must not cancel another
        # head's positive ones.
        positive = last.clamp(min=0).mean(dim=0)
        negative = last.neg().clamp_(min=0).mean(dim=0)
        spans = self.spans.float()
        self.masses[layer] = (spans @ positive).tolist()
        self.negative[layer] = (spans @ negative).tolist()


# ---- the attention function ----------------------------------------------------------------


class _State:
    """What rides on one model's attention calls: its quantization and the active probe."""

    def __init__(self, quantization: Quantization | None) -> None:
        self.quantization = quantization
        self.probe: Probe | None = None


_STATES: dict[int, _State] = {}


def _state(module: torch.nn.Module) -> _State | None:
    config = getattr(module, "config", None)
    return _STATES.get(id(config)) if config is not None else None


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Eager attention in blocks of query rows, with the model's quantization and probe.

    Shapes as transformers passes them: query (B, H, Q, d), key and value (B, Hkv, K, d[v]),
    mask (B|1, 1, Q, K) boolean (True: attend) or additive float, or None; returns (B, Q, H, dv).
    """
    state = _state(module)
    quant = state.quantization if state else None
    probe = state.probe if state else None
    if probe is not None and not probe.first_call(module, query, key):
        probe = None  # a DIFF layer's second call: its logits were counted by the first
    b, h, n_q, _ = query.shape
    hkv, n_k, dv = key.shape[1], key.shape[2], value.shape[3]
    rep = h // hkv
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = query.new_empty(b, n_q, h, dv)
    step = max(1, BLOCK_ELEMENTS // (b * h * n_k))
    for q0 in range(0, n_q, step):
        rows = slice(q0, min(n_q, q0 + step))
        r = rows.stop - rows.start
        additive = None
        keys_end = n_k
        if attention_mask is None:
            if causal and n_q > 1:  # SDPA's is_causal: upper-left aligned
                keys_end = min(n_k, rows.stop)
                pos = torch.arange(rows.start, rows.stop, device=query.device)
                allowed = (torch.arange(keys_end, device=query.device) <= pos[:, None])[None, None]
            else:
                allowed = torch.ones(1, 1, r, n_k, dtype=torch.bool, device=query.device)
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask[:, :, rows, :n_k]
        else:
            additive = attention_mask[:, :, rows, :n_k]
            allowed = additive > torch.finfo(additive.dtype).min / 2
        # Grouped query attention without copying K: the rep query heads of a KV head in one
        # matmul, (B, Hkv, rep * r, d) @ (B, Hkv, d, K).
        q = query[:, :, rows].reshape(b, hkv, rep * r, -1)
        k = key[:, :, :keys_end]
        logits = (torch.matmul(q, k.transpose(2, 3)) * scale).view(b, h, r, keys_end)
        if probe is not None:
            probe.logits(module, logits, allowed, rows)
        if quant is not None:
            logits = quant.apply(logits, allowed)
        if additive is not None:
            logits = logits + additive
        else:
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        del logits
        if probe is not None and probe.wants_probs(rows, n_q):
            probe.probs(module, probs, rows, n_q)
        v = value[:, :, :keys_end]
        block = torch.matmul(probs.view(b, hkv, rep * r, keys_end), v).view(b, h, r, dv)
        out[:, rows] = block.transpose(1, 2)
    return out, None


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


# ---- per model -----------------------------------------------------------------------------


def attach(model: PreTrainedModel, quantization: Quantization | None) -> None:
    """Give `model`'s attention calls through ATTENTION this quantization (None: none)."""
    config = model.config
    _STATES[id(config)] = _State(quantization)
    weakref.finalize(config, _STATES.pop, id(config), None)


def decoder_layers(model: PreTrainedModel) -> Sequence[torch.nn.Module]:
    """The model's decoder layers (the modules whose outputs are the hidden states)."""
    layers = getattr(model.get_decoder(), "layers", None)
    n = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or (n is not None and len(layers) != n):
        raise DiffbenchError(
            f"{type(model).__name__} has no list of decoder layers diffbench can hook"
        )
    return list(layers)


def _not_routed(model: PreTrainedModel) -> DiffbenchError:
    return DiffbenchError(
        f"{type(model).__name__} does not route its attention through transformers' attention "
        "registry, so attention probes and logit_bits cannot see its attention; use a model "
        "family that does (Llama, DiffLlama, ...)"
    )


def _declares_registry(model: PreTrainedModel) -> bool:
    """Whether transformers says the model's attention modules call the registry."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    return bool(getattr(model, "_supports_attention_backend", False)) and not (
        can_set is not None and not can_set()
    )


def use_attention(model: PreTrainedModel) -> str:
    """Switch `model` to ATTENTION; return the implementation it had. Refuses a model family
    whose attention modules do not call the registry."""
    old = str(model.config._attn_implementation)
    if old == ATTENTION:
        return old
    if not _declares_registry(model):
        raise _not_routed(model)
    model.set_attn_implementation(ATTENTION)
    return old


def check_routed(model: PreTrainedModel) -> None:
    """Run two tokens through `model` and refuse it unless every decoder layer's attention
    called ATTENTION (a family may declare registry support and still bypass it)."""
    if not _declares_registry(model):
        raise _not_routed(model)
    n = len(decoder_layers(model))
    probe = Probe()
    device = next(model.parameters()).device
    with probing(model, probe), torch.inference_mode():
        model(torch.zeros(1, 2, dtype=torch.long, device=device))
    if len(probe.layers_seen) < n:
        raise _not_routed(model)


@contextlib.contextmanager
def probing(model: PreTrainedModel, probe: Probe) -> Iterator[Probe]:
    """Run `probe` on `model`'s forwards inside the block: the model runs ATTENTION meanwhile
    (switched back after, when it ran another implementation), and an ActivationProbe asking for
    hidden states gets forward hooks on the decoder layers."""
    old = use_attention(model)
    config = model.config
    created = id(config) not in _STATES
    if created:
        attach(model, None)
    state = _STATES[id(config)]
    state.probe = probe
    hooks = []
    if isinstance(probe, ActivationProbe) and "hidden_states" in probe.activations:
        for i, layer in enumerate(decoder_layers(model)):

            def hook(_m: Any, _a: Any, output: Any, i: int = i) -> None:
                probe.hidden(i, output[0] if isinstance(output, tuple) else output)

            hooks.append(layer.register_forward_hook(hook))
    try:
        yield probe
    finally:
        for handle in hooks:
            handle.remove()
        state.probe = None
        if created:
            _STATES.pop(id(config), None)
        if old != ATTENTION:
            model.set_attn_implementation(old)


def token_span_mask(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """(n_spans, n_tokens) True where token [s, e) overlaps span [a, b) (a zero-width token, such
    as BOS, overlaps nothing)."""
    mask = torch.zeros(len(spans), len(offsets), dtype=torch.bool)
    for j, (a, b) in enumerate(spans):
        for t, (s, e) in enumerate(offsets):
            mask[j, t] = s < b and e > a and e > s
    return mask


__all__ = [
    "ACTIVATIONS",
    "ATTENTION",
    "ActivationProbe",
    "AllocationProbe",
    "Quantization",
    "attach",
    "attention",
    "check_quantization",
    "check_routed",
    "decoder_layers",
    "diff_lambda",
    "probing",
    "token_span_mask",
]
