"""The tokenization and identity contract every backend shares: prompt and choice encoding, the
windows of a rolling request, the tokenizer view tasks see, the context check, and a
checkpoint's fingerprint.

Two backends that encode with these functions hand their models the same tokens, so their scores
agree (the vLLM backend is tested against the HF one token for token). Nothing here imports
torch: a backend that runs elsewhere (an engine, a server) imports this module alone. The
tokenizer is any transformers tokenizer (`PreTrainedTokenizerBase`), used only through its
Python interface.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffbench.api import ChoiceRequest, ModelInfo, RollingRequest
from diffbench.errors import DiffbenchError
from diffbench.models import LoadTarget

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Every file AutoTokenizer may read: the same weights behind other tokens are another model as far
# as scores go.
TOKENIZER_FILES = (
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
# Per tokenizer (so per backend), whether it adds a BOS token: asked once, not per request.
_ADDS_BOS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, bool] = weakref.WeakKeyDictionary()


def adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text (decided once per tokenizer:
    two tokenizer calls, then cached beside it)."""
    known = _ADDS_BOS.get(tok)
    if known is None:
        bos = tok.bos_token_id
        known = bos is not None and len(tok("x", add_special_tokens=True)["input_ids"]) > len(
            tok("x", add_special_tokens=False)["input_ids"]
        )
        _ADDS_BOS[tok] = known
    return known


def encode_prompt(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt: BOS once (when the tokenizer uses one), never inside the text."""
    return encode_prompts(tok, [text])[0]


def encode_prompts(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode_prompt` of several texts in one tokenizer call."""
    encoded: list[list[int]] = tok(texts, add_special_tokens=False)["input_ids"]
    if not adds_bos(tok):
        return [list(ids) for ids in encoded]
    bos = int(tok.bos_token_id)
    return [list(ids) if ids and ids[0] == bos else [bos, *ids] for ids in encoded]


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
    choice's tokens are what follows the context's own token count.

    The context is encoded once; each choice is encoded only with the context's tail from its
    last word boundary (see `context_tail`), whose tokens are checked to be the context's last
    tokens: the head before it is the context's own tokens, shared by every choice."""
    context = r.prefix + r.query
    stripped = context.rstrip()
    moved = context[len(stripped) :]
    (ctx,) = encode_prompts(tok, [stripped])
    if not ctx:
        raise DiffbenchError("a choice request has an empty context and the model has no BOS token")
    tail, n_tail = context_tail(tok, stripped, ctx)
    # lm-eval's split: whole[len(ctx):], whole = ctx[: len(ctx) - n_tail] + tail's encoding.
    pieces = tok([tail + moved + c for c in r.choices], add_special_tokens=False)["input_ids"]
    conts = [[int(t) for t in p[n_tail:]] for p in pieces]
    if any(not c for c in conts):
        raise DiffbenchError("a choice encodes to no tokens")
    end_tokens: list[int | None] = [None] * len(conts)
    if r.method == "greedy":
        extended = {
            i for i, c in enumerate(conts) for o in conts if len(o) > len(c) and o[: len(c)] == c
        }
        for i in sorted(extended):
            whole = ctx[: len(ctx) - n_tail] + list(pieces[i])
            end_tokens[i] = _end_token(tok, stripped + moved + r.choices[i], whole, r.end)
    return EncodedChoices(ctx, conts, end_tokens)


def context_tail(tok: PreTrainedTokenizerBase, context: str, ids: list[int]) -> tuple[str, int]:
    """The context's tail that its choices are encoded with, and its token count: from the
    start of the context's last word (a space or newline after a non-space character), where
    a pre-tokenizer splits whatever follows, provided the tail alone encodes to the context's
    last tokens (`ids`, the context's encoding); else the whole context (and BOS)."""
    for cut in range(len(context) - 1, 0, -1):
        if context[cut] in " \n" and not context[cut - 1].isspace():
            tail = context[cut:]
            alone = tok(tail, add_special_tokens=False)["input_ids"]
            n = len(alone)
            if 0 < n < len(ids) and ids[len(ids) - n :] == list(alone):
                return tail, n
            break
    return context, len(ids) - int(adds_bos(tok) and bool(ids) and ids[0] == tok.bos_token_id)


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


@dataclass(frozen=True)
class RollingWindow:
    """One forward pass of a rolling request: it reads `seq[start:end]` and scores its last
    `n_new` positions, whose targets are `seq[end - n_new + 1 : end + 1]`."""

    start: int
    end: int
    n_new: int


@dataclass(frozen=True)
class RollingPlan:
    """A rolling request's tokens and windows (see RollingRequest): `ids` are the text's tokens,
    every one a target; `seq` is the BOS (or EOS) token followed by them, so `seq[k + 1]` =
    `ids[k]` is predicted from `seq[: k + 1]`."""

    ids: list[int]
    seq: list[int]
    windows: tuple[RollingWindow, ...]


def plan_rolling(tok: PreTrainedTokenizerBase, info: ModelInfo, r: RollingRequest) -> RollingPlan:
    """The windows of the model's context that score every token of `r.text`: the first holds a
    whole context, each next one `r.stride` new tokens (0: a whole context, lm-eval's disjoint
    `loglikelihood_rolling` windows) after as many earlier ones as fit."""
    window = info.max_context
    first = tok.bos_token_id
    if first is None:
        first = tok.eos_token_id
    if first is None:
        raise DiffbenchError(f"model {info.label!r} has neither a BOS nor an EOS token")
    stride = r.stride or window
    if not 0 < stride <= window:
        raise DiffbenchError(
            f"a rolling stride of {r.stride} tokens is outside 1..{window}, the "
            f"context of model {info.label!r}"
        )
    ids = [int(t) for t in tok(r.text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise DiffbenchError("a rolling request's text encodes to no tokens")
    windows = []
    done = 0
    while done < len(ids):
        n_new = min(window if done == 0 else stride, len(ids) - done)
        end = done + n_new
        windows.append(RollingWindow(max(0, end - window), end, n_new))
        done = end
    return RollingPlan(ids, [int(first), *ids], tuple(windows))


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every sequence in `seqs` shares."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def check_fits(info: ModelInfo, n_tokens: int, what: str) -> None:
    """Refuse `what` (a request, in words) when its `n_tokens` exceed the model's context."""
    if n_tokens > info.max_context:
        raise DiffbenchError(
            f"{what} needs {n_tokens} tokens, beyond model {info.label!r}'s maximum "
            f"context of {info.max_context}"
        )


class HFTokenizerView:
    """A transformers tokenizer as tasks see it (the `TokenizerView` of api.py)."""

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

    def encode(self, prompt: str) -> list[int]:
        """A rendered prompt's token ids as the backend will encode it."""
        return encode_prompt(self._tok, prompt)


def fingerprint(target: LoadTarget, *variant: str) -> str:
    """`sha256:<weights>;tokenizer:<files>` of a local checkpoint (a GGUF file holds both).

    A hub snapshot adds `commit:<folder name>` in front; an id not on disk is `hub:<id>`.
    `variant` parts (what else changes every score: logit quantization, `logits:4bit-tensor`)
    follow, each after a `;`, so a plain load's fingerprint is the weights' and tokenizer's alone.
    """
    return ";".join([_weights_fingerprint(target), *variant])


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
        # Names are hashed too, so moving content between files counts.
        tokenizer = hashlib.sha256()
        for name in TOKENIZER_FILES:
            if (root / name).is_file():
                tokenizer.update(f"{name}\0{(root / name).stat().st_size}\0".encode())
                tokenizer.update((root / name).read_bytes())
        parts.append(f"tokenizer:{tokenizer.hexdigest()}")
    if "snapshots" in root.parts:  # a hub cache snapshot: the folder name is the commit
        parts.insert(0, f"commit:{root.name}")
    return ";".join(parts)
