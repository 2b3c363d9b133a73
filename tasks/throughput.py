"""Throughput (the paper's Table 7): prefill and decode tokens/s per model and context length.

Protocol: ../shared/paper-protocols.md section 5. For each context length the backend times a
forward pass over that many tokens (prefill) and `new_tokens` greedy decode steps after it,
`warmup` untimed times and then `repeats` timed times (`ThroughputRequest`); the rows hold the
median over repeats, and the peak memory of the timed work. The paper reports the DIFF model's
rate relative to the Transformer's: the `*_relative` rows are each model's median rate over the
reference model's, minus 1 (-0.09 is the paper's "-9%"); the reference is `reference`, or when
that is empty (or not a model of the run) the alphabetically first model label. On a CPU the
absolute numbers say little; the ratio is the point.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from diffbench.api import (
    LARGEST,
    Headline,
    Item,
    Metric,
    PaperRef,
    Response,
    Sample,
    Throughput,
    ThroughputRequest,
    TokenizerView,
)
from diffbench.errors import DiffbenchError

log = logging.getLogger("diffbench")

MEDIAN = "the median over timed repeats; shown without a test"
RATES = ("prefill_tokens_per_s", "decode_tokens_per_s")
RELATIVE = {"prefill_tokens_per_s": "prefill_relative", "decode_tokens_per_s": "decode_relative"}


@dataclass(frozen=True)
class ThroughputConfig:
    """Options of the throughput task; the defaults take seconds per tiny model on a CPU."""

    lengths: tuple[int, ...] = (256, 512)
    new_tokens: int = 16
    repeats: int = 3
    warmup: int = 1
    reference: str = ""  # model label the relative rows divide by (empty: first label)
    preset: str = ""

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError("lengths must be positive token counts")
        if self.new_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("new_tokens and repeats must be >= 1, warmup >= 0")


PRESETS: dict[str, dict[str, Any]] = {
    # Table 7: 2K and 4K contexts (the paper times training too, which diffbench does not).
    "paper": {"lengths": (2048, 4096), "repeats": 5, "warmup": 2, "new_tokens": 128},
}


class ThroughputTask:
    """The throughput task plugin."""

    name = "throughput"
    description = "Prefill and decode tokens/s and peak memory per context length (Table 7)"
    config_type = ThroughputConfig
    presets = PRESETS
    metrics = (
        *(Metric(m, "higher", "statistic", unit="timing repeat", note=MEDIAN) for m in RATES),
        *(
            Metric(m, "higher", "statistic", unit="timing repeat", note=MEDIAN)
            for m in RELATIVE.values()
        ),
        Metric("peak_memory_mb", "lower", "statistic", unit="timing repeat", note=MEDIAN),
    )
    setting_keys = ("length",)
    headline = (
        Headline("prefill_tokens_per_s"),
        Headline("decode_tokens_per_s"),
        Headline("prefill_relative"),
        Headline("decode_relative"),
    )
    # The paper's number beside the run's (report.md's first section).
    paper = (
        PaperRef(
            "Table 7",
            "Forward (prefill) throughput relative to the reference model",
            "prefill_relative",
            {"length": LARGEST},
            transformer={"": "0.00"},
            diff={"": "-0.09"},
            note="H100, 2K context (4K: -0.10; training: -0.09 at 2K, not measured here); the "
            "Transformer is the reference; the run: its largest length",
        ),
    )
    request_kinds = (ThroughputRequest,)

    def items(self, config: ThroughputConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """One timing request per context length."""
        out = []
        for n in sorted(set(config.lengths)):
            if n + config.new_tokens > tokenizer.max_context:
                raise DiffbenchError(
                    f"throughput length {n} + {config.new_tokens} new tokens is beyond the "
                    f"model's maximum context of {tokenizer.max_context}; lower "
                    "--set throughput.lengths"
                )
            request = ThroughputRequest(n, config.new_tokens, config.repeats, config.warmup)
            out.append(Item(f"L{n}", request, {"length": n}))
        return out

    def score(self, config: ThroughputConfig, item: Item, response: Response) -> Sample:
        """Every repeat's rates, their medians and the peak memory."""
        assert isinstance(response, Throughput)
        return {
            "prefill_tokens_per_s": statistics.median(response.prefill_tokens_per_s),
            "decode_tokens_per_s": statistics.median(response.decode_tokens_per_s),
            "prefill_repeats": list(response.prefill_tokens_per_s),
            "decode_repeats": list(response.decode_tokens_per_s),
            "peak_memory_mb": response.peak_memory_bytes / 2**20,
            "device": response.device,
        }

    def aggregate(self, config: ThroughputConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """Median rates and peak memory per model and length; rates relative to the reference."""
        models = sorted(samples["model"].astype(str).unique())
        reference = config.reference
        if reference not in models:
            if reference:
                log.warning(
                    "throughput.reference %r is not a model of this run; relative rates use %r",
                    reference,
                    models[0],
                )
            reference = models[0]
        rows = []
        for _, s in samples.iterrows():
            base = {"task": self.name, "model": s["model"], "length": int(s["length"]),
                    "stderr": float("nan")}  # fmt: skip
            n = len(s["prefill_repeats"])
            for metric in (*RATES, "peak_memory_mb"):
                rows.append({**base, "metric": metric, "value": float(s[metric]), "n": n})
            ref = samples[(samples["model"] == reference) & (samples["length"] == s["length"])]
            for metric, relative in RELATIVE.items():
                if len(ref):
                    value = float(s[metric]) / float(ref[metric].iloc[0]) - 1
                    rows.append({**base, "metric": relative, "value": value, "n": n})
        return pd.DataFrame(rows)

    def figures(self, metrics: pd.DataFrame, samples: pd.DataFrame, out_dir: Path) -> list[Path]:
        """Prefill and decode tokens/s vs context length, one line per model."""
        from diffbench.figures import model_colors, new_figure, save

        rows = metrics[metrics["task"] == self.name]
        if rows.empty:
            return []
        colors = model_colors(rows["model"].astype(str).unique())
        fig = new_figure(ncols=2)
        axes = fig.subplots(1, 2, squeeze=False)[0]
        for ax, metric in zip(axes, RATES, strict=True):
            sub = rows[rows["metric"] == metric]
            for model, line in sub.groupby("model", sort=True):
                line = line.assign(x=line["length"].astype(int)).sort_values("x")
                ax.plot(line["x"], line["value"], "o-", ms=3, color=colors[str(model)], label=model)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("tokens / s (median)")
            ax.set_title(metric.split("_")[0])
            ax.legend(fontsize=7)
        return save(fig, out_dir, "throughput_rates")


TASK = ThroughputTask()
