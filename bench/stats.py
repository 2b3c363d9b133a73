"""Uncertainty of metric rows: intervals over independent units, paired tests between models,
and multiplicity control.

A task declares each metric (`diffbench.api.Metric`): a "proportion" or "mean" row is the mean of
its samples' values, and samples sharing a `cluster` are one independent unit (a NIAH haystack
draw read at five depths, an ICL test example under several orders). Everything here works on
units, never on samples as if they were independent.

- A proportion's interval is Wilson's score interval at the effective sample size (the number of
  samples divided by the design effect of the clustering; every unit where the scores do not vary,
  so a finite sample never gives a zero-width interval). A mean's is Student's t with the
  cluster-robust standard error and units - 1 degrees of freedom. A "statistic" (a top-1, a
  margin over orders) gets none, unless its task gave a stderr (then a normal interval, so named).
- Two models scored on the same inputs pair up by sample id, where the recorded input identities
  agree; delta, interval and test come from the same paired ids. A proportion's difference gets
  Newcombe's paired score interval (his method 10, from the two Wilson intervals at their
  effective sizes and the pairs' correlation), a mean's a paired cluster-robust t interval. The
  test is exact: McNemar's when every score is 0 or 1 and no unit holds two samples, otherwise the
  sign-flip (randomization) test on the per-unit sums of the paired differences, of which
  McNemar's is the special case. With k units no such test goes below 2 / 2^k (`p_min`): a row
  whose k cannot reach the level says so. Rows that cannot be paired get no test.
- A report tests many rows: `adjust` gives Holm's (a small declared family) or Benjamini and
  Hochberg's (exploratory rows) adjusted p-values, and significance is read from those.

Every computation is deterministic (the sign-flip test's random draws, used only past the exact
cases, are seeded), so a report is byte-for-byte reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
from diffbench.api import (
    CHANCE_KEY,
    CLUSTER_KEY,
    INPUT_KEY,
    SCORE_KEY,
    WILDCARDS,
    Metric,
    MetricKind,
    setting_text,
)
from scipy.stats import binomtest, false_discovery_control, norm
from scipy.stats import t as student_t

LEVEL = 0.95
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

Adjustment = Literal["holm", "benjamini-hochberg", "none"]
ADJUSTMENTS: tuple[str, ...] = ("holm", "benjamini-hochberg", "none")


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval and how it was obtained."""

    low: float
    high: float
    method: str  # "Wilson", "t", "Newcombe paired", "paired t", "normal (task's stderr)"

    def excludes_zero(self) -> bool:
        """Whether zero lies outside the interval."""
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Estimate:
    """A metric row's value with its sample and unit counts and interval (None when none)."""

    value: float
    n: int | None
    interval: Interval | None
    n_clusters: int | None = None


@dataclass(frozen=True)
class Difference:
    """Candidate minus reference for one metric row, with its paired test.

    `p_value` is the test's own p; `p_adjusted` the p after the multiplicity control of the
    family the row was tested in (`adjustment`), from which `significant` is read. `p_min` is the
    smallest p the test can give with `n_clusters` units; `reason` says why a row has no test.
    """

    delta: float
    n_pairs: int
    interval: Interval | None
    p_value: float | None
    test: str  # "McNemar exact", "sign-flip", "cluster sign-flip" or "none"
    significant: bool
    n_clusters: int = 0  # independent units the paired test used
    inputs_differ: bool = False  # samples of one id had different inputs: no paired test
    p_min: float | None = None
    p_adjusted: float | None = None
    adjustment: str = "none"
    n_reference: int | None = None  # each side's samples, where fewer were paired
    n_candidate: int | None = None
    reason: str = ""

    @property
    def can_reach(self) -> bool:
        """Whether the test could reach significance at all with this many units."""
        return self.p_min is not None and self.p_min < 1 - LEVEL


@dataclass(frozen=True)
class SampleScores:
    """The samples behind one model's metric row: value, cluster and input identity by sample id.

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

    def n_clusters(self) -> int:
        """The number of independent units."""
        return int(self.cluster.nunique())

    def chance_level(self) -> float | None:
        """A uniform guess's expected mean score over these samples; None unless every sample
        records its chance."""
        if self.chance is None or not len(self.chance) or self.chance.isna().any():
            return None
        return float(self.chance.mean())


@dataclass(frozen=True)
class SampleIndex:
    """One task's samples with setting values normalised to metrics.csv's spelling and each
    declared metric's per-sample value in a column of its own."""

    frame: pd.DataFrame  # id, model, cluster, input identity, chance, settings, value columns
    setting_keys: tuple[str, ...]
    raw: pd.DataFrame  # the samples as stored, for a task's figures

    @classmethod
    def build(
        cls,
        samples: pd.DataFrame,
        setting_keys: tuple[str, ...],
        metrics: Sequence[Metric] = (),
    ) -> SampleIndex:
        """Index `samples` (one task, every model) by their setting columns."""
        columns = ["id", "model", CLUSTER_KEY, INPUT_KEY, CHANCE_KEY]
        if samples.empty or "id" not in samples.columns:
            return cls(pd.DataFrame(columns=columns), (), samples)
        keys = tuple(k for k in setting_keys if k in samples.columns)
        frame = samples[["id", "model", *keys]].copy()
        for k in keys:
            frame[k] = frame[k].map(setting_text)
        frame["id"] = frame["id"].astype(str)
        frame["model"] = frame["model"].astype(str)
        cluster = samples.get(CLUSTER_KEY, pd.Series(np.nan, index=samples.index))
        frame[CLUSTER_KEY] = [
            i if _absent(c) else str(c) for i, c in zip(frame["id"], cluster, strict=True)
        ]
        inputs = samples.get(INPUT_KEY, pd.Series("", index=samples.index))
        frame[INPUT_KEY] = ["" if _absent(x) else str(x) for x in inputs]
        chance = samples.get(CHANCE_KEY, pd.Series(np.nan, index=samples.index))
        frame[CHANCE_KEY] = pd.to_numeric(chance, errors="coerce").to_numpy(dtype=float)
        fields = {SCORE_KEY, *(m.key for m in metrics if m.sample_mean)}
        for field in sorted(fields):
            frame[_value_column(field)] = list(_field(samples, field))
        return cls(frame, keys, samples)

    def scores(
        self, model: str, setting: Mapping[str, str], metric: Metric | None = None
    ) -> SampleScores:
        """`model`'s samples in a row's setting, indexed by sample id, with `metric`'s
        per-sample value, leaving out samples without one (no metric: every sample, with its
        `score` where it has one)."""
        mask = self.frame["model"] == model
        for key in self.setting_keys:
            value = setting_text(setting.get(key, ""))
            if value not in WILDCARDS:
                mask &= self.frame[key] == value
        sub = self.frame[mask]
        column = _value_column(metric.key if metric else SCORE_KEY)
        if column in sub:
            raw = sub[column]
            if metric is not None and metric.by:
                at = setting_text(setting.get(metric.by, ""))
                raw = raw.map(lambda v: _number(v.get(at)) if isinstance(v, dict) else np.nan)
            values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
        else:
            values = np.full(len(sub), np.nan)
        keep = ~np.isnan(values) if metric is not None else np.ones(len(values), dtype=bool)
        ids = sub["id"].to_numpy()[keep]
        return SampleScores(
            pd.Series(values[keep], index=ids),
            pd.Series(sub[CLUSTER_KEY].to_numpy()[keep], index=ids),
            pd.Series(sub[INPUT_KEY].to_numpy()[keep], index=ids),
            pd.Series(sub[CHANCE_KEY].to_numpy(dtype=float)[keep], index=ids),
        )


def _value_column(field: str) -> str:
    return f"value:{field}"


def _number(value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    return np.nan


def _field(samples: pd.DataFrame, field: str) -> pd.Series:
    """A sample field by name; `a.b` reads key b of the mapping in field a (lm-eval's values).
    Mappings (a value per setting, as `Metric.by` reads) are kept whole."""
    head, _, rest = field.partition(".")
    if head not in samples.columns:
        return pd.Series(np.nan, index=samples.index, dtype=object)
    column = samples[head]
    if rest:
        column = column.map(lambda v: v.get(rest) if isinstance(v, dict) else np.nan)
    return column.map(lambda v: v if isinstance(v, dict) else _number(v))


def _absent(value: object) -> bool:
    if isinstance(value, str):
        return value == ""
    return value is None or (isinstance(value, float | np.floating) and bool(np.isnan(value)))


def _noise(*scales: float | np.ndarray) -> float:
    """The largest gap between numbers of these magnitudes that is rounding, not a difference."""
    return NOISE * max([1.0, *(float(np.max(np.abs(s), initial=0.0)) for s in scales)])


def cluster_sums(values: np.ndarray, clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and sizes of `values`, in order of first appearance (no clusters: each)."""
    values = np.asarray(values, dtype=float)
    if clusters is None:
        return values, np.ones(len(values))
    codes, _ = pd.factorize(np.asarray(clusters, dtype=object))
    return np.bincount(codes, weights=values), np.bincount(codes).astype(float)


def cluster_variance(
    values: np.ndarray, clusters: np.ndarray | None, small_sample: bool = True
) -> tuple[float, int]:
    """The cluster-robust variance of the mean of `values`, and the number of clusters:
    sum over clusters of (sum - mean * size)^2 / N^2, times k / (k - 1) with `small_sample`
    (CR1; without it CR0, which is p(1 - p) / N for unclustered 0/1 scores). NaN for one
    cluster."""
    sums, sizes = cluster_sums(values, clusters)
    k, total = len(sums), float(sizes.sum())
    if k < 2:
        return float("nan"), k
    mean = float(sums.sum()) / total
    resid = sums - mean * sizes
    factor = k / (k - 1) if small_sample else 1.0
    return float(factor * np.sum(resid * resid) / total**2), k


def _z(level: float) -> float:
    return float(norm.ppf(0.5 + level / 2))


def effective_n(values: np.ndarray, clusters: np.ndarray | None) -> float:
    """The sample size a proportion's interval uses: N samples over the clustering's design
    effect (the cluster-robust CR0 variance of the mean against p(1 - p) / N; so N without
    clusters, and k for k clusters whose samples always agree), between 1 and N. Where the scores
    do not vary at all (every one 0, or every one 1) the design effect cannot be estimated, and
    each unit counts once."""
    values = np.asarray(values, dtype=float)
    total = len(values)
    var, k = cluster_variance(values, clusters, small_sample=False)
    p = float(values.mean())
    if p <= _noise(p) or p >= 1 - _noise(p):
        return float(k)
    if not np.isfinite(var) or var <= 0:
        return float(total)
    return float(np.clip(p * (1 - p) / var, 1.0, total))


def wilson(p: float, n: float, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval for a proportion `p` of `n` (which may be an effective size)."""
    z = _z(level)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    # At p = 0 or 1 the bound on that side is exactly 0 or 1 (rounding would leave 1 - 2e-16).
    low = 0.0 if p <= 0 else max(0.0, float(centre - half))
    high = 1.0 if p >= 1 else min(1.0, float(centre + half))
    return low, high


def _in_unit_range(values: np.ndarray) -> bool:
    return bool(np.all((values >= 0) & (values <= 1)))


def normal_interval(value: float, stderr: float, level: float = LEVEL) -> Interval | None:
    """value ± z * stderr (a statistic whose task gave a stderr), or None without one."""
    if not np.isfinite(stderr) or not np.isfinite(value) or stderr <= 0:
        return None
    z = _z(level)
    return Interval(value - z * stderr, value + z * stderr, "normal (task's stderr)")


def mean_interval(
    values: np.ndarray, clusters: np.ndarray | None, kind: MetricKind, level: float = LEVEL
) -> Interval | None:
    """A proportion's Wilson interval at its effective size, or a mean's cluster-robust t
    interval; None with fewer than two units or (a mean) no variation at all."""
    values = np.asarray(values, dtype=float)
    var, k = cluster_variance(values, clusters)
    if k < 2:
        return None
    mean = float(values.mean())
    if kind == "proportion" and _in_unit_range(values):
        low, high = wilson(mean, effective_n(values, clusters), level)
        return Interval(low, high, "Wilson")
    if not np.isfinite(var) or var <= _noise(mean) ** 2:
        return None
    half = float(student_t.ppf(0.5 + level / 2, k - 1)) * np.sqrt(var)
    return Interval(mean - half, mean + half, "t")


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


def shifted(interval: Interval, value: float, mean: float) -> Interval:
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
    kind: MetricKind = "mean",
    level: float = LEVEL,
) -> Estimate:
    """A row's interval: over its samples' units where the row is a mean of them, else (a
    statistic) a normal interval from the task's stderr, if it gave one."""
    if scores is not None and len(scores) and kind != "statistic":
        samples = SampleScores.of(scores)
        values = samples.score.to_numpy(dtype=float)
        clusters = samples.cluster.to_numpy()
        k = samples.n_clusters()
        interval = mean_interval(values, clusters if k < len(values) else None, kind, level)
        if interval is not None:
            interval = shifted(interval, value, float(values.mean()))
        return Estimate(value, len(values), interval, k)
    if kind != "statistic":
        return Estimate(value, n, None)
    return Estimate(value, n, normal_interval(value, stderr, level))


def is_binary(values: np.ndarray) -> bool:
    """Whether every value is 0 or 1."""
    return bool(np.isin(values, (0.0, 1.0)).all())


def smallest_p(n_clusters: int) -> float:
    """The smallest two-sided p-value an exact paired test of `n_clusters` units can give."""
    return min(1.0, 2.0 / 2.0**n_clusters) if n_clusters else 1.0


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


def _no_test(delta: float, reason: str, inputs_differ: bool = False) -> Difference:
    return Difference(
        delta, 0, None, None, "none", False, inputs_differ=inputs_differ, reason=reason
    )


def difference(
    reference: float,
    candidate: float,
    *,
    reference_scores: SampleScores | pd.Series | None = None,
    candidate_scores: SampleScores | pd.Series | None = None,
    kind: MetricKind = "mean",
    level: float = LEVEL,
) -> Difference:
    """candidate − reference with a paired test on the sample ids both measured.

    Where every sample of both sides is paired, delta is the rows' difference (a row may weight
    its samples); where fewer are, delta is the paired samples' mean difference and the row gives
    both sides' counts. Statistics, and rows without paired samples, get no test. Significant at
    1 − `level` before any multiplicity control (`adjust` replaces it).
    """
    delta = candidate - reference
    if kind == "statistic":
        return _no_test(delta, "a statistic, not a mean over samples")
    if reference_scores is None or candidate_scores is None:
        return _no_test(delta, "no per-sample values")
    ref_s, cand_s = SampleScores.of(reference_scores), SampleScores.of(candidate_scores)
    if inputs_differ(ref_s, cand_s):
        return _no_test(delta, "inputs differ", inputs_differ=True)
    shared = ref_s.score.index.intersection(cand_s.score.index)
    if not len(shared):
        return _no_test(delta, "no sample measured by both")
    return _paired_difference(delta, ref_s, cand_s, shared, kind, level)


def _paired_difference(
    delta: float,
    ref_s: SampleScores,
    cand_s: SampleScores,
    shared: pd.Index,
    kind: MetricKind,
    level: float,
) -> Difference:
    ref = ref_s.score.loc[shared].to_numpy(dtype=float)
    cand = cand_s.score.loc[shared].to_numpy(dtype=float)
    diffs = cand - ref
    clusters = _paired_clusters(ref_s, cand_s, shared)
    sums, _ = cluster_sums(diffs, clusters)
    k = len(sums)
    clustered = k < len(shared)
    partial = len(shared) < max(len(ref_s), len(cand_s))
    if partial:
        delta = float(diffs.mean())
    groups = clusters if clustered else None
    interval = _paired_interval(ref, cand, groups, kind, level)
    if interval is not None:
        interval = shifted(interval, delta, float(diffs.mean()))
    if not clustered and is_binary(ref) and is_binary(cand):
        p, test = mcnemar_exact(ref, cand), "McNemar exact"
    else:
        p, test = sign_flip_test(sums), "cluster sign-flip" if clustered else "sign-flip"
    return Difference(
        delta,
        len(shared),
        interval,
        p,
        test,
        p < 1 - level,
        k,
        p_min=smallest_p(k),
        p_adjusted=p,
        n_reference=len(ref_s) if partial else None,
        n_candidate=len(cand_s) if partial else None,
    )


def _paired_interval(
    ref: np.ndarray, cand: np.ndarray, clusters: np.ndarray | None, kind: MetricKind, level: float
) -> Interval | None:
    """Newcombe's paired score interval (method 10, continuity-corrected phi) for proportions,
    with each side's Wilson interval at its effective size; a paired cluster-robust t interval
    for means. None with
    fewer than two units, or (a mean) with every paired difference equal."""
    diffs = cand - ref
    var, k = cluster_variance(diffs, clusters)
    if k < 2:
        return None
    delta = float(diffs.mean())
    if kind == "proportion" and _in_unit_range(ref) and _in_unit_range(cand):
        p1, p2 = float(cand.mean()), float(ref.mean())
        n1, n2 = effective_n(cand, clusters), effective_n(ref, clusters)
        l1, u1 = wilson(p1, n1, level)
        l2, u2 = wilson(p2, n2, level)
        phi = 0.0
        if np.std(ref) > 0 and np.std(cand) > 0:
            phi = float(np.clip(np.corrcoef(ref, cand)[0, 1], -1.0, 1.0))
            # Newcombe's continuity correction of a positive phi, (AD - BC - N/2) / sqrt(efgh)
            # on a 2x2 table: without it, identical paired scores (phi = 1) give a zero-width
            # interval.
            if phi > 0:
                spread = np.sqrt(p1 * (1 - p1) * p2 * (1 - p2))
                phi = max(phi - 1 / (2 * min(n1, n2) * spread), 0.0)
        low = delta - np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)
                                  + (u2 - p2) ** 2, 0.0))  # fmt: skip
        high = delta + np.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
                                   + (p2 - l2) ** 2, 0.0))  # fmt: skip
        return Interval(float(low), float(high), "Newcombe paired")
    if not np.isfinite(var) or var <= _noise(diffs) ** 2:
        return None
    half = float(student_t.ppf(0.5 + level / 2, k - 1)) * np.sqrt(var)
    return Interval(delta - half, delta + half, "paired t")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in input order."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if not m:
        return []
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return [float(x) for x in out]


def adjust(
    differences: Sequence[Difference], method: str, level: float = LEVEL
) -> list[Difference]:
    """The differences with `p_adjusted` over the tested ones as one family (Holm, or Benjamini
    and Hochberg's false discovery rate; "none": the test's own p), and `significant` read from
    it; untested ones pass through."""
    if method not in ADJUSTMENTS:
        raise ValueError(f"unknown adjustment {method!r}; choose from {', '.join(ADJUSTMENTS)}")
    tested = [i for i, d in enumerate(differences) if d.p_value is not None]
    raw = [float(differences[i].p_value or 0.0) for i in tested]
    if method == "holm":
        adjusted = holm(raw)
    elif method == "benjamini-hochberg" and raw:
        adjusted = [float(x) for x in false_discovery_control(raw, method="bh")]
    else:
        adjusted = raw
    out = list(differences)
    for i, p in zip(tested, adjusted, strict=True):
        out[i] = replace(out[i], p_adjusted=p, adjustment=method, significant=p < 1 - level)
    return out
