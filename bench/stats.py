"""Uncertainty of metric rows: bootstrap intervals over samples and paired tests between models.

A metric row whose value is the mean of its samples' score (run.json's task_info lists it in
`sample_mean_metrics`) gets a percentile-bootstrap interval over those samples. Samples that share
a `cluster` (one test example under several demonstration draws, say) are not independent: the
bootstrap resamples whole clusters and the paired test treats each cluster as one unit. Two
models scored on the same inputs pair up by sample id, but only where the samples' recorded input
identities agree. Their difference gets a paired (cluster) bootstrap interval and an exact test:
McNemar's exact test when every score is 0 or 1 and no cluster holds two samples, otherwise the
sign-flip (randomization) test on the per-cluster sums of the paired differences, of which
McNemar's test is the special case. Other metrics fall back to a normal interval from the row's
stderr. Every draw is seeded, so a report is byte-for-byte reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from diffbench.api import CHANCE_KEY, CLUSTER_KEY, INPUT_KEY, SCORE_KEY, WILDCARDS
from scipy.stats import binomtest, norm

LEVEL = 0.95
RESAMPLES = 2000
SEED = 20241007
# Sign flips drawn when the sign-flip test cannot be computed exactly.
FLIPS = 10_000
# The sign-flip test enumerates every sign pattern up to this many clusters.
EXACT_FLIPS = 16
# Per-cluster sums that are multiples of 1/m for m up to this (0/1 scores, halves, thirds, ...)
# get the sign-flip test's exact distribution by convolution, however many clusters there are.
MAX_DENOMINATOR = 120
# Relative gap below which two numbers are equal: metrics.csv keeps 10 significant digits, and a
# mean of per-depth means differs from the mean of their samples by float rounding alone.
NOISE = 1e-9


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval and how it was obtained."""

    low: float
    high: float
    method: str  # "bootstrap", "cluster bootstrap", "paired [cluster] bootstrap" or "normal"

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
    test: str  # "McNemar exact", "sign-flip", "cluster sign-flip", "normal" or "none"
    significant: bool
    n_clusters: int = 0  # independent units the paired test used (n_pairs without clusters)
    inputs_differ: bool = False  # samples of one id had different inputs: no paired test


@dataclass(frozen=True)
class SampleScores:
    """The samples behind one model's metric row: score, cluster and input identity by sample id.

    A sample without a cluster is its own cluster (its id); an unrecorded input identity is "".
    """

    score: pd.Series
    cluster: pd.Series
    inputs: pd.Series
    chance: pd.Series | None = None  # a uniform guess's expected score, where the task gives one

    @classmethod
    def of(cls, scores: SampleScores | pd.Series) -> SampleScores:
        """`scores` as SampleScores; a plain Series of scores by id has one cluster per sample."""
        if isinstance(scores, SampleScores):
            return scores
        ids = pd.Index(scores.index)
        return cls(
            pd.Series(scores.to_numpy(dtype=float), index=ids),
            pd.Series(ids.astype(str), index=ids),
            pd.Series("", index=ids, dtype=object),
        )

    def __len__(self) -> int:
        return len(self.score)

    def mean(self) -> float:
        """The mean score."""
        return float(self.score.mean())

    def chance_level(self) -> float | None:
        """A uniform guess's expected mean score over these samples; None unless every sample
        records its chance."""
        if self.chance is None or not len(self.chance) or self.chance.isna().any():
            return None
        return float(self.chance.mean())


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

    frame: pd.DataFrame  # id, model, score, cluster, input identity and the setting keys as text
    setting_keys: tuple[str, ...]
    raw: pd.DataFrame  # the samples as stored, for a task's figures

    @classmethod
    def build(cls, samples: pd.DataFrame, setting_keys: tuple[str, ...]) -> SampleIndex:
        """Index `samples` (one task, every model) by their setting columns."""
        columns = ["id", "model", SCORE_KEY, CLUSTER_KEY, INPUT_KEY, CHANCE_KEY]
        if samples.empty or SCORE_KEY not in samples.columns:
            return cls(pd.DataFrame(columns=columns), (), samples)
        keys = tuple(k for k in setting_keys if k in samples.columns)
        frame = samples[["id", "model", SCORE_KEY, *keys]].copy()
        for k in keys:
            frame[k] = frame[k].map(setting_text)
        frame["id"] = frame["id"].astype(str)
        frame["model"] = frame["model"].astype(str)
        frame[SCORE_KEY] = pd.to_numeric(frame[SCORE_KEY], errors="coerce")
        cluster = samples.get(CLUSTER_KEY, pd.Series(np.nan, index=samples.index))
        frame[CLUSTER_KEY] = [
            i if _absent(c) else str(c) for i, c in zip(frame["id"], cluster, strict=True)
        ]
        inputs = samples.get(INPUT_KEY, pd.Series("", index=samples.index))
        frame[INPUT_KEY] = ["" if _absent(x) else str(x) for x in inputs]
        chance = samples.get(CHANCE_KEY, pd.Series(np.nan, index=samples.index))
        frame[CHANCE_KEY] = pd.to_numeric(chance, errors="coerce").to_numpy(dtype=float)
        return cls(frame, keys, samples)

    def scores(self, model: str, setting: Mapping[str, str]) -> SampleScores:
        """`model`'s samples in a row's setting, indexed by sample id."""
        mask = self.frame["model"] == model
        for key in self.setting_keys:
            value = setting_text(setting.get(key, ""))
            if value not in WILDCARDS:
                mask &= self.frame[key] == value
        sub = self.frame[mask]
        ids = sub["id"].to_numpy()
        return SampleScores(
            pd.Series(sub[SCORE_KEY].to_numpy(dtype=float), index=ids),
            pd.Series(sub[CLUSTER_KEY].to_numpy(), index=ids),
            pd.Series(sub[INPUT_KEY].to_numpy(), index=ids),
            pd.Series(sub[CHANCE_KEY].to_numpy(dtype=float), index=ids),
        )


def _absent(value: object) -> bool:
    if isinstance(value, str):
        return value == ""
    return value is None or (isinstance(value, float | np.floating) and bool(np.isnan(value)))


def _noise(*scales: float | np.ndarray) -> float:
    """The largest gap between numbers of these magnitudes that is rounding, not a difference."""
    return NOISE * max([1.0, *(float(np.max(np.abs(s), initial=0.0)) for s in scales)])


def _percentile(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def cluster_sums(values: np.ndarray, clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and sizes of `values`, in order of first appearance (no clusters: each)."""
    values = np.asarray(values, dtype=float)
    if clusters is None:
        return values, np.ones(len(values))
    codes, _ = pd.factorize(np.asarray(clusters, dtype=object))
    return np.bincount(codes, weights=values), np.bincount(codes).astype(float)


def bootstrap_mean(
    scores: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    clusters: np.ndarray | None = None,
) -> np.ndarray:
    """Means of `resamples` seeded resamples (with replacement) of `scores`' whole clusters."""
    sums, sizes = cluster_sums(scores, clusters)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(resamples, len(sums)))
    return np.asarray(sums[idx].sum(axis=1) / sizes[idx].sum(axis=1))


def bootstrap_interval(
    scores: np.ndarray,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    clusters: np.ndarray | None = None,
) -> Interval:
    """Percentile-bootstrap interval of the mean of `scores`, resampling whole clusters."""
    low, high = _percentile(bootstrap_mean(scores, resamples, seed, clusters), level)
    method = "bootstrap" if clusters is None else "cluster bootstrap"
    return Interval(low, high, method)


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


def _denominator(values: np.ndarray) -> int | None:
    """The smallest m <= MAX_DENOMINATOR making every value an integer multiple of 1/m."""
    for m in range(1, MAX_DENOMINATOR + 1):
        scaled = values * m
        if np.all(np.abs(scaled - np.rint(scaled)) <= 1e-6):
            return m
    return None


def sign_flip_test(sums: np.ndarray, flips: int = FLIPS, seed: int = SEED) -> float:
    """Two-sided p-value of the paired sign-flip test on per-cluster sums of differences.

    With no difference between the models each cluster's sum is as likely to be negative as
    positive; p is the share of the 2^k sign patterns whose total is at least as far from zero as
    the observed one. So k clusters can never give p below 2 / 2^k (one pair: 1, two: 0.5), and
    on 0/1 scores without clusters this is McNemar's exact test. Exact when the sums are
    multiples of a common 1/m or there are at most EXACT_FLIPS of them; else `flips` seeded draws.
    """
    sums = np.asarray(sums, dtype=float)
    nonzero = sums[np.abs(sums) > _noise(sums)]
    if not len(nonzero):
        return 1.0
    m = _denominator(nonzero)
    if m is not None:
        units = np.rint(nonzero * m).astype(np.int64)
        units = units[units != 0]
        if len(units) * int(np.abs(units).sum()) <= 200_000_000:
            return _sign_flip_on_lattice(units)
    observed = abs(float(nonzero.sum())) - _noise(nonzero) * len(nonzero)
    k = len(nonzero)
    if k <= EXACT_FLIPS:
        patterns = np.arange(2**k)[:, None] >> np.arange(k) & 1
        totals = np.abs((1 - 2 * patterns) @ nonzero)
        return float(np.mean(totals >= observed))
    rng = np.random.default_rng(seed)
    count, done, chunk = 0, 0, max(1, 1_000_000 // k)
    while done < flips:
        n = min(chunk, flips - done)
        signs = 1 - 2 * rng.integers(0, 2, size=(n, k), dtype=np.int8)
        count += int((np.abs(signs @ nonzero) >= observed).sum())
        done += n
    return (count + 1) / (flips + 1)


def _sign_flip_on_lattice(units: np.ndarray) -> float:
    """The sign-flip test's exact p-value for integer sums: the flipped total's distribution,
    built one cluster at a time."""
    total = int(np.abs(units).sum())
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0
    for u in np.abs(units):
        up, down = np.zeros_like(dist), np.zeros_like(dist)
        up[u:], down[:-u] = dist[:-u], dist[u:]
        dist = 0.5 * (up + down)
    far = np.abs(np.arange(-total, total + 1)) >= abs(int(units.sum()))
    return min(1.0, float(dist[far].sum()))


def _shifted(interval: Interval, value: float, mean: float) -> Interval:
    """The interval moved by value − mean: a row may weight its samples (a mean of per-depth
    means); a gap that is only rounding moves nothing."""
    shift = value - mean
    if abs(shift) <= _noise(value, mean):
        return interval
    return Interval(interval.low + shift, interval.high + shift, interval.method)


def estimate(
    value: float,
    n: int | None,
    stderr: float,
    scores: SampleScores | pd.Series | None,
    level: float = LEVEL,
) -> Estimate:
    """A row's interval: bootstrap over its samples' clusters when given, else normal from its
    stderr. Fewer than two clusters give no interval (a bootstrap of one is a point)."""
    if scores is not None and len(scores):
        samples = SampleScores.of(scores)
        values = samples.score.to_numpy(dtype=float)
        clusters = samples.cluster.to_numpy()
        n_clusters = len(pd.unique(clusters))
        if n_clusters < 2:
            return Estimate(value, len(values), None)
        interval = bootstrap_interval(
            values, level, clusters=clusters if n_clusters < len(values) else None
        )
        return Estimate(value, len(values), _shifted(interval, value, float(values.mean())))
    return Estimate(value, n, normal_interval(value, stderr, level))


def is_binary(values: np.ndarray) -> bool:
    """Whether every value is 0 or 1."""
    return bool(np.isin(values, (0.0, 1.0)).all())


def inputs_differ(reference: SampleScores, candidate: SampleScores) -> bool:
    """Whether a sample id of both sides was measured on different inputs (where both recorded)."""
    shared = reference.inputs.index.intersection(candidate.inputs.index)
    if not len(shared):
        return False
    ref = reference.inputs.loc[shared].to_numpy(dtype=object)
    cand = candidate.inputs.loc[shared].to_numpy(dtype=object)
    return bool(np.any((ref != cand) & (ref != "") & (cand != "")))


def _paired_clusters(reference: SampleScores, candidate: SampleScores, ids: pd.Index) -> np.ndarray:
    """Each shared id's cluster; where only one side names a cluster (a run stored before the
    task wrote one), that side's."""
    ref = reference.cluster.loc[ids].to_numpy(dtype=object)
    cand = candidate.cluster.loc[ids].to_numpy(dtype=object)
    return np.where(ref != ids.astype(str).to_numpy(dtype=object), ref, cand)


def difference(
    reference: float,
    candidate: float,
    *,
    reference_scores: SampleScores | pd.Series | None = None,
    candidate_scores: SampleScores | pd.Series | None = None,
    reference_stderr: float = float("nan"),
    candidate_stderr: float = float("nan"),
    level: float = LEVEL,
) -> Difference:
    """candidate − reference with a paired test on shared sample ids, else a normal approximation.

    Significant at 1 − `level` when the paired test's p-value is below it: McNemar's exact test
    when both sides' paired scores are binary and unclustered, otherwise the sign-flip test over
    clusters. Samples whose inputs differ get no paired test (normal approximation, flagged).
    """
    delta = candidate - reference
    if reference_scores is not None and candidate_scores is not None:
        ref_s, cand_s = SampleScores.of(reference_scores), SampleScores.of(candidate_scores)
        if inputs_differ(ref_s, cand_s):
            unpaired = _normal_difference(delta, reference_stderr, candidate_stderr, level)
            return replace(unpaired, inputs_differ=True)
        shared = ref_s.score.index.intersection(cand_s.score.index)
        if len(shared):
            return _paired_difference(delta, ref_s, cand_s, shared, level)
    return _normal_difference(delta, reference_stderr, candidate_stderr, level)


def _paired_difference(
    delta: float, ref_s: SampleScores, cand_s: SampleScores, shared: pd.Index, level: float
) -> Difference:
    ref = ref_s.score.loc[shared].to_numpy(dtype=float)
    cand = cand_s.score.loc[shared].to_numpy(dtype=float)
    diffs = cand - ref
    clusters = _paired_clusters(ref_s, cand_s, shared)
    sums, _ = cluster_sums(diffs, clusters)
    clustered = len(sums) < len(shared)
    interval = None
    if len(sums) >= 2:
        draws = bootstrap_mean(diffs, clusters=clusters if clustered else None)
        # A resample that is zero up to rounding is zero: it favours neither model.
        draws[np.abs(draws) <= _noise(diffs)] = 0.0
        low, high = _percentile(draws, level)
        method = "paired cluster bootstrap" if clustered else "paired bootstrap"
        interval = _shifted(Interval(low, high, method), delta, float(diffs.mean()))
    if not clustered and is_binary(ref) and is_binary(cand):
        p, test = mcnemar_exact(ref, cand), "McNemar exact"
    else:
        p, test = sign_flip_test(sums), "cluster sign-flip" if clustered else "sign-flip"
    return Difference(delta, len(shared), interval, p, test, p < 1 - level, len(sums))


def _normal_difference(
    delta: float, reference_stderr: float, candidate_stderr: float, level: float
) -> Difference:
    se = float(np.hypot(reference_stderr, candidate_stderr))
    normal = normal_interval(delta, se, level)
    if normal is None:
        return Difference(delta, 0, None, None, "none", False)
    p = float(2 * norm.sf(abs(delta) / se)) if se > 0 else (1.0 if delta == 0 else 0.0)
    return Difference(delta, 0, normal, p, "normal", p < 1 - level)
