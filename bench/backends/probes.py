"""Inside the model: one attention function in transformers' registry, and what rides on it.

`attention` is registered under the name ATTENTION in `AttentionInterface`, and the same name in
`AttentionMaskInterface` (with transformers' own SDPA mask builder: a boolean mask, or none for an
unpadded causal batch). Any model family whose attention modules call
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)` then runs it: Llama once
per layer, DiffLlama twice per layer (the same Q, K and mask, the two halves of V). Without
quantization the output is transformers' own SDPA (what the model runs by default), and a probe
reads the logits beside it: QK^T in blocks of query rows per KV head, each block reduced to
statistics and dropped. With quantization it computes eager attention in blocks of query rows
(every head at once). Either way no L x L matrix ever exists for a long sequence, and causality
is applied where no mask arrives (SDPA's `is_causal` path, upper-left aligned as SDPA aligns it).
Nothing of the model's code is copied or patched.

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

DIFF V2 (`diffbench.modeling.diff_v2`) makes one call per layer over 2h query heads, heads 2i and
2i+1 a pair: map "1" is the even heads, "2" the odd ones. Its lambda is per token and head, so
the allocation probe reads it from the model (a forward hook on the layer's `lambda_sigmoid`,
which runs before the attention call) instead of re-deriving it.
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
from diffbench.modeling.diff_v2 import DiffV2Attention
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "diffbench"
ACTIVATIONS = ACTIVATION_TYPES
LOGIT_QUANT = ("tensor", "head")
# Logits computed at once: B x heads x rows x keys elements. 2^19 (2 MiB in float32): a block's
# statistics cost ~30 tensor calls, ~250 us on a CPU whatever the block's size, which blocks of
# 2^16 .. 2^18 paid 25-50% over (profiled); above 2^19 the passes over a block leave the
# cache and get slower again (2^20 measured no better). A block and its temporaries stay in L3.
BLOCK_ELEMENTS = 1 << 19
# The quantized path's blocks hold every head (a `tensor` scale spans them), and each costs ~20
# tensor calls (two matmuls, the quantization, the softmax): 2^21 elements (8 MiB) measured
# fastest (2^18: 5.1x a forward at 8K tokens, 2^19: 3.4x, 2^20: 2.6x, 2^21: 2.3x, 2^22: 2.5x).
EAGER_BLOCK_ELEMENTS = 1 << 21
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
        """`logits` (B, H, rows, keys) rounded, in place, to the grid of their row's (or
        row-head's) absmax over the `allowed` keys (None: every key, or masked keys already 0)."""
        levels = 2 ** (self.bits - 1) - 1
        visible = logits.abs() if allowed is None else logits.abs().masked_fill(~allowed, 0)
        # One reduction over keys, then heads: amax over (1, 3) at once is a strided reduction.
        # (aminmax, which avoids abs's copy, measured slower: 2.7x a forward against 2.1x.)
        scale = visible.amax(dim=3, keepdim=True)
        if self.mode == "tensor":
            scale = scale.amax(dim=1, keepdim=True)
        scale = scale.div_(levels)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        # |x| / scale <= levels up to one rounding, so round() stays within +-levels: no clamp.
        return logits.div_(scale).round_().mul_(scale)


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
    of |x| (exact: each block's values above the running k-th largest merged with the running
    top) and the |x| histogram on the api's log grid."""

    def __init__(self, top_k: int, device: torch.device) -> None:
        self.top_k = top_k
        self.count = 0
        # Zeros added as stand-ins for masked positions: in the histogram's bin 0, taken out there.
        self.padded = 0
        self.moments = torch.zeros(4, dtype=torch.float64, device=device)
        self.top = torch.empty(0, device=device)
        # Bin 0 (below 2^-149, the smallest float32) holds the zeros: log2(0) = -inf clamps there.
        self.hist = torch.zeros(_N_BINS, dtype=torch.int64, device=device)

    def add(self, x: torch.Tensor, padded: int = 0) -> None:
        """Take in the values of `x` (any shape; rows along its last dimension), of which
        `padded` are zeros standing in for positions that are not values (masked out): they
        count nowhere."""
        if x.numel() == padded:
            return
        self.count += x.numel() - padded
        self.padded += padded
        flat = x.reshape(-1)
        # Powers summed per block in the activations' float32 (torch sums pairwise, so a block's
        # sum keeps float32's relative precision), blocks added in float64.
        sq = flat * flat
        sums = (flat.sum(), sq.sum(), torch.dot(sq, flat), torch.dot(sq, sq))
        self.moments += torch.stack(sums).double()
        del sq
        a = x.abs().float()
        rows = a.reshape(-1, a.shape[-1]) if a.dim() > 1 else a.reshape(1, -1)
        if len(self.top) == self.top_k:
            # Only values above the running k-th largest can enter the top: one max per row
            # first (a reduction, no copy), then the few rows that hold one. Most blocks hold
            # none once the top has filled: they stop after that one reduction.
            floor = self.top[-1]
            row_max = rows.amax(dim=1)
            if float(row_max.max()) > float(floor):
                pool = rows[row_max > floor].reshape(-1)
                self._merge_top(pool[pool > floor])
        else:
            self._merge_top(rows.reshape(-1))
        # Bin floor(64 log2 |x|) - _BIN_LO: floored before the offset, so the sum is exact.
        bins = a.log2_().mul_(HIST_BINS_PER_OCTAVE).floor_().sub_(_BIN_LO)
        bins = bins.clamp_(0, _N_BINS - 1).to(torch.int32).reshape(-1)
        self.hist += torch.bincount(bins, minlength=_N_BINS)

    def _merge_top(self, pool: torch.Tensor) -> None:
        if pool.numel() > self.top_k:
            pool = torch.topk(pool, self.top_k, sorted=False).values
        merged = torch.cat((self.top, pool))
        self.top = torch.topk(merged, min(self.top_k, merged.numel())).values

    def _top(self) -> torch.Tensor:
        # Stand-in zeros can reach the top only where fewer than top_k values exist.
        return self.top[: self.count]

    def merged(self, other: Accumulator) -> Accumulator:
        """A new accumulator holding the values of both."""
        out = Accumulator(self.top_k, self.hist.device)
        out.count = self.count + other.count
        out.padded = self.padded + other.padded
        out.moments = self.moments + other.moments
        both = torch.cat((self._top(), other._top()))
        out.top = torch.topk(both, min(self.top_k, both.numel())).values
        out.hist = self.hist + other.hist
        return out

    def summary(self, activation: str, layer: int, map: str) -> ActivationSummary:
        """The api's plain-Python record of these statistics."""
        counts = self.hist.tolist()
        hist = [(b + _BIN_LO, c) for b, c in enumerate(counts) if c and b]
        zeros = counts[0] - self.padded
        if zeros:
            hist.insert(0, (ZERO_BIN, zeros))
        m = self.moments.tolist()
        return ActivationSummary(
            activation=activation,
            layer=layer,
            map=map,
            count=self.count,
            moments=(m[0], m[1], m[2], m[3]),
            top=tuple(float(v) for v in self._top().tolist()),
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

    # Whether `logits` wants the blocks of logits (else they are computed only where the model's
    # quantization needs them).
    wants_logits = False

    def logits(
        self,
        module: torch.nn.Module,
        logits: torch.Tensor,
        rows: slice,
        heads: slice,
        n_heads: int,
        masked: BlockMask,
    ) -> None:
        """A block of pre-softmax logits (B, heads, r, keys) of query rows `rows` and heads
        `heads` of `n_heads`, zero where `masked` says a key is not attended."""

    def probs(self, module: torch.nn.Module, probs: torch.Tensor, rows: slice, n_rows: int) -> None:
        """A block of attention probabilities (B, H, r, keys) of query rows `rows` of `n_rows`."""

    def wants_probs(self, rows: slice, n_rows: int) -> bool:
        return False


def is_diff(module: torch.nn.Module) -> bool:
    """Whether an attention module is DIFF V1 (DiffLlama: lambda parameters, lambda_init)."""
    return hasattr(module, "lambda_init") and hasattr(module, "lambda_q1")


def diff_maps(module: torch.nn.Module, heads: slice, n_heads: int) -> dict[str, slice]:
    """A differential layer's logit maps "1" and "2" among the block of heads `heads` of
    `n_heads`, as slices of the block (V1: the first and second half of the heads; V2: the even
    and the odd heads); {"": every head} for a Transformer layer."""
    if isinstance(module, DiffV2Attention):
        first = heads.start % 2  # the block's first even head
        return {"1": slice(first, None, 2), "2": slice(1 - first, None, 2)}
    if not is_diff(module):
        return {"": slice(None)}
    half = n_heads // 2
    maps = {}
    for name, (lo, hi) in {"1": (0, half), "2": (half, n_heads)}.items():
        first, last = max(lo, heads.start), min(hi, heads.stop)
        if first < last:
            maps[name] = slice(first - heads.start, last - heads.start)
    return maps


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
        self.all_valid = bool(valid.all())
        self.wants_logits = "attention_logits" in self.activations
        # (row, layer, map) -> statistics; hidden states under map "".
        self.logit_stats: dict[tuple[int, int, str], Accumulator] = {}
        self.hidden_stats: dict[tuple[int, int], Accumulator] = {}

    def _acc(self, table: dict[Any, Accumulator], key: Any) -> Accumulator:
        if key not in table:
            table[key] = Accumulator(self.top_k, self.valid.device)
        return table[key]

    def logits(
        self,
        module: torch.nn.Module,
        logits: torch.Tensor,
        rows: slice,
        heads: slice,
        n_heads: int,
        masked: BlockMask,
    ) -> None:
        if "attention_logits" not in self.activations:
            return
        b = logits.shape[0]
        layer = int(getattr(module, "layer_idx", -1))
        maps = diff_maps(module, heads, n_heads)
        for row in range(b):
            part = logits[row]
            hidden = masked.rows(row)
            real = self.valid[row, rows]
            if not self.all_valid and not bool(real.all()):
                # Padding rows attend somewhere too; only real query tokens count.
                part = part[:, real]
                hidden = hidden[real] if hidden is not None else None
            # Masked positions are zeros (the attention zeroed them) that the accumulator is told
            # to discount: cheaper than gathering the causal positions of every block.
            n_masked = int(hidden.sum()) if hidden is not None else 0
            for name, block_heads in maps.items():
                values = part[block_heads]
                acc = self._acc(self.logit_stats, (row, layer, name))
                acc.add(values, n_masked * values.shape[0])

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
    softmax1_i - lambda softmax2_i, and a line in `warnings` says so. DIFF V2 the same per output
    head i, with softmax_{2i}, softmax_{2i+1} and the last token's own lambda_i (`lambdas`, read
    from the model)."""

    def __init__(self, spans: torch.Tensor) -> None:
        super().__init__()
        self.spans = spans
        self.masses: dict[int, list[float]] = {}
        self.negative: dict[int, list[float]] = {}
        self.warnings: list[str] = []
        # DIFF V2: layer -> the last token's lambda per output head, as the model computed it.
        self.lambdas: dict[int, torch.Tensor] = {}

    def lambda_(self, layer: int, lam: torch.Tensor) -> None:
        """A DIFF V2 layer's lambda (B, L, h), as its forward computed it."""
        self.lambdas[layer] = lam[0, -1].detach().float()

    def wants_probs(self, rows: slice, n_rows: int) -> bool:
        return rows.stop == n_rows

    def probs(self, module: torch.nn.Module, probs: torch.Tensor, rows: slice, n_rows: int) -> None:
        last = probs[0, :, -1, :].float()  # (H, keys): batch of one, the prompt's last token
        layer = int(getattr(module, "layer_idx", -1))
        if isinstance(module, DiffV2Attention):
            lams = self.lambdas[layer].to(last.device)[:, None]  # (h, 1)
            last = last[0::2] - lams * last[1::2]
            ok = lams < 1 - LAMBDA_GUARD
            last = torch.where(ok, last / torch.where(ok, 1 - lams, 1.0), last)
            if not bool(ok.all()):
                self.warnings.append(
                    f"layer {layer}: lambda >= 1 in {int((~ok).sum())} heads, whose differential "
                    "maps are not divided by 1 - lambda (they do not sum to 1)"
                )
        elif is_diff(module):
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


@dataclass(frozen=True)
class BlockMask:
    """Which keys a block of query rows does not attend: `hidden` (B|1, 1, r, keys - offset),
    True where not attended, over the keys from `offset` on (None: every key is attended)."""

    offset: int
    hidden: torch.Tensor | None

    @staticmethod
    def of(
        attention_mask: torch.Tensor | None,
        rows: slice,
        keys_end: int,
        causal: bool,
        device: torch.device,
    ) -> BlockMask:
        """The block's mask: from a boolean or additive mask, or, where none arrives and the
        call is causal, SDPA's upper-left aligned triangle (only its last r keys)."""
        if attention_mask is None:
            if not causal or keys_end <= rows.start:
                return BlockMask(0, None)
            pos = torch.arange(rows.start, rows.stop, device=device)
            keys = torch.arange(rows.start, keys_end, device=device)
            return BlockMask(rows.start, (keys[None, :] > pos[:, None])[None, None])
        block = attention_mask[:, :, rows, :keys_end]
        if block.dtype == torch.bool:
            return BlockMask(0, ~block)
        return BlockMask(0, block <= torch.finfo(block.dtype).min / 2)

    def fill_(self, logits: torch.Tensor, value: float) -> None:
        """Set the not-attended logits of the block (B, H, r, keys) to `value`, in place."""
        if self.hidden is not None:
            logits[..., self.offset :].masked_fill_(self.hidden, value)

    def rows(self, row: int) -> torch.Tensor | None:
        """Batch row `row`'s mask (r, keys - offset), or None."""
        if self.hidden is None:
            return None
        return self.hidden[min(row, self.hidden.shape[0] - 1), 0]


class _State:
    """What rides on one model's attention calls: its quantization and the active probe."""

    def __init__(self, quantization: Quantization | None) -> None:
        self.quantization = quantization
        self.probe: Probe | None = None


_STATES: dict[int, _State] = {}


def _state(module: torch.nn.Module) -> _State | None:
    config = getattr(module, "config", None)
    return _STATES.get(id(config)) if config is not None else None


def _keys_end(n_k: int, n_q: int, rows: slice, causal: bool, masked: bool) -> int:
    # Without a mask, a causal block's rows see keys up to its last row only.
    return min(n_k, rows.stop) if not masked and causal and n_q > 1 else n_k


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
    """Attention with the model's quantization and probe: eager in blocks of query rows where
    the logits are quantized, else transformers' SDPA with the probe reading the logits in
    blocks beside it.

    Shapes as transformers passes them: query (B, H, Q, d), key and value (B, Hkv, K, d[v]),
    mask (B|1, 1, Q, K) boolean (True: attend) or additive float, or None; returns (B, Q, H, dv).
    """
    state = _state(module)
    quant = state.quantization if state else None
    probe = state.probe if state else None
    if probe is not None and not probe.first_call(module, query, key):
        probe = None  # a DIFF layer's second call: its logits were counted by the first
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if quant is None:
        # Nothing changes the softmax: the model's own SDPA computes the output, and the probe
        # costs one pass of QK^T in blocks (per KV head, so each block reuses one K).
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
        if probe is not None:
            _observe(probe, module, query, key, attention_mask, scale, causal)
        return out, None
    return _eager(module, query, key, value, attention_mask, scale, causal, quant, probe), None


def _observe(
    probe: Probe,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> None:
    """Hand `probe` the logits it asks for: blocks of every row and head, and the last row's
    probabilities."""
    b, h, n_q, _ = query.shape
    hkv, n_k = key.shape[1], key.shape[2]
    rep = h // hkv
    masked = attention_mask is not None
    last = slice(n_q - 1, n_q)
    if probe.wants_probs(last, n_q):
        end = _keys_end(n_k, n_q, last, causal, masked)
        q = query[:, :, last].reshape(b, hkv, rep, -1) * scale
        logits = torch.matmul(q, key[:, :, :end].transpose(2, 3)).view(b, h, 1, end)
        BlockMask.of(attention_mask, last, end, causal, query.device).fill_(
            logits, torch.finfo(logits.dtype).min
        )
        probe.probs(module, torch.softmax(logits, dim=-1, dtype=torch.float32), last, n_q)
    if not probe.wants_logits:
        return
    step = max(1, BLOCK_ELEMENTS // (b * rep * n_k))
    # The scale rides on Q (r x d per block, not r x keys); K^T made contiguous once per KV
    # head, so the matmul does not repack it for every block (profiled: half its time).
    scaled = query * scale
    for g in range(hkv):
        heads = slice(g * rep, (g + 1) * rep)
        k = key[:, g : g + 1].transpose(2, 3).contiguous()
        for q0 in range(0, n_q, step):
            rows = slice(q0, min(n_q, q0 + step))
            r = rows.stop - rows.start
            end = _keys_end(n_k, n_q, rows, causal, masked)
            q = scaled[:, heads, rows].reshape(b, 1, rep * r, -1)
            logits = torch.matmul(q, k[..., :end]).view(b, rep, r, end)
            mask = BlockMask.of(attention_mask, rows, end, causal, query.device)
            mask.fill_(logits, 0.0)
            probe.logits(module, logits, rows, heads, h, mask)


def _eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    quant: Quantization,
    probe: Probe | None,
) -> torch.Tensor:
    """Eager attention in blocks of query rows, every head at once (the quantization's scale
    may span heads), logits quantized before the mask and the softmax (float32, as
    transformers' eager)."""
    b, h, n_q, _ = query.shape
    hkv, n_k, dv = key.shape[1], key.shape[2], value.shape[3]
    rep = h // hkv
    masked = attention_mask is not None
    out = query.new_empty(b, n_q, h, dv)
    step = max(1, EAGER_BLOCK_ELEMENTS // (b * h * n_k))
    # As in _observe: the scale on Q, K^T contiguous once (not repacked by every block's matmul).
    scaled = query * scale
    key_t = key.transpose(2, 3).contiguous()
    for q0 in range(0, n_q, step):
        rows = slice(q0, min(n_q, q0 + step))
        r = rows.stop - rows.start
        end = _keys_end(n_k, n_q, rows, causal, masked)
        # Grouped query attention without copying K: the rep query heads of a KV head in one
        # matmul, (B, Hkv, rep * r, d) @ (B, Hkv, d, K).
        q = scaled[:, :, rows].reshape(b, hkv, rep * r, -1)
        logits = torch.matmul(q, key_t[..., :end]).view(b, h, r, end)
        mask = BlockMask.of(attention_mask, rows, end, causal, query.device)
        # Zeros where no key is attended: they leave the absmax (and the probe's counts) alone.
        mask.fill_(logits, 0.0)
        if probe is not None and probe.wants_logits:
            probe.logits(module, logits, rows, slice(0, h), h, mask)
        quant.apply(logits, None)
        mask.fill_(logits, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        del logits
        if probe is not None and probe.wants_probs(rows, n_q):
            probe.probs(module, probs, rows, n_q)
        v = value[:, :, :end]
        block = torch.matmul(probs.view(b, hkv, rep * r, end), v).view(b, h, r, dv)
        out[:, rows] = block.transpose(1, 2)
    return out


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
    if isinstance(probe, AllocationProbe):
        for module in model.modules():
            if isinstance(module, DiffV2Attention):

                def read(_m: Any, _a: Any, lam: Any, layer: int = module.layer_idx) -> None:
                    probe.lambda_(layer, lam)

                hooks.append(module.lambda_sigmoid.register_forward_hook(read))
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
    "diff_maps",
    "probing",
    "token_span_mask",
]
