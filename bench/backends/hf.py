"""The transformers backend: any causal LM from a folder, a hub id or a GGUF file.

Choices are tokenized as lm-eval does (context and choice encoded together, split after the
context's tokens), so the model sees a natural prompt's tokens. Scoring then shares work the way a
long-context harness must: the longest token prefix that a group of requests' contexts have in
common (a haystack, demonstrations) is encoded once and kept as a KV cache; each request's rest
of the context extends it, and all of the request's
choices are then scored in *one* forward pass as a token tree (each choice attends to the cached
context and to its own earlier tokens through a 4-D additive mask, with positions restarting
after the query), after which the cache is cropped back to the prefix. No cache is ever copied,
and only the positions that are scored reach the LM head. The query's own pass also carries the
choices' distinct first tokens (up to LOOKAHEAD_MAX), so a label search that needs the second
token of a few labels usually needs no pass of its own for it.
"""

from __future__ import annotations

import hashlib
import math
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffbench.api import (
    ActivationRequest,
    ActivationStats,
    AttentionMass,
    AttentionRequest,
    ChoiceRequest,
    ChoiceScores,
    GenerateRequest,
    Generation,
    ModelInfo,
    RollingRequest,
    Throughput,
    ThroughputRequest,
    TokenLogprobs,
)
from diffbench.backends import probes
from diffbench.backends.prefix import PrefixCache, common_prefix, end_token_ids, greedy
from diffbench.backends.trie import ROOT, ChoiceTrie, Method, search_pair_passes
from diffbench.config import model_options
from diffbench.errors import DiffbenchError
from diffbench.models import LoadTarget, ModelSpec, resolve_target
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

# Most choices' first tokens that ride along in a query's pass; more would cost more compute than
# the pass they save (a CPU pass over a cached context costs about as much as ~30 new tokens).
LOOKAHEAD_MAX = 32


@dataclass(frozen=True)
class HFOptions:
    """Model options settable with `--model-args LABEL:KEY=VALUE`."""

    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    attn_implementation: str = "sdpa"  # sdpa | eager | a name registered in the attention registry
    # An int, or auto: on a GPU, batches that start at 64 and halve on out-of-memory; on a CPU,
    # one request at a time from the shared prefix cache (left-padded batches only add work
    # there: every attention call becomes a masked one). Generation with batch size 1 always
    # runs from the prefix cache.
    batch_size: str = "auto"
    max_length: int = 0  # 0: the model config's max_position_embeddings
    chat_template: bool = True  # use the model's chat template when it has one
    trust_remote_code: bool = False
    # One KV cache kept across requests (cropped to the token prefix the next request shares
    # with it), so each distinct prompt token is computed once. False: every (prompt, choice)
    # and every generation prompt gets its own full pass.
    prefix_cache: bool = True
    # Attention-logit quantization (the paper's Figure 8): bits of the absmax grid, 16 = off; the
    # scale per query token over all heads (tensor) or per head. Below 16 the model runs
    # diffbench's registered attention function, whatever attn_implementation says.
    logit_bits: int = 16
    logit_quant: Literal["tensor", "head"] = "tensor"


def _fingerprint(target: LoadTarget, options: HFOptions | None = None) -> str:
    """`sha256:<weights>;tokenizer:<files>` of a local checkpoint (a GGUF file holds both).

    A hub snapshot adds `commit:<folder name>` in front; an id not on disk is `hub:<id>`. Logit
    quantization changes every score, so it is part of the identity: `logits:<bits>bit-<mode>`
    at the end (absent at 16 bits, so unquantized fingerprints are what they always were).
    """
    quant = ""
    if options is not None and options.logit_bits < 16:
        quant = f";logits:{options.logit_bits}bit-{options.logit_quant}"
    return _weights_fingerprint(target) + quant


def _weights_fingerprint(target: LoadTarget) -> str:
    root = Path(target.path)
    if not root.exists():
        return f"hub:{target.path}"
    if target.gguf_file:
        files = [root / target.gguf_file]
    else:
        files = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    parts = [f"sha256:{digest.hexdigest()}"]
    if not target.gguf_file:
        # Every file AutoTokenizer may read: the same weights behind other tokens are another
        # model as far as scores go. Names are hashed too, so moving content between files counts.
        tokenizer = hashlib.sha256()
        names = (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "tokenizer.model",
            "spiece.model",
            "vocab.json",
            "vocab.txt",
            "merges.txt",
            "chat_template.jinja",
            "chat_template.json",
        )
        for name in names:
            if (root / name).is_file():
                tokenizer.update(f"{name}\0{(root / name).stat().st_size}\0".encode())
                tokenizer.update((root / name).read_bytes())
        parts.append(f"tokenizer:{tokenizer.hexdigest()}")
    if "snapshots" in root.parts:  # a hub cache snapshot: the folder name is the commit
        parts.insert(0, f"commit:{root.name}")
    return ";".join(parts)


class HFTokenizerView:
    """A model's tokenizer as tasks see it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_context: int, chat: bool) -> None:
        self._tok = tokenizer
        self._max_context = max_context
        self._chat = chat and bool(getattr(tokenizer, "chat_template", None))

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def has_chat_template(self) -> bool:
        return self._chat

    def count(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=False)["input_ids"])

    def char_offset(self, text: str, n_tokens: int) -> int:
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if n_tokens >= len(offsets):
            return len(text)
        if n_tokens <= 0:
            return 0
        return int(offsets[n_tokens - 1][1])

    def render(self, user: str, answer_prefix: str = "", chat: bool = True) -> str:
        if chat and self._chat:
            rendered = self._tok.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            return str(rendered) + answer_prefix
        return f"{user}\n{answer_prefix}"

    def prompt_tokens(self, prompt: str) -> int:
        return len(encode_prompt(self._tok, prompt))


def encode_prompt(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt: BOS once (when the tokenizer uses one), never inside the text."""
    return encode_prompts(tok, [text])[0]


def encode_prompts(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode_prompt` of several texts in one tokenizer call."""
    encoded: list[list[int]] = tok(texts, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    adds_bos = bos is not None and len(tok("x", add_special_tokens=True)["input_ids"]) > len(
        tok("x", add_special_tokens=False)["input_ids"]
    )
    return [
        [int(bos), *ids] if adds_bos and not (ids and ids[0] == bos) else list(ids)
        for ids in encoded
    ]


@dataclass(frozen=True)
class EncodedChoices:
    """A choice request in tokens: the context, each choice's continuation tokens, and the token
    that ends a choice where another continues it (None where no search needs one)."""

    context: list[int]
    choices: list[list[int]]
    end_tokens: list[int | None]


def encode_choices(tok: PreTrainedTokenizerBase, r: ChoiceRequest) -> EncodedChoices:
    """Tokens of a choice request, split as lm-eval's `_encode_pair` splits them: trailing
    whitespace of the context moves to the choice, `context + choice` is encoded whole, and the
    choice's tokens are what follows the context's own token count."""
    context = r.prefix + r.query
    stripped = context.rstrip()
    moved = context[len(stripped) :]
    ctx, *whole = encode_prompts(tok, [stripped, *(stripped + moved + c for c in r.choices)])
    if not ctx:
        raise DiffbenchError("a choice request has an empty context and the model has no BOS token")
    conts = [w[len(ctx) :] for w in whole]
    if any(not c for c in conts):
        raise DiffbenchError("a choice encodes to no tokens")
    end_tokens: list[int | None] = [None] * len(conts)
    if r.method == "greedy":
        extended = {
            i for i, c in enumerate(conts) for o in conts if len(o) > len(c) and o[: len(c)] == c
        }
        for i in sorted(extended):
            end_tokens[i] = _end_token(tok, stripped + moved + r.choices[i], whole[i], r.end)
    return EncodedChoices(ctx, conts, end_tokens)


def _end_token(tok: PreTrainedTokenizerBase, text: str, ids: list[int], end: str) -> int:
    """The token that follows `text` (encoded as `ids`) when `end` comes next: EOS for no end."""
    if not end:
        if tok.eos_token_id is None:
            raise DiffbenchError(
                "greedy choice search needs an end token: give the request an `end` text, "
                "the tokenizer has no end-of-sequence token"
            )
        return int(tok.eos_token_id)
    after = encode_prompt(tok, text + end)
    if len(after) > len(ids) and after[: len(ids)] == ids:
        return after[len(ids)]
    alone = tok(end, add_special_tokens=False)["input_ids"]
    if not alone:
        raise DiffbenchError(f"the end text {end!r} encodes to no tokens")
    return int(alone[0])


def _resolve_dtype(name: str) -> torch.dtype | str:
    table: dict[str, torch.dtype | str] = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "auto": "auto",
    }
    if name not in table:
        raise DiffbenchError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffbenchError("device cuda was asked for but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise DiffbenchError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _check_attention(label: str, name: str) -> None:
    """Refuse an attention implementation transformers would refuse only once loading."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name.removeprefix("paged|") in known or name in known or "/" in name:  # "/": a hub kernel
        return
    raise DiffbenchError(
        f"{label}:attn_implementation {name!r} is not a registered attention; "
        f"known: {', '.join(known)}"
    )


def coerce_options(label: str, raw: Mapping[str, Any]) -> HFOptions:
    """HF backend options from raw strings or YAML values, typed by HFOptions' annotations
    (Literal values checked), refusing unknown keys and bad values."""
    opts: HFOptions = model_options(HFOptions, raw, label)
    if opts.batch_size != "auto" and not (opts.batch_size.isdigit() and int(opts.batch_size) > 0):
        raise DiffbenchError(f"{label}:batch_size must be a positive integer or auto")
    if opts.max_length < 0:
        raise DiffbenchError(
            f"{label}:max_length must be 0 (the model's own) or a positive integer"
        )
    # Checked here, not when the model loads: by then the run directory has been written.
    probes.check_quantization(label, opts.logit_bits, opts.logit_quant)
    _resolve_device(opts.device)
    _check_attention(label, opts.attn_implementation)
    return opts


class _RowStops(StoppingCriteria):
    """Each row of a generation batch stops at its own stop strings and its own token budget.

    (transformers' `stop_strings` would stop every row at any row's strings, so a request's output
    would depend on what it was batched with.) `finished_at[k]` is row k's token count when it
    stopped, 0 while it runs."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, width: int, requests: Sequence[GenerateRequest]
    ) -> None:
        self.tokenizer, self.width = tokenizer, width
        self.stops = [r.stop for r in requests]
        self.budgets = [r.max_new_tokens for r in requests]
        self.finished_at = [0] * len(requests)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.width :]
        n = new.shape[1]
        for k in range(new.shape[0]):
            if self.finished_at[k]:
                continue
            if n >= self.budgets[k]:
                self.finished_at[k] = n
            elif self.stops[k]:
                text = self.tokenizer.decode(new[k].tolist(), skip_special_tokens=True)
                if any(s in text for s in self.stops[k]):
                    self.finished_at[k] = n
        return torch.tensor([bool(f) for f in self.finished_at], device=input_ids.device)


class HFBackend:
    """A transformers causal LM answering generate and choice-scoring requests."""

    def __init__(self, label: str, spec: str, target: LoadTarget, options: HFOptions) -> None:
        self.options = options
        self.device = _resolve_device(options.device)
        kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
        if target.gguf_file:
            kwargs["gguf_file"] = target.gguf_file
        quantized = options.logit_bits < 16
        attn = probes.ATTENTION if quantized else options.attn_implementation
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(target.path, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(
                target.path, dtype=_resolve_dtype(options.dtype), attn_implementation=attn, **kwargs
            )
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DiffbenchError(f"cannot load model {label!r} from {spec!r}: {first}") from err
        self.model.to(self.device).eval()  # type: ignore[arg-type]
        if quantized:
            quant = probes.Quantization(options.logit_bits, options.logit_quant)
            probes.attach(self.model, quant)
            probes.check_routed(self.model)  # a family that bypasses the registry: refused
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config_max = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        max_context = options.max_length or config_max or 2048
        if options.batch_size == "auto":
            self._batch_size = 64 if self.device.type == "cuda" else 1
        else:
            self._batch_size = int(options.batch_size)
        self._prefix = PrefixCache(self.model)
        self._end_ids = end_token_ids(self.model, self.tokenizer)
        self._warm_shapes: set[tuple[int, int]] = set()  # (n_tokens, new_tokens) throughput ran
        architectures = getattr(self.model.config, "architectures", None) or []
        self.info = ModelInfo(
            label=label,
            spec=spec,
            backend="hf",
            path=str(Path(target.path) / target.gguf_file) if target.gguf_file else target.path,
            architecture=architectures[0] if architectures else type(self.model).__name__,
            n_parameters=sum(p.numel() for p in self.model.parameters()),
            dtype=str(self.model.dtype).removeprefix("torch."),
            max_context=max_context,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            fingerprint=_fingerprint(target, options),
        )
        self._view = HFTokenizerView(self.tokenizer, max_context, options.chat_template)

    @classmethod
    def check(cls, spec: ModelSpec) -> None:
        """Refuse a spec whose weights cannot be found or whose options are bad, loading
        nothing."""
        coerce_options(spec.label, spec.options)
        resolve_target(spec)

    @classmethod
    def load(cls, spec: ModelSpec) -> HFBackend:
        """The backend for a model spec (`hf:` or no prefix)."""
        return cls(
            spec.label, spec.spec, resolve_target(spec), coerce_options(spec.label, spec.options)
        )

    def tokenizer_view(self) -> HFTokenizerView:
        return self._view

    def close(self) -> None:
        self._prefix.clear()
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- shared plumbing -------------------------------------------------------------------

    def _check_fits(self, n_tokens: int, what: str) -> None:
        if n_tokens > self.info.max_context:
            raise DiffbenchError(
                f"{what} needs {n_tokens} tokens, beyond model {self.info.label!r}'s maximum "
                f"context of {self.info.max_context}"
            )

    def _with_oom_retry(self, run: Callable[[int], Any]) -> Any:
        """Call `run(batch_size)`, halving the batch on out-of-memory when batch_size is auto."""
        while True:
            try:
                return run(self._batch_size)
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if self.options.batch_size != "auto" or not _is_oom(err) or self._batch_size == 1:
                    raise
                self._batch_size //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # ---- generation ------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        encoded = encode_prompts(self.tokenizer, [r.prompt for r in requests])
        for ids, r in zip(encoded, requests, strict=True):
            self._check_fits(len(ids) + r.max_new_tokens, "a generation request")
        if self._batch_size == 1:
            return self._generate_shared(encoded, requests)
        # Longest first, so memory trouble shows at once and padding within a batch is small.
        order = sorted(range(len(requests)), key=lambda i: (-len(encoded[i]), i))
        results: dict[int, Generation] = {}
        start = 0
        while start < len(order):

            def run_batch(bs: int, start: int = start) -> tuple[list[int], list[Generation]]:
                chunk = order[start : start + bs]
                batch = [encoded[i] for i in chunk]
                return chunk, self._generate_batch(batch, [requests[i] for i in chunk])

            chunk, gens = self._with_oom_retry(run_batch)
            for i, gen in zip(chunk, gens, strict=True):
                results[i] = gen
            start += len(chunk)
        return [results[i] for i in range(len(requests))]

    def _generate_shared(
        self, encoded: list[list[int]], requests: Sequence[GenerateRequest]
    ) -> list[Generation]:
        """One request at a time in sorted token order from the prefix cache: each prompt
        computes only the tokens after the prefix it shares with the one before it."""
        results: dict[int, Generation] = {}
        for i in sorted(range(len(requests)), key=lambda i: encoded[i]):
            if not self.options.prefix_cache:
                self._prefix.clear()
            r = requests[i]
            new, text = greedy(
                self._prefix, self.tokenizer, encoded[i], r.max_new_tokens, r.stop, self._end_ids
            )
            results[i] = Generation(text, len(encoded[i]), len(new))
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _generate_batch(
        self, batch: list[list[int]], requests: list[GenerateRequest]
    ) -> list[Generation]:
        width = max(len(ids) for ids in batch)
        pad = int(self.tokenizer.pad_token_id)
        # Left padding: every row's last prompt token sits at the same column.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        stops = _RowStops(self.tokenizer, width, requests)
        out = self.model.generate(  # type: ignore[misc]
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max(r.max_new_tokens for r in requests),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([stops]),
        )
        eos = self.tokenizer.eos_token_id
        gens = []
        for k, (row, ids, r) in enumerate(
            zip(out[:, width:].tolist(), batch, requests, strict=True)
        ):
            # A row's own end: its stop string, its budget or EOS; what the batch ran on after
            # that (padding, or tokens for longer budgets) is not part of it.
            n_new = stops.finished_at[k] or len(row)
            n_new = next((j + 1 for j, t in enumerate(row[:n_new]) if t == eos), n_new)
            text = str(self.tokenizer.decode(row[:n_new], skip_special_tokens=True))
            cut = min((text.find(s) for s in r.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
            gens.append(Generation(text=text, n_prompt_tokens=len(ids), n_new_tokens=n_new))
        return gens

    # ---- rolling log-probabilities ---------------------------------------------------------

    @torch.inference_mode()
    def rolling_logprobs(self, requests: Sequence[RollingRequest]) -> list[TokenLogprobs]:
        """Every token's log-probability, in windows of the context's length (see
        RollingRequest): lm-eval's `loglikelihood_rolling` when the stride is a whole window."""
        window = self.info.max_context
        first = self.tokenizer.bos_token_id
        if first is None:
            first = self.tokenizer.eos_token_id
        if first is None:
            raise DiffbenchError(f"model {self.info.label!r} has neither a BOS nor an EOS token")
        out = []
        for r in requests:
            stride = r.stride or window
            if not 0 < stride <= window:
                raise DiffbenchError(
                    f"a rolling stride of {r.stride} tokens is outside 1..{window}, the "
                    f"context of model {self.info.label!r}"
                )
            ids = list(self.tokenizer(r.text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise DiffbenchError("a rolling request's text encodes to no tokens")
            seq = [int(first), *ids]  # seq[k + 1] is ids[k], predicted from seq[: k + 1]
            logprobs: list[float] = []
            done = 0
            while done < len(ids):
                n_new = min(window if done == 0 else stride, len(ids) - done)
                end = done + n_new
                inputs = torch.tensor([seq[max(0, end - window) : end]], device=self.device)
                logits = self.model(inputs, logits_to_keep=n_new).logits[0]
                lp = torch.log_softmax(logits.float(), dim=-1)
                targets = torch.tensor(seq[done + 1 : end + 1], device=self.device)
                logprobs += lp.gather(1, targets[:, None])[:, 0].tolist()
                done = end
            if not all(math.isfinite(x) for x in logprobs):
                raise DiffbenchError(f"model {self.info.label!r} gave non-finite log-probabilities")
            out.append(TokenLogprobs(tuple(ids), tuple(logprobs)))
        return out

    # ---- choice scoring --------------------------------------------------------------------

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceScores]:
        results: list[ChoiceScores | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            if not r.choices:
                raise DiffbenchError("a choice request has no choices")
            groups.setdefault(r.prefix, []).append(i)
        score = self._score_shared if self.options.prefix_cache else self._score_naive
        for members in groups.values():
            encoded = [encode_choices(self.tokenizer, requests[i]) for i in members]
            for e in encoded:
                longest = max(len(c) for c in e.choices)
                self._check_fits(len(e.context) + longest, "a scoring request")
            methods: list[Method] = [requests[i].method for i in members]
            for i, s in zip(members, score(encoded, methods), strict=True):
                results[i] = s
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def _score_naive(
        self, encoded: list[EncodedChoices], methods: list[Method]
    ) -> list[ChoiceScores]:
        """Reference scoring: one full forward pass per (context, choice) pair, no cache."""
        out = []
        for e, method in zip(encoded, methods, strict=True):
            per_token: list[list[float]] = []
            end_lp: list[float | None] = []
            for c, end in zip(e.choices, e.end_tokens, strict=True):
                ids = torch.tensor([e.context + c], device=self.device)
                logits = self.model(ids, logits_to_keep=len(c) + 1).logits[0]
                lp = torch.log_softmax(logits.float(), dim=-1)
                target = torch.tensor(c, device=self.device)
                per_token.append(lp[:-1].gather(1, target[:, None])[:, 0].tolist())
                end_lp.append(float(lp[-1, end]) if end is not None else None)
            logprobs, chosen = search_pair_passes(
                e.choices, e.end_tokens, per_token, end_lp, method
            )
            out.append(ChoiceScores(tuple(logprobs), tuple(len(c) for c in e.choices), chosen))
        return out

    @torch.inference_mode()
    def _score_shared(
        self, encoded: list[EncodedChoices], methods: list[Method]
    ) -> list[ChoiceScores]:
        """The contexts' common token prefix encoded once; each context's rest extends the
        cache, then its choice trie is searched."""
        n_prefix = common_prefix([e.context for e in encoded])
        if n_prefix == 0:  # nothing in common (no BOS): each context is its own prefix
            return [self._score_shared([e], [m])[0] for e, m in zip(encoded, methods, strict=True)]
        # The prefix's cache comes from the one kept across requests: a generate prompt or an
        # earlier group with the same text (NIAH's two modes, a haystack's depths) computed it.
        cache, prefix_last = self._prefix.extend(encoded[0].context[:n_prefix])
        out = []
        for e, method in zip(encoded, methods, strict=True):
            query, choices = e.context[n_prefix:], e.choices
            trie = ChoiceTrie(choices, e.end_tokens)
            n_context = len(e.context)
            # The query's pass also runs the choices' first tokens (each seeing the query and
            # itself), so the trie's first level is known without a pass of its own. Those
            # results are held back and handed to the search only when it asks for them: the
            # search, and so every score it reports, is the same as without them.
            ahead = [i for i in trie.nodes[ROOT].children.values() if trie.nodes[i].children]
            if not query or len(ahead) > LOOKAHEAD_MAX:
                ahead = []
            held: dict[int, dict[int, float]] = {}
            if query and not ahead:  # a plain causal pass: no mask to build, however long
                step = self.model(
                    torch.tensor([query], device=self.device),
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                trie.expand(ROOT, self._children_logprobs(step.logits[0, -1], trie, ROOT))
            elif query:
                n_q = len(query)
                visible = [list(range(r + 1)) for r in range(n_q)]
                visible += [[*range(n_q), n_q + k] for k in range(len(ahead))]
                logits = self._tree_pass(
                    cache,
                    n_prefix,
                    query + [trie.nodes[i].token for i in ahead],
                    visible,
                    [n_prefix + r for r in range(n_q)] + [n_context] * len(ahead),
                    [n_q - 1] + [n_q + k for k in range(len(ahead))],
                )
                trie.expand(ROOT, self._children_logprobs(logits[0], trie, ROOT))
                held = {
                    i: self._children_logprobs(logits[1 + k], trie, i) for k, i in enumerate(ahead)
                }
                cache.crop(n_context - cache.get_seq_length())  # the first tokens' entries
            else:
                trie.expand(ROOT, self._children_logprobs(prefix_last, trie, ROOT))

            def expand(
                nodes: list[int], t: ChoiceTrie = trie, n: int = n_context, held: dict = held
            ) -> None:
                for i in sorted(i for i in nodes if i in held):
                    t.expand(i, held.pop(i))
                rest = [i for i in nodes if i not in t.expanded]
                if rest:
                    self._expand_nodes(cache, n, t, rest)

            chosen = trie.search(method, expand)
            logprobs = trie.choice_scores()
            if any(x is not None and not math.isfinite(x) for x in logprobs):
                raise DiffbenchError(f"model {self.info.label!r} gave non-finite log-likelihoods")
            out.append(ChoiceScores(tuple(logprobs), tuple(len(c) for c in choices), chosen))
            cache.crop(n_prefix - cache.get_seq_length())  # back to the prefix alone
        return out

    @staticmethod
    def _children_logprobs(logits: torch.Tensor, trie: ChoiceTrie, i: int) -> dict[int, float]:
        lp = torch.log_softmax(logits.float(), dim=-1)
        tokens = trie.wanted(i)
        return dict(zip(tokens, lp[tokens].tolist(), strict=True))

    def _expand_nodes(self, cache: Any, n_context: int, trie: ChoiceTrie, nodes: list[int]) -> None:
        """One forward pass over the trie paths to `nodes` (a 4-D mask keeps each token to its
        own ancestors), reading next-token log-probabilities at those nodes only."""
        rows = sorted({j for i in nodes for j in trie.path(i)})
        where = {j: r for r, j in enumerate(rows)}
        logits = self._tree_pass(
            cache,
            n_context,
            [trie.nodes[j].token for j in rows],
            [[where[a] for a in trie.path(j)] for j in rows],
            [n_context + trie.nodes[j].depth - 1 for j in rows],
            [where[i] for i in nodes],
        )
        # Parents before children: a node's score must be known before it is expanded.
        for k in sorted(range(len(nodes)), key=lambda k: nodes[k]):
            trie.expand(nodes[k], self._children_logprobs(logits[k], trie, nodes[k]))
        cache.crop(n_context - cache.get_seq_length())

    def _tree_pass(
        self,
        cache: Any,
        n_context: int,
        tokens: list[int],
        visible: list[list[int]],
        positions: list[int],
        keep: list[int],
    ) -> torch.Tensor:
        """One pass of `tokens` over the cached context: row r attends to the whole context
        and to the new tokens `visible[r]` (itself included); logits at rows `keep` only."""
        n = len(tokens)
        dtype = self.model.dtype
        mask = torch.full((n, n_context + n), torch.finfo(dtype).min, dtype=dtype)
        mask[:, :n_context] = 0
        for r, cols in enumerate(visible):
            mask[r, [n_context + c for c in cols]] = 0
        return self.model(
            torch.tensor([tokens], device=self.device),
            past_key_values=cache,
            attention_mask=mask[None, None].to(self.device),
            position_ids=torch.tensor([positions], device=self.device),
            use_cache=True,
            logits_to_keep=torch.tensor(keep, device=self.device),
        ).logits[0]

    # ---- probes: activation statistics, attention allocation ---------------------------------

    @torch.inference_mode()
    def activation_stats(self, requests: Sequence[ActivationRequest]) -> list[ActivationStats]:
        """Per text, statistics of each decoder layer's attention logits and outputs (see
        ActivationRequest), batched with right padding; padding never enters a statistic."""
        encoded = [encode_prompt(self.tokenizer, r.text) for r in requests]
        for ids, r in zip(encoded, requests, strict=True):
            unknown = [a for a in r.activations if a not in probes.ACTIVATIONS]
            if unknown or not r.activations:
                raise DiffbenchError(
                    f"unknown activation type {(unknown or [''])[0]!r}; choose from "
                    f"{', '.join(probes.ACTIVATIONS)}"
                )
            if r.top_k < 1:
                raise DiffbenchError(f"an activation request's top_k must be >= 1, got {r.top_k}")
            self._check_fits(len(ids), "an activation request")
        order = sorted(range(len(requests)), key=lambda i: (-len(encoded[i]), i))
        results: dict[int, ActivationStats] = {}
        while order:
            # One batch shares one probe, so its requests must ask for the same statistics.
            first = requests[order[0]]
            same = [
                i
                for i in order
                if (requests[i].activations, requests[i].top_k) == (first.activations, first.top_k)
            ]

            def run_batch(bs: int, same: list[int] = same) -> list[int]:
                chunk = same[:bs]
                stats = self._activation_batch([encoded[i] for i in chunk], requests[chunk[0]])
                results.update(zip(chunk, stats, strict=True))
                return chunk

            done = set(self._with_oom_retry(run_batch))
            order = [i for i in order if i not in done]
        return [results[i] for i in range(len(requests))]

    def _activation_batch(
        self, batch: list[list[int]], request: ActivationRequest
    ) -> list[ActivationStats]:
        width = max(len(ids) for ids in batch)
        pad = int(self.tokenizer.pad_token_id)
        # Right padding: every text keeps positions 0..n-1, as when run alone.
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch])
        valid = torch.tensor([[True] * len(ids) + [False] * (width - len(ids)) for ids in batch])
        probe = probes.ActivationProbe(request.activations, request.top_k, valid.to(self.device))
        with probes.probing(self.model, probe):
            self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=valid.long().to(self.device),
                logits_to_keep=1,
            )
        self._check_all_layers(probe, "attention_logits" in request.activations)
        return [
            ActivationStats(n_tokens=len(ids), summaries=tuple(probe.summaries(row)))
            for row, ids in enumerate(batch)
        ]

    def _check_all_layers(self, probe: probes.Probe, needed: bool = True) -> None:
        n = len(probes.decoder_layers(self.model))
        if needed and len(probe.layers_seen) < n:
            raise DiffbenchError(
                f"model {self.info.label!r} ({self.info.architecture}) did not call the attention "
                f"registry in {n - len(probe.layers_seen)} of its {n} layers, so its attention "
                "cannot be probed"
            )

    @torch.inference_mode()
    def attention_mass(self, requests: Sequence[AttentionRequest]) -> list[AttentionMass]:
        """Per prompt, per layer, the positive and the negative mass of the last token's
        attention map (mean over heads; DIFF: the differential map normalised by 1 - lambda, see
        probes.AllocationProbe) on the tokens that overlap each character span, and a warning
        per DIFF layer whose lambda >= 1 left its map un-normalised."""
        out = []
        for r in requests:
            for a, b in r.spans:
                if not 0 <= a < b <= len(r.prompt):
                    raise DiffbenchError(
                        f"attention span [{a}, {b}) is not a non-empty range inside the prompt's "
                        f"{len(r.prompt)} characters"
                    )
            ids = encode_prompt(self.tokenizer, r.prompt)
            self._check_fits(len(ids), "an attention request")
            enc = self.tokenizer(r.prompt, add_special_tokens=False, return_offsets_mapping=True)
            offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
            offsets = [(0, 0)] * (len(ids) - len(offsets)) + offsets  # BOS covers no character
            probe = probes.AllocationProbe(probes.token_span_mask(offsets, r.spans))
            with probes.probing(self.model, probe):
                self.model(torch.tensor([ids], device=self.device), logits_to_keep=1)
            self._check_all_layers(probe)
            layers = sorted(probe.masses)
            out.append(
                AttentionMass(
                    masses=tuple(tuple(probe.masses[i]) for i in layers),
                    n_prompt_tokens=len(ids),
                    negative=tuple(tuple(probe.negative[i]) for i in layers),
                    warnings=tuple(probe.warnings),
                )
            )
        return out

    # ---- throughput --------------------------------------------------------------------------

    @torch.inference_mode()
    def throughput(self, requests: Sequence[ThroughputRequest]) -> list[Throughput]:
        """Prefill and greedy-decode rates over a synthetic token sequence, `repeats` timed runs
        each (after `warmup` untimed ones the first time this backend times that shape), with
        the peak memory of the timed runs: this model's weights and buffers plus what the timed
        runs added to the memory in use when they began (PeakMemory), so that other models
        loaded beside this one (an interleaved run) do not count."""
        out = []
        vocab = int(self.model.config.vocab_size)
        tensors = (*self.model.parameters(), *self.model.buffers())
        own_bytes = sum(t.numel() * t.element_size() for t in tensors)
        for r in requests:
            if r.n_tokens < 1 or r.new_tokens < 0 or r.repeats < 1 or r.warmup < 0:
                raise DiffbenchError(
                    "a throughput request needs n_tokens >= 1, new_tokens >= 0, repeats >= 1 and "
                    f"warmup >= 0, got {r}"
                )
            self._check_fits(r.n_tokens + r.new_tokens, "a throughput request")
            gen = torch.Generator().manual_seed(r.n_tokens)
            ids = torch.randint(min(4, vocab - 1), vocab, (1, r.n_tokens), generator=gen)
            ids = ids.to(self.device)
            # One warm-up per shape and loaded model: an interleaved run asks for one repeat at a
            # time, and a resumed one starts cold at whatever repeat is next.
            if (r.n_tokens, r.new_tokens) not in self._warm_shapes:
                for _ in range(r.warmup):
                    self._timed_pass(ids, r.new_tokens)
                self._warm_shapes.add((r.n_tokens, r.new_tokens))
            prefill, decode = [], []
            timed_at = time.time()
            with PeakMemory(self.device) as peak:
                for _ in range(r.repeats):
                    t_prefill, t_decode = self._timed_pass(ids, r.new_tokens)
                    prefill.append(r.n_tokens / t_prefill)
                    if r.new_tokens:
                        decode.append(r.new_tokens / t_decode)
            out.append(
                Throughput(
                    prefill_tokens_per_s=tuple(prefill),
                    decode_tokens_per_s=tuple(decode),
                    peak_memory_bytes=own_bytes + max(0, peak.peak - peak.base),
                    device=peak.describe(),
                    timed_at=timed_at,
                )
            )
        return out

    def _timed_pass(self, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        """Seconds of one prefill of `ids` and of `new_tokens` greedy decode steps after it."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        step = self.model(ids, use_cache=True, logits_to_keep=1)
        sync()
        t1 = time.perf_counter()
        cache = step.past_key_values
        for _ in range(new_tokens):
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
            step = self.model(nxt, past_key_values=cache, use_cache=True)
        sync()
        return t1 - t0, time.perf_counter() - t1


class PeakMemory:
    """Peak memory while the block runs. CUDA: torch's peak of allocated bytes on the device
    (`max_memory_allocated`, reset on entry). CPU: the process's peak resident set size, VmHWM
    of /proc/self/status, reset on entry through /proc/self/clear_refs (Linux); where that reset
    is not possible, the process's lifetime peak (getrusage's ru_maxrss). Either way it counts
    the weights and everything else resident; `base` is the same measure on entry."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.peak = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = int(torch.cuda.memory_allocated(self.device))
            self.method = "cuda max_memory_allocated"
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"
        self.base = self._cpu_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = self._cpu_peak()

    def _cpu_peak(self) -> int:
        if self.method == "VmHWM":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def describe(self) -> str:
        """The device and how its peak was measured."""
        return f"{self.device} ({self.method})"
