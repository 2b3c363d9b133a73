"""Activation outliers (the paper's Table 5): the largest |activations| of a model, and the median.

Protocol: ../shared/paper-protocols.md section 4. A text source (`text`: a generated corpus by
default, or a UTF-8 file) is cut into sequences of `length` tokens until `tokens` tokens are
covered (a file shorter than that is used whole). For each sequence the backend summarises, per
layer, each activation type asked for (`ActivationRequest`): `attention_logits`, the pre-softmax
QK^T x scale at causal positions (for a DIFF model both maps together, and each map alone), and
`hidden_states`, each decoder layer's output. The task merges those summaries over sequences and
then over layers (`layer` = "all"):

- `top1`, `top2`, `top3`, `top10`, `top100`: the k-th largest |x| (exact: the union of per-layer,
  per-sequence top-100 lists holds the global top 100). `inf_norm` is the largest |x| (= top1).
- `median`: the lower median of |x| (the value of rank floor((n-1)/2) in ascending order, as
  `torch.median` defines it), read from the merged |x| histogram whose bins are 1/64 octave wide
  (api.HIST_BINS_PER_OCTAVE); the bin's geometric midpoint is reported, so the value is within a
  factor 2^(+-1/128) of the exact one: a relative error of at most 0.55% (`median_relative_error`).
- `kurtosis`: Pearson's kurtosis of the signed values (normal = 3), from the merged sums of x, x^2,
  x^3, x^4 in float64.

Rows carry the setting columns `activation`, `layer` (an integer, or "all") and `map`: "all" for
hidden states, a Transformer's logits and a DIFF model's two maps together (so the paper's rows
line up across models), "1" and "2" for each DIFF map alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from diffbench.api import (
    ALL,
    HIST_BINS_PER_OCTAVE,
    ZERO_BIN,
    ActivationRequest,
    ActivationStats,
    ActivationSummary,
    FigureSpec,
    Headline,
    Item,
    Metric,
    PaperRef,
    Response,
    Sample,
    TokenizerView,
    merge_summaries,
    summary_kurtosis,
    summary_quantile,
)
from diffbench.errors import DiffbenchError
from diffbench.tasks import haystack as hs

ACTIVATIONS = ("attention_logits", "hidden_states")
TOP_KS = (1, 2, 3, 10, 100)
POOLED = "over the values of every sequence pooled; shown without a test"
METRICS = ("top1", "top2", "top3", "top10", "top100", "median", "kurtosis", "inf_norm")
SETTING_KEYS = ("activation", "layer", "map")
GENERATED = "generated"


def median_relative_error(bins_per_octave: int = HIST_BINS_PER_OCTAVE) -> float:
    """The bound on |median read from the histogram / exact median - 1|."""
    return 2 ** (1 / (2 * bins_per_octave)) - 1


@dataclass(frozen=True)
class OutliersConfig:
    """Options of the outliers task; the defaults run in seconds per small model on a CPU."""

    text: str = GENERATED  # generated | the path of a UTF-8 text file
    tokens: int = 4096  # token budget over all sequences (the paper: 0.4M, preset `paper`)
    length: int = 512  # tokens per sequence (special tokens included)
    activations: tuple[str, ...] = ACTIVATIONS
    preset: str = ""

    def __post_init__(self) -> None:
        bad = [a for a in self.activations if a not in ACTIVATIONS]
        if bad or not self.activations:
            raise ValueError(
                f"unknown activation type {', '.join(bad) or '(none)'}; known: "
                f"{', '.join(ACTIVATIONS)}"
            )
        if len(set(self.activations)) != len(self.activations):
            raise ValueError("activations names a type twice")
        if self.tokens < 1 or self.length < 2:
            raise ValueError("tokens must be >= 1 and length >= 2")


PRESETS: dict[str, dict[str, Any]] = {
    # Table 5: statistics gathered from 0.4M tokens (the paper gives no sequence length).
    "paper": {"tokens": 400_000},
}


# ---- the text ------------------------------------------------------------------------------


def generated_document(seed: int, n_chars: int) -> str:
    """Haystack prose holding needle facts, each later asked and answered: the text shape the
    retrieval tasks (and the shipped pair's training) use."""
    rng = random.Random(f"outliers|{seed}")
    stream = hs.sentences(rng.randrange(2**31))
    parts: list[str] = []
    facts: list[tuple[str, str]] = []
    total = 0
    while total < n_chars:
        if rng.random() < 0.08:
            city, number = rng.choice(hs.CITIES), hs.magic_number(rng)
            facts.append((city, number))
            piece = hs.NEEDLE.format(city=city, number=number)
        elif facts and rng.random() < 0.05:
            city, number = facts.pop(rng.randrange(len(facts)))
            piece = (
                f"\n\n{hs.QUESTION.format(city=city)}\n"
                f"{hs.ANSWER_PREFIX.format(city=city)} {number}.\n\n"
            )
        else:
            piece = next(stream)
        parts.append(piece)
        total += len(piece) + 1
    return " ".join(parts)


def _file_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DiffbenchError(f"cannot read outliers.text file {path}: {err}") from None
    if not text.strip():
        raise DiffbenchError(f"outliers.text file {path} is empty")
    return text


def sequences(cfg: OutliersConfig, tok: TokenizerView, seed: int) -> Iterator[str]:
    """Texts of `length` tokens each (as the backend encodes them), `tokens` in all."""
    special = tok.prompt_tokens("a") - tok.count("a")  # BOS and the like, added by the backend
    budget = cfg.length - special
    if budget < 1:
        raise DiffbenchError(f"outliers.length {cfg.length} leaves no room for text")
    n_seqs = math.ceil(cfg.tokens / cfg.length)
    source = None if cfg.text == GENERATED else _file_text(Path(cfg.text))
    pos = 0
    for i in range(n_seqs):
        if source is None:
            window = generated_document(seed * 1_000_003 + i, budget * 8)
        else:
            if pos >= len(source):
                return  # a file shorter than the budget is used whole
            window = source[pos : pos + budget * 16]
        cut = tok.char_offset(window, budget)
        if cut <= 0:
            return
        pos += cut
        yield window[:cut]


# ---- merging the backend's summaries (api.merge_summaries, summary_quantile, summary_kurtosis) --


def kth_largest(top: Sequence[float], k: int) -> float:
    """The k-th largest value (k from 1) of a descending top list; NaN where it has fewer."""
    return float(top[k - 1]) if len(top) >= k else float("nan")


def summary_values(s: ActivationSummary) -> dict[str, float]:
    """Every metric of one (merged) summary."""
    out = {f"top{k}": kth_largest(s.top, k) for k in TOP_KS}
    out["median"] = summary_quantile(s, 0.5)
    out["kurtosis"] = float(summary_kurtosis(s))
    out["inf_norm"] = float(s.top[0]) if s.top else float("nan")
    return out


def summary_record(s: ActivationSummary) -> dict[str, Any]:
    """One backend summary as a sample stores it: the histogram dense from its lowest bin."""
    zeros = sum(c for b, c in s.histogram if b == ZERO_BIN)
    bins = {b: c for b, c in s.histogram if b != ZERO_BIN}
    lo = min(bins, default=0)
    dense = [0] * (max(bins, default=-1) - lo + 1)
    for b, c in bins.items():
        dense[b - lo] += c
    return {
        "activation": s.activation,
        "layer": s.layer,
        "map": s.map,
        "count": s.count,
        "moments": list(s.moments),
        "top": [round(float(x), 6) for x in s.top],
        "zeros": zeros,
        "hist_lo": lo,
        "hist": dense,
    }


def summary_from_record(r: Mapping[str, Any]) -> ActivationSummary:
    """A stored summary back as the backend's type."""
    hist = [(b, int(c)) for b, c in enumerate(r["hist"], start=int(r["hist_lo"])) if c]
    zeros = [(ZERO_BIN, int(r["zeros"]))] if r["zeros"] else []
    m0, m1, m2, m3 = (float(m) for m in r["moments"])
    return ActivationSummary(
        str(r["activation"]), int(r["layer"]), str(r["map"]), int(r["count"]),
        (m0, m1, m2, m3), tuple(float(x) for x in r["top"]), tuple(zeros + hist),
    )  # fmt: skip


def _map_setting(activation: str, map_: str) -> str:
    """A row's `map`: every map together is ALL (so models' rows line up); '1', '2' stay."""
    return map_ if activation == "attention_logits" and map_ in ("1", "2") else ALL


def merge_records(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], Any]:
    """(activation, layer, map) -> the merged summary, with layer ALL over every layer."""
    parts: dict[tuple[str, int, str], list[ActivationSummary]] = {}
    for r in records:
        key = (str(r["activation"]), int(r["layer"]), _map_setting(r["activation"], r["map"]))
        parts.setdefault(key, []).append(summary_from_record(r))
    per_layer = {k: merge_summaries(v) for k, v in sorted(parts.items())}
    out: dict[tuple[str, str, str], ActivationSummary] = {}
    layers: dict[tuple[str, str], list[ActivationSummary]] = {}
    for (activation, layer, map_), merged in per_layer.items():
        out[(activation, str(layer), map_)] = merged
        layers.setdefault((activation, map_), []).append(merged)
    for (activation, map_), lst in layers.items():
        out[(activation, ALL, map_)] = merge_summaries(lst, layer=-1)
    return out


# ---- the task ------------------------------------------------------------------------------


class OutliersTask:
    """The activation-outlier task plugin."""

    name = "outliers"
    description = "Activation outliers: top-k |attention logits| and |hidden states| (Table 5)"
    config_type = OutliersConfig
    presets = PRESETS
    # Fewer and smaller outliers is what DIFF claims; the median has no better direction. Each
    # is one number over the values of every sequence pooled, so it gets no interval or test.
    metrics = tuple(
        Metric(m, "none" if m == "median" else "lower", "statistic", unit="sequence", note=POOLED)
        for m in METRICS
    )
    setting_keys = SETTING_KEYS
    # The paper's Table 5: top-k and median over every layer, both maps of a DIFF model together.
    headline = tuple(
        Headline(m, {"layer": ALL, "map": ALL})
        for m in ("top1", "top2", "top3", "top10", "top100", "median")
    )
    # The paper's numbers beside the run's (report.md's first section).
    paper = (
        PaperRef(
            "Table 5",
            "Largest |activation| (top-1)",
            "top1",
            {"layer": ALL, "map": ALL},
            by=("activation",),
            transformer={"attention_logits": "318.0", "hidden_states": "3608.6"},
            diff={"attention_logits": "38.8", "hidden_states": "1688.2"},
            note="over 0.4M tokens, every layer, a DIFF model's two maps together",
        ),
        PaperRef(
            "Table 5",
            "Median |activation|",
            "median",
            {"layer": ALL, "map": ALL},
            by=("activation",),
            transformer={"attention_logits": "5.4", "hidden_states": "0.6"},
            diff={"attention_logits": "3.3", "hidden_states": "1.2"},
            note="over 0.4M tokens, every layer, a DIFF model's two maps together",
        ),
    )

    # Top-1 |activation| per layer, log scale, a panel per activation type; a DIFF model's maps
    # 1 and 2 dashed and dotted beside both together.
    figures = (
        FigureSpec(
            "line",
            ("top1",),
            ("layer",),
            "top1_per_layer",
            "Top-1 |activation| per layer",
            panels="activation",
            style="map",
            x_label="layer",
            y_label="top-1 |activation|",
            log_y=True,
            share_y=False,
        ),
    )

    def request_kinds(self, config: OutliersConfig) -> tuple[type, ...]:
        """The request kinds its items use, whatever the config."""
        return (ActivationRequest,)

    def items(self, config: OutliersConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """One activation request per sequence."""
        if config.length > tokenizer.max_context:
            raise DiffbenchError(
                f"outliers.length {config.length} is beyond the model's maximum context of "
                f"{tokenizer.max_context} tokens; lower --set outliers.length"
            )
        top_k = max(TOP_KS)
        return [
            Item(f"seq{i}", ActivationRequest(text, tuple(config.activations), top_k), {})
            for i, text in enumerate(sequences(config, tokenizer, seed))
        ]

    def score(self, config: OutliersConfig, item: Item, response: Response) -> Sample:
        """The sequence's summaries, kept whole for merging."""
        assert isinstance(response, ActivationStats)
        return {
            "n_tokens": response.n_tokens,
            "summaries": [summary_record(s) for s in response.summaries],
        }

    def aggregate(self, config: OutliersConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """Every metric per model, activation, layer (and all layers) and map; `n` is the number
        of sequences (samples) behind the row, not of the values pooled from them."""
        rows = []
        for model, group in samples.groupby("model", sort=True):
            merged = merge_records(r for lst in group["summaries"] for r in lst)
            # Each sequence counts once in every row its summaries reach (a DIFF layer's maps
            # 1 and 2 both reach map "all"; every layer reaches layer "all").
            sequences: dict[tuple[str, str, str], int] = {}
            for lst in group["summaries"]:
                reached = set()
                for r in lst:
                    activation, map_ = str(r["activation"]), _map_setting(r["activation"], r["map"])
                    reached |= {(activation, str(r["layer"]), map_), (activation, ALL, map_)}
                for key in reached:
                    sequences[key] = sequences.get(key, 0) + 1
            for (activation, layer, map_), m in merged.items():
                for metric, value in summary_values(m).items():
                    rows.append(
                        {"task": self.name, "metric": metric, "model": model, "value": value,
                         "n": sequences[(activation, layer, map_)], "stderr": float("nan"),
                         "activation": activation, "layer": str(layer), "map": map_}
                    )  # fmt: skip
        return pd.DataFrame(rows)


TASK = OutliersTask()
