"""The HF backend's probes: activation statistics and attention allocation, read through the
hooks of probes.py while the model runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffbench.api import ActivationRequest, ActivationStats, AttentionMass, AttentionRequest
from diffbench.backends import probes
from diffbench.backends.hf_load import HFModel
from diffbench.backends.tokens import check_fits, encode_prompt
from diffbench.errors import DiffbenchError


@torch.inference_mode()
def activation_stats(m: HFModel, requests: Sequence[ActivationRequest]) -> list[ActivationStats]:
    """Per text, statistics of each decoder layer's attention logits and outputs (see
    ActivationRequest), batched with right padding; padding never enters a statistic."""
    encoded = [encode_prompt(m.tokenizer, r.text) for r in requests]
    for ids, r in zip(encoded, requests, strict=True):
        unknown = [a for a in r.activations if a not in probes.ACTIVATIONS]
        if unknown or not r.activations:
            raise DiffbenchError(
                f"unknown activation type {(unknown or [''])[0]!r}; choose from "
                f"{', '.join(probes.ACTIVATIONS)}"
            )
        if r.top_k < 1:
            raise DiffbenchError(f"an activation request's top_k must be >= 1, got {r.top_k}")
        check_fits(m.info, len(ids), "an activation request")
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
            stats = _activation_batch(m, [encoded[i] for i in chunk], requests[chunk[0]])
            results.update(zip(chunk, stats, strict=True))
            return chunk

        done = set(m.with_oom_retry(run_batch))
        order = [i for i in order if i not in done]
    return [results[i] for i in range(len(requests))]


def _activation_batch(
    m: HFModel, batch: list[list[int]], request: ActivationRequest
) -> list[ActivationStats]:
    width = max(len(ids) for ids in batch)
    pad = int(m.tokenizer.pad_token_id)
    # Right padding: every text keeps positions 0..n-1, as when run alone.
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch])
    valid = torch.tensor([[True] * len(ids) + [False] * (width - len(ids)) for ids in batch])
    probe = probes.ActivationProbe(request.activations, request.top_k, valid.to(m.device))
    with probes.probing(m.model, probe):
        m.model(
            input_ids=input_ids.to(m.device),
            attention_mask=valid.long().to(m.device),
            logits_to_keep=1,
        )
    _check_all_layers(m, probe, "attention_logits" in request.activations)
    return [
        ActivationStats(n_tokens=len(ids), summaries=tuple(probe.summaries(row)))
        for row, ids in enumerate(batch)
    ]


def _check_all_layers(m: HFModel, probe: probes.Probe, needed: bool = True) -> None:
    n = len(probes.decoder_layers(m.model))
    if needed and len(probe.layers_seen) < n:
        raise DiffbenchError(
            f"model {m.info.label!r} ({m.info.architecture}) did not call the attention "
            f"registry in {n - len(probe.layers_seen)} of its {n} layers, so its attention "
            "cannot be probed"
        )


@torch.inference_mode()
def attention_mass(m: HFModel, requests: Sequence[AttentionRequest]) -> list[AttentionMass]:
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
        ids = encode_prompt(m.tokenizer, r.prompt)
        check_fits(m.info, len(ids), "an attention request")
        enc = m.tokenizer(r.prompt, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
        offsets = [(0, 0)] * (len(ids) - len(offsets)) + offsets  # BOS covers no character
        probe = probes.AllocationProbe(probes.token_span_mask(offsets, r.spans))
        with probes.probing(m.model, probe):
            m.model(torch.tensor([ids], device=m.device), logits_to_keep=1)
        _check_all_layers(m, probe)
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
