"""Greedy generation on the HF backend: one request at a time from the shared prefix cache, or
left-padded batches in which every row stops at its own stop strings and budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffbench.api import GenerateRequest, Generation
from diffbench.backends.hf_load import HFModel
from diffbench.backends.prefix import greedy
from diffbench.backends.tokens import check_fits, encode_prompts
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList


def generate(m: HFModel, requests: Sequence[GenerateRequest]) -> list[Generation]:
    """Each request's greedy continuation, cut at its first stop string."""
    encoded = encode_prompts(m.tokenizer, [r.prompt for r in requests])
    for ids, r in zip(encoded, requests, strict=True):
        check_fits(m.info, len(ids) + r.max_new_tokens, "a generation request")
    if m.batch_size == 1:
        return _generate_shared(m, encoded, requests)
    # Longest first, so memory trouble shows at once and padding within a batch is small.
    order = sorted(range(len(requests)), key=lambda i: (-len(encoded[i]), i))
    results: dict[int, Generation] = {}
    start = 0
    while start < len(order):

        def run_batch(bs: int, start: int = start) -> tuple[list[int], list[Generation]]:
            chunk = order[start : start + bs]
            batch = [encoded[i] for i in chunk]
            return chunk, _generate_batch(m, batch, [requests[i] for i in chunk])

        chunk, gens = m.with_oom_retry(run_batch)
        for i, gen in zip(chunk, gens, strict=True):
            results[i] = gen
        start += len(chunk)
    return [results[i] for i in range(len(requests))]


def _generate_shared(
    m: HFModel, encoded: list[list[int]], requests: Sequence[GenerateRequest]
) -> list[Generation]:
    """One request at a time in sorted token order from the prefix cache: each prompt
    computes only the tokens after the prefix it shares with the one before it."""
    results: dict[int, Generation] = {}
    for i in sorted(range(len(requests)), key=lambda i: encoded[i]):
        if not m.options.prefix_cache:
            m.prefix.clear()
        r = requests[i]
        new, text = greedy(m.prefix, m.tokenizer, encoded[i], r.max_new_tokens, r.stop, m.end_ids)
        results[i] = Generation(text, len(encoded[i]), len(new))
    return [results[i] for i in range(len(requests))]


@torch.inference_mode()
def _generate_batch(
    m: HFModel, batch: list[list[int]], requests: list[GenerateRequest]
) -> list[Generation]:
    width = max(len(ids) for ids in batch)
    pad = int(m.tokenizer.pad_token_id)
    # Left padding: every row's last prompt token sits at the same column.
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    stops = _RowStops(m.tokenizer, width, requests)
    out = m.model.generate(
        input_ids=input_ids.to(m.device),
        attention_mask=mask.to(m.device),
        max_new_tokens=max(r.max_new_tokens for r in requests),
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
        stopping_criteria=StoppingCriteriaList([stops]),
    )
    eos = m.tokenizer.eos_token_id
    gens = []
    for k, (row, ids, r) in enumerate(zip(out[:, width:].tolist(), batch, requests, strict=True)):
        # A row's own end: its stop string, its budget or EOS; what the batch ran on after
        # that (padding, or tokens for longer budgets) is not part of it.
        n_new = stops.finished_at[k] or len(row)
        n_new = next((j + 1 for j, t in enumerate(row[:n_new]) if t == eos), n_new)
        text = str(m.tokenizer.decode(row[:n_new], skip_special_tokens=True))
        cut = min((text.find(s) for s in r.stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        gens.append(Generation(text=text, n_prompt_tokens=len(ids), n_new_tokens=n_new))
    return gens


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
