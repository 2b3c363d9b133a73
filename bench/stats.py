"""Uncertainty of metric rows: bootstrap intervals over samples and paired tests between models.

A metric row whose value is the mean of its samples' `score` (the task lists it in
`sample_mean_metrics`) gets a percentile-bootstrap interval over those samples. Two models scored
on the same inputs pair up by sample id: their difference gets a paired-bootstrap interval, and,
when every score is 0 or 1, McNemar's exact test (a binomial test on the discordant pairs). Other
metrics fall back to a normal interval from the row's stderr. Every draw is seeded, so a report
is byte-for-byte reproducible.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from diffbench import registry
from diffbench.errors import DiffbenchError
from scipy.stats import binomtest, norm

LEVEL = 0.95
RESAMPLES = 2000
SEED = 20241007
# A row's setting value that stands for every value of that setting (NIAH's depth="all"); an
# empty cell is a setting the task does not have (another task's column in a shared metrics.csv).
WILDCARDS = frozenset({"all", ""})


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval and how it was obtained."""

    low: float
    high: float
    method: str  # "bootstrap", "paired bootstrap" or "normal"

    def excludes_zero(self) -> bool:
        """Whether zero lies outside the interval."""
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Estimate:
    """A metric row's value with its sample count and interval (None when none can be given)."""

    value: float
    n: int | None
    interval: Interval | None


@dataclass(frozen=True)
class Difference:
    """Candidate minus reference for one metric row, with its paired test."""

    delta: float
    n_pairs: int
    interval: Interval | None
    p_value: float | None
    test: str  # "McNemar exact", "paired bootstrap", "normal" or "none"
    significant: bool


@functools.cache
def sample_mean_metrics(task_name: str) -> frozenset[str]:
    """Metrics of a task whose value is the mean of its samples' score (none if unknown)."""
    try:
        task = registry.load(task_name)
    except DiffbenchError:
        return frozenset()
    return frozenset(getattr(task, "sample_mean_metrics", frozenset()))


def setting_text(value: object) -> str:
    """A setting value as metrics.csv spells it: numbers in shortest form (256, 0, 12.5)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return f"{float(value):g}"
    text = str(value)
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


@dataclass(frozen=True)
class SampleIndex:
    """One task's samples with setting values normalised to metrics.csv's spelling."""

    frame: pd.DataFrame  # id, model, score and the setting keys as text
    setting_keys: tuple[str, ...]
    raw: pd.DataFrame  # the samples as stored, for a task's figures

    @classmethod
    def build(cls, samples: pd.DataFrame, setting_keys: tuple[str, ...]) -> SampleIndex:
        """Index `samples` (one task, every model) by their setting columns."""
        if samples.empty or "score" not in samples.columns:
            return cls(pd.DataFrame(columns=["id", "model", "score"]), (), samples)
        keys = tuple(k for k in setting_keys if k in samples.columns)
        frame = samples[["id", "model", "score", *keys]].copy()
        for k in keys:
            frame[k] = frame[k].map(setting_text)
        frame["model"] = frame["model"].astype(str)
        frame["score"] = pd.to_numeric(frame["score"], errors="coerce")
        return cls(frame, keys, samples)

    def scores(self, model: str, setting: Mapping[str, str]) -> pd.Series:
        """Scores of `model`'s samples in a row's setting, indexed by sample id."""
        mask = self.frame["model"] == model
        for key in self.setting_keys:
            value = setting_text(setting.get(key, ""))
            if value not in WILDCARDS:
                mask &= self.frame[key] == value
        sub = self.frame[mask]
        return pd.Series(sub["score"].to_numpy(dtype=float), index=sub["id"].to_numpy())


def _percentile(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean(scores: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Means of `resamples` seeded resamples (with replacement) of `scores`."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(scores), size=(resamples, len(scores)))
    return np.asarray(scores, dtype=float)[idx].mean(axis=1)


def bootstrap_interval(
    scores: np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """Percentile-bootstrap interval of the mean of `scores`."""
    low, high = _percentile(bootstrap_mean(scores, resamples, seed), level)
    return Interval(low, high, "bootstrap")


def normal_interval(value: float, stderr: float, level: float = LEVEL) -> Interval | None:
    """value ± z * stderr, or None when the stderr is missing."""
    if not np.isfinite(stderr) or not np.isfinite(value):
        return None
    z = float(norm.ppf(0.5 + level / 2))
    return Interval(value - z * stderr, value + z * stderr, "normal")


def mcnemar_exact(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Two-sided p-value of McNemar's exact test on paired 0/1 scores."""
    gained = int(np.sum((reference == 0) & (candidate == 1)))
    lost = int(np.sum((reference == 1) & (candidate == 0)))
    if gained + lost == 0:
        return 1.0
    return float(binomtest(gained, gained + lost, 0.5).pvalue)


def estimate(
    value: float,
    n: int | None,
    stderr: float,
    scores: pd.Series | None,
    level: float = LEVEL,
) -> Estimate:
    """A row's interval: bootstrap over its samples when given, else normal from its stderr."""
    if scores is not None and len(scores):
        values = scores.to_numpy(dtype=float)
        interval = bootstrap_interval(values, level)
        # Centre on the row's value: a row may weight its samples (NIAH's mean over depths of
        # per-depth means); with equal weights the shift is zero.
        shift = value - float(values.mean())
        return Estimate(
            value, len(values), Interval(interval.low + shift, interval.high + shift, "bootstrap")
        )
    return Estimate(value, n, normal_interval(value, stderr, level))


def is_binary(values: np.ndarray) -> bool:
    """Whether every value is 0 or 1."""
    return bool(np.isin(values, (0.0, 1.0)).all())


def difference(
    reference: float,
    candidate: float,
    *,
    reference_scores: pd.Series | None = None,
    candidate_scores: pd.Series | None = None,
    reference_stderr: float = float("nan"),
    candidate_stderr: float = float("nan"),
    level: float = LEVEL,
) -> Difference:
    """candidate − reference with a paired test on shared sample ids, else a normal approximation.

    Significance at 1 − `level`: McNemar's exact test when both sides' paired scores are binary,
    otherwise whether the (paired-bootstrap or normal) interval excludes zero.
    """
    delta = candidate - reference
    alpha = 1 - level
    if reference_scores is not None and candidate_scores is not None:
        shared = reference_scores.index.intersection(candidate_scores.index)
        if len(shared):
            ref = reference_scores.loc[shared].to_numpy(dtype=float)
            cand = candidate_scores.loc[shared].to_numpy(dtype=float)
            draws = bootstrap_mean(cand - ref)
            low, high = _percentile(draws, level)
            shift = delta - float(np.mean(cand - ref))  # zero unless the rows weight samples
            interval = Interval(low + shift, high + shift, "paired bootstrap")
            if is_binary(ref) and is_binary(cand):
                p = mcnemar_exact(ref, cand)
                return Difference(delta, len(shared), interval, p, "McNemar exact", p < alpha)
            # Two-sided bootstrap p-value from the same (shifted) draws as the percentile
            # interval, so the two agree on significance; the +1s keep it
            # above zero, as no finite number of resamples can show p = 0.
            shifted = draws + shift
            tail = min(int((shifted <= 0).sum()), int((shifted >= 0).sum()))
            p = min(1.0, 2 * (tail + 1) / (len(draws) + 1))
            return Difference(
                delta, len(shared), interval, p, "paired bootstrap", interval.excludes_zero()
            )
    se = float(np.hypot(reference_stderr, candidate_stderr))
    normal = normal_interval(delta, se, level)
    if normal is None:
        return Difference(delta, 0, None, None, "none", False)
    p = float(2 * norm.sf(abs(delta) / se)) if se > 0 else (1.0 if delta == 0 else 0.0)
    return Difference(delta, 0, normal, p, "normal", p < alpha)
