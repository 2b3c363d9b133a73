"""Sweep variants (labels LABEL@KEY=VALUE, `config.variant_label`) and whom each is compared with:
one rule, shared by the report and by `diffbench compare --models`.

A model is compared with the reference model at the same swept value: diff@logit_bits=8 with
base@logit_bits=8, an unswept diff with the unswept base, and never across values (not with
base@logit_bits=16, nor with the unswept base). A variant whose reference variant at its value is
absent gets no comparison with the reference. Each variant is also compared with its own model's
variant at its key's first value (the first such label in the run's model order, which is the
order the sweep gave its values): diff@logit_bits=8 with diff@logit_bits=16. Variants under two
keys (runs of two sweeps, merged) pair within each key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffbench.config import split_variant


def base_of(label: str) -> str:
    """The model a label is a variant of; the label itself when it is no variant."""
    variant = split_variant(label)
    return label if variant is None else variant[0]


def value_of(label: str) -> tuple[str, str] | None:
    """(key, value) of a variant's swept option; None for an unswept model."""
    variant = split_variant(label)
    return None if variant is None else (variant[1], variant[2])


@dataclass(frozen=True)
class Pair:
    """`model` compared with `against`: the reference at model's swept value, or (`within`) the
    model's own variant at the first value of its key."""

    against: str
    model: str
    within: bool = False


def pairs(models: Sequence[str], reference: str) -> list[Pair]:
    """Every comparison among `models` (in their order) with the reference model, named by its
    label or any of its variants' labels (the reference is a model, its variants included)."""
    ref_base = base_of(reference)
    # Looked up by (base, value), not rebuilt with variant_label: a merged run's label keeps its
    # `@<run>` tail after KEY=VALUE.
    at = {(base_of(m), value_of(m)): m for m in models}
    first: dict[tuple[str, str], str] = {}
    out: list[Pair] = []
    for m in models:
        base, value = base_of(m), value_of(m)
        same = at.get((ref_base, value))
        if base != ref_base and same is not None:
            out.append(Pair(same, m))
        if value is not None:
            own = first.setdefault((base, value[0]), m)
            if own != m:
                out.append(Pair(own, m, within=True))
    return out
