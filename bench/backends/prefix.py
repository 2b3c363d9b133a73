"""One KV cache kept across requests, so that each distinct prompt token is computed once.

Requests that share a prefix (a NIAH haystack up to its shallower needle, the generate and score
prompts of one sample, an ICL block of demonstrations) are answered one after the other from a
single cache: before a prompt is prefilled, the cache is cropped to the longest token prefix it
shares with what the cache holds, and only the rest is computed. Taken in sorted token order, a
set of prompts costs exactly one forward per node of their token trie (for sorted sequences, the
longest prefix a sequence shares with any earlier one is the one it shares with its predecessor).

Greedy decoding then runs from that cache one token at a time: argmax of the logits, its own stop
strings and token budget, the model's end-of-sequence tokens, as `model.generate` does for greedy
search. Its outputs are those of unshared generation; the logits of a prompt's suffix computed over
a cached prefix differ from a full pass only by floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffbench.backends.tokens import common_prefix
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["PrefixCache", "common_prefix", "end_token_ids", "greedy"]


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end a generation: the generation config's, else the tokenizer's EOS."""
    eos: Any = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}


class PrefixCache:
    """The KV cache of the last token sequence a model was run on, reused where the next shares
    a prefix with it. `computed` counts the tokens actually run through the model."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.ids: list[int] = []
        self.cache: DynamicCache | None = None
        self.computed = 0

    def clear(self) -> None:
        """Forget the cache (frees its memory)."""
        self.ids, self.cache = [], None

    @torch.inference_mode()
    def extend(self, ids: Sequence[int]) -> tuple[DynamicCache, torch.Tensor]:
        """The cache holding exactly `ids`, and the logits after its last token.

        At least the last token is run again, since its logits are not kept."""
        if not ids:
            raise ValueError("an empty token sequence has no logits")
        keep = min(common_prefix([self.ids, ids]), len(ids) - 1) if self.cache is not None else 0
        if keep == 0 or self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
            keep = 0
        elif self.cache.get_seq_length() > keep:
            self.cache.crop(keep - self.cache.get_seq_length())
        rest = list(ids[keep:])
        device = self.model.device
        out = self.model(
            input_ids=torch.tensor([rest], device=device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.computed += len(rest)
        self.ids = list(ids)
        return self.cache, out.logits[0, -1]

    def note(self, ids: Sequence[int]) -> None:
        """Record that the cache now holds `ids` (after a caller extended or cropped it)."""
        self.ids = list(ids)


@torch.inference_mode()
def greedy(
    prefix_cache: PrefixCache,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[int],
    max_new_tokens: int,
    stop: Sequence[str],
    end_ids: set[int],
) -> tuple[list[int], str]:
    """Greedy continuation of `prompt` from the shared cache: its new tokens (through the stop
    string, the budget or an end token, which is kept) and their text cut at the first stop
    string."""
    cache, logits = prefix_cache.extend(prompt)
    device = prefix_cache.model.device
    fed = list(prompt)
    new: list[int] = []
    while len(new) < max_new_tokens:
        token = int(torch.argmax(logits))
        new.append(token)
        if token in end_ids:
            break
        if stop:
            text = tokenizer.decode(new, skip_special_tokens=True)
            if any(s in text for s in stop):
                break
        if len(new) == max_new_tokens:
            break
        out = prefix_cache.model(
            input_ids=torch.tensor([[token]], device=device),
            past_key_values=cache,
            use_cache=True,
        )
        prefix_cache.computed += 1
        fed.append(token)
        logits = out.logits[0, -1]
    prefix_cache.note(fed)
    text = str(tokenizer.decode(new, skip_special_tokens=True))
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return new, text[:cut] if cut >= 0 else text
