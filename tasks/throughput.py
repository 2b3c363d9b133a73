"""Throughput (the paper's Table 7): prefill and decode tokens/s per model and context length.

Protocol: ../shared/paper-protocols.md section 5. An item is one timing repeat at one context
length (`L512-r0`, `L512-r1`, ...): a forward over that many tokens of a synthetic sequence
(prefill), then `new_tokens` greedy decode steps. A model's first timed repeat of a length comes
after `warmup` untimed ones (the backend warms each shape once per loaded model, so a resumed run
warms up again). The task declares `interleave_models`: the runner loads every model that runs it
and times repeat r of every model before repeat r + 1 of any (A B A B ...), so drift in the
machine's load falls on all models alike, and the repeats pair across models by id. Each sample
is one repeat: its prefill and decode rates, the peak memory of its timed work (the model's own
weights plus what the work added, so models loaded beside it do not count; on a CPU the growth of
the resident set, which a warm allocator keeps near zero), and `timed_at`, the Unix time its
timing began.

Rows per model and length: the mean rate over repeats (n = repeats, stderr over repeats, the
repeat being the unit of independence) and the largest peak memory. The paper reports the DIFF
model's rate relative to the Transformer's (-0.09 for "-9%"): reports derive `prefill_relative`
and `decode_relative` from the rates' declarations (`Metric.relative`) against the report's own
reference model, so the run itself names no reference.

At this scale the numbers measure transformers' DiffLlama implementation, which computes each
layer's attention as two full attention calls (one per half of V), not the paper's FlashDiff
kernel; on a CPU the absolute rates say little, and the paired ratio is the point.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd
from diffbench.api import (
    LARGEST,
    FigureSpec,
    Headline,
    Item,
    Metric,
    PaperRef,
    Response,
    Sample,
    Throughput,
    ThroughputRequest,
    TokenizerView,
    aggregate_means,
)
from diffbench.errors import DiffbenchError

RATES = ("prefill_tokens_per_s", "decode_tokens_per_s")
UNIT = "timing repeat"


@dataclass(frozen=True)
class ThroughputConfig:
    """Options of the throughput task; the defaults take seconds per tiny model on a CPU."""

    lengths: tuple[int, ...] = (256, 512)
    new_tokens: int = 16
    repeats: int = 8  # timed repeats per model and length: the samples the interval is over
    warmup: int = 1  # untimed runs before a model's first timed repeat of each length
    preset: str = ""

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError("lengths must be positive token counts")
        if self.new_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("new_tokens and repeats must be >= 1, warmup >= 0")


PRESETS: dict[str, dict[str, Any]] = {
    # Table 7: 2K and 4K contexts (the paper times training too, which diffbench does not).
    "paper": {"lengths": (2048, 4096), "repeats": 10, "warmup": 2, "new_tokens": 128},
}


class ThroughputTask:
    """The throughput task plugin."""

    name = "throughput"
    description = "Prefill and decode tokens/s and peak memory per context length (Table 7)"
    config_type = ThroughputConfig
    presets = PRESETS
    # The runner times this task's items on every model in turn (see the module docstring).
    interleave_models = True
    metrics = (
        Metric("prefill_tokens_per_s", "higher", "mean", "prefill_tokens_per_s", unit=UNIT,
               relative="prefill_relative"),
        Metric("decode_tokens_per_s", "higher", "mean", "decode_tokens_per_s", unit=UNIT,
               relative="decode_relative"),
        Metric("peak_memory_mb", "lower", "statistic", "peak_memory_mb", unit=UNIT,
               note="the largest over timed repeats; shown without a test"),
    )  # fmt: skip
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

    # Prefill and decode tokens/s against context length, a panel each.
    figures = (
        FigureSpec(
            "line",
            RATES,
            ("length",),
            "rates",
            "Throughput",
            x_label="context length (tokens)",
            y_label="tokens / s (mean over repeats)",
            share_y=False,
        ),
    )

    def request_kinds(self, config: ThroughputConfig) -> tuple[type, ...]:
        """The request kinds its items use, whatever the config."""
        return (ThroughputRequest,)

    def items(self, config: ThroughputConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """One single-repeat timing request per context length and repeat, repeats in order."""
        out = []
        for n in sorted(set(config.lengths)):
            if n + config.new_tokens > tokenizer.max_context:
                raise DiffbenchError(
                    f"throughput length {n} + {config.new_tokens} new tokens is beyond the "
                    f"model's maximum context of {tokenizer.max_context}; lower "
                    "--set throughput.lengths"
                )
            # Every repeat asks the same; the backend warms the shape up before the first.
            request = ThroughputRequest(n, config.new_tokens, repeats=1, warmup=config.warmup)
            out += [
                Item(f"L{n}-r{r}", request, {"length": n}, {"repeat": r})
                for r in range(config.repeats)
            ]
        return out

    def score(self, config: ThroughputConfig, item: Item, response: Response) -> Sample:
        """The repeat's prefill and decode rates, its peak memory and when it was timed."""
        assert isinstance(response, Throughput)
        return {
            "prefill_tokens_per_s": statistics.fmean(response.prefill_tokens_per_s),
            "decode_tokens_per_s": statistics.fmean(response.decode_tokens_per_s),
            "peak_memory_mb": response.peak_memory_bytes / 2**20,
            "device": response.device,
            "timed_at": response.timed_at,
        }

    def aggregate(self, config: ThroughputConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """Per model and length: each rate's mean over repeats (stderr over repeats), and the
        largest peak memory."""
        rates = [m for m in self.metrics if m.name in RATES]
        frame = aggregate_means(self.name, samples, rates, self.setting_keys)
        peak = (
            samples.groupby(["model", "length"], sort=True)["peak_memory_mb"]
            .agg(value="max", n="count")
            .reset_index()
            .assign(task=self.name, metric="peak_memory_mb", stderr=float("nan"))
        )
        return pd.concat([frame, peak], ignore_index=True)


TASK = ThroughputTask()
