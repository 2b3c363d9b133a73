"""Negative log-likelihood by token position over long texts (the paper's Figure 4).

Each sequence is `length` tokens of one text (a generated haystack corpus by default, or UTF-8
files cut into consecutive pieces), scored as one rolling request: every token's log-probability
given all tokens before it. Per-token NLL is averaged within log-spaced position buckets (so the
first tokens, where NLL falls fastest, get buckets of their own); a bucket's interval is over
sequences, which are independent. `nll` (position `all`) is each sequence's mean NLL averaged over
sequences: the sample score, so two models pair by sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from diffbench.api import (
    ALL,
    SCORE_KEY,
    FigureSpec,
    Headline,
    Item,
    Metric,
    Response,
    RollingRequest,
    Sample,
    TokenizerView,
    TokenLogprobs,
    aggregate_means,
)
from diffbench.errors import DiffbenchError

SETTING_KEYS = ("source", "length", "position")


@dataclass(frozen=True)
class NllConfig:
    """Options of the nll task; the defaults run in a minute per small model on a CPU."""

    text: tuple[str, ...] = ()  # UTF-8 files (cut into `length`-token pieces); empty: generated
    length: int = 512  # tokens per sequence
    sequences: int = 8
    buckets: int = 8  # log-spaced position buckets
    preset: str = ""

    def __post_init__(self) -> None:
        if self.length < 2 or self.sequences < 1 or self.buckets < 1:
            raise ValueError("length must be >= 2, sequences and buckets >= 1")
        for f in self.text:
            if not Path(f).expanduser().is_file():
                raise ValueError(f"text file {f} does not exist")


PRESETS: dict[str, dict[str, Any]] = {
    # Figure 4: book-length sequences, per-position NLL out to the model's context.
    "paper": {"length": 65536, "sequences": 32, "buckets": 16},
}


def bucket_edges(n: int, buckets: int) -> list[int]:
    """Log-spaced boundaries 0 = e0 < e1 < ... = n: bucket b holds positions [e_b, e_b+1)."""
    edges = np.unique(np.round(np.geomspace(1, n + 1, buckets + 1)).astype(int) - 1)
    edges[0], edges[-1] = 0, n
    return [int(e) for e in np.unique(edges)]


def _pieces(cfg: NllConfig, tok: TokenizerView, seed: int) -> list[tuple[str, str]]:
    """(source, text of `length` tokens) for each sequence."""
    out: list[tuple[str, str]] = []
    if not cfg.text:
        from diffbench.tasks.haystack import procedural_text

        for i in range(cfg.sequences):
            text = procedural_text(seed * 1000 + i, cfg.length * 8)
            if tok.count(text) < cfg.length:
                raise DiffbenchError(f"nll: generated text shorter than {cfg.length} tokens")
            out.append(("generated", text[: tok.char_offset(text, cfg.length)]))
        return out
    for f in cfg.text:
        rest = Path(f).expanduser().read_text(encoding="utf-8")
        while len(out) < cfg.sequences and tok.count(rest) >= cfg.length:
            cut = tok.char_offset(rest, cfg.length)
            out.append((Path(f).name, rest[:cut]))
            rest = rest[cut:]
    if not out:
        raise DiffbenchError(f"nll: no text file holds {cfg.length} tokens")
    return out


class NllTask:
    """The NLL-by-position task plugin."""

    name = "nll"
    description = "Per-token negative log-likelihood vs position in long texts (paper Fig. 4)"
    config_type = NllConfig
    presets = PRESETS
    metrics = (
        Metric("nll", "lower", "mean", unit="sequence"),
        # Each sample's `nll_at` maps a position bucket's last position to its mean NLL.
        Metric("nll_at", "lower", "mean", "nll_at", by="position", unit="sequence"),
    )
    setting_keys = SETTING_KEYS
    headline = (Headline("nll", {"position": ALL}),)

    # The paper's Figure 4 in miniature: NLL against position, a 95% band from the stderr.
    figures = (
        FigureSpec(
            "line",
            ("nll_at",),
            ("position",),
            "position_{source.stem}_{length}",
            "{source}, {length} tokens",
            per=("source", "length"),
            errors="band",
            x_label="token position",
            y_label="NLL (nats / token)",
            log_x=True,
        ),
    )

    def request_kinds(self, config: NllConfig) -> tuple[type, ...]:
        """The request kinds its items use, whatever the config."""
        return (RollingRequest,)

    def items(self, config: NllConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """One rolling request per sequence."""
        if config.length + 1 > tokenizer.max_context:
            raise DiffbenchError(
                f"nll: {config.length} tokens (and BOS) exceed the model's context of "
                f"{tokenizer.max_context}; lower --set nll.length"
            )
        return [
            Item(
                f"s{i}",
                RollingRequest(text=text),
                {"source": src, "length": config.length},
                {"sequence": i},
            )
            for i, (src, text) in enumerate(_pieces(config, tokenizer, seed))
        ]

    def score(self, config: NllConfig, item: Item, response: Response) -> Sample:
        """Each bucket's mean NLL, and the sequence's mean."""
        assert isinstance(response, TokenLogprobs)
        nll = -np.asarray(response.logprobs, dtype=float)
        edges = bucket_edges(len(nll), config.buckets)
        per_bucket = [float(nll[a:b].mean()) for a, b in itertools.pairwise(edges)]
        at = {str(end): x for end, x in zip(edges[1:], per_bucket, strict=True)}
        return {"n_tokens": len(nll), "edges": edges, "bucket_nll": per_bucket, "nll_at": at,
                SCORE_KEY: float(nll.mean())}  # fmt: skip

    def aggregate(self, config: NllConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """Per model: mean NLL over sequences (position all) and per position bucket (position:
        the bucket's last token position, 1-based), each with its stderr over sequences."""
        declared = {m.name: m for m in self.metrics}
        by = ("source", "length")
        # `nll` is each sequence's mean over all its positions; `nll_at` maps a bucket's last
        # position to its mean, so its rows take their position from the samples.
        overall = aggregate_means(self.name, samples, [declared["nll"]], by)
        buckets = aggregate_means(self.name, samples, [declared["nll_at"]], by)
        return pd.concat([overall.assign(position=ALL), buckets], ignore_index=True)


TASK = NllTask()
