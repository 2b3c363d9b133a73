"""`diffbench compare`: match a baseline's metric rows with a candidate's and give each a status.

Rows match on task, metric, model label and every setting column (numbers compared as numbers:
`25.0` is `25`). A baseline row without a candidate value (absent, empty or NaN) is "missing",
the reverse is "new"; a row whose samples were measured on different inputs (another
`input_sha256` for the same sample id) is "inputs differ" and gets no paired test. Each metric's
direction comes from the task description the runs record (run.json's `task_info`). A matched
row is a regression when the candidate is worse by more than the metric's tolerance (and, if
asked, significantly so by the paired test of `diffbench.stats`). A regression gate also fails
on every row it cannot compare: missing rows and rows whose inputs differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from diffbench import stats, variants
from diffbench.api import METRIC_COLUMNS
from diffbench.errors import DiffbenchError
from diffbench.results import Results, load_run, merge_task_infos
from diffbench.stats import Difference, SampleScores
from diffbench.store import natural_key

STATUSES = (
    "regression",
    "missing",
    "inputs differ",
    "new",
    "improvement",
    "changed",  # beyond tolerance on a metric with no better direction (a median's level)
    "not significant",
    "unchanged",
)
# What each --fail-on value fails on: a regression gate cannot pass a row it cannot compare.
GATE_STATUSES = {
    "regression": ("regression", "missing", "inputs differ"),
    "missing": ("missing",),
}
GATES = frozenset(GATE_STATUSES)
# Float noise below this never counts as a change (metrics.csv keeps 10 significant digits).
EPSILON = 1e-9
# A comparison tests every row it matched: significance is read from p-values adjusted over
# them all (Benjamini-Hochberg unless --adjust says otherwise).
DEFAULT_ADJUSTMENT = "benjamini-hochberg"
ADJUST_CHOICES = {"bh": "benjamini-hochberg", "holm": "holm", "none": "none"}


@dataclass(frozen=True)
class Tolerance:
    """Absolute change a metric may make before it counts: one default, overrides per metric."""

    default: float = 0.0
    per_metric: dict[str, float] = field(default_factory=dict)

    def of(self, metric: str) -> float:
        """The tolerance of `metric`."""
        return self.per_metric.get(metric, self.default)

    def __str__(self) -> str:
        parts = [f"{self.default:g}"] + [f"{m}={v:g}" for m, v in sorted(self.per_metric.items())]
        return ",".join(parts)


def parse_tolerance(text: str) -> Tolerance:
    """`0.02`, `accuracy=0.05,loss=0.1` or both (`0.02,loss=0.1`) as a Tolerance."""
    default, per_metric = 0.0, {}
    for part in (p.strip() for p in text.split(",")):
        name, _, value = part.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise DiffbenchError(
                f"malformed --tolerance {text!r}: expected 0.02 or METRIC=0.05,..."
            ) from None
        if not math.isfinite(number) or number < 0:
            raise DiffbenchError(f"--tolerance {part!r} must be a non-negative number")
        if name:
            per_metric[name.strip()] = number
        else:
            default = number
    return Tolerance(default, per_metric)


def parse_map(entries: Sequence[str]) -> dict[str, str]:
    """`--map OLD=NEW` entries (each may hold several, comma-separated) as {old: new}."""
    out: dict[str, str] = {}
    for entry in entries:
        for part in entry.split(","):
            old, sep, new = part.partition("=")
            if not sep or not old.strip() or not new.strip():
                raise DiffbenchError(f"malformed --map {part!r}: expected OLD=NEW")
            out[old.strip()] = new.strip()
    return out


@dataclass(frozen=True)
class Change:
    """One compared row: its identity, both values, the paired difference and its status."""

    task: str
    metric: str
    model: str
    setting: tuple[tuple[str, str], ...]
    baseline: float | None
    candidate: float | None
    difference: Difference | None
    lower_is_better: bool
    tolerance: float
    status: str
    better: str = "higher"  # "higher", "lower" or "none"

    @property
    def setting_text(self) -> str:
        """The setting as `key=value, ...`."""
        return ", ".join(f"{k}={v}" for k, v in self.setting)


@dataclass(frozen=True)
class Comparison:
    """Every compared row of a baseline and a candidate, and the gate's settings."""

    baseline: str
    candidate: str
    changes: tuple[Change, ...]
    tolerance: Tolerance
    require_significance: bool
    fail_on: frozenset[str]
    level: float = stats.LEVEL
    adjustment: str = DEFAULT_ADJUSTMENT

    def count(self, status: str) -> int:
        """How many rows have `status`."""
        return sum(c.status == status for c in self.changes)

    @property
    def failing(self) -> tuple[str, ...]:
        """The statuses the gate fails on, in STATUSES order."""
        chosen = {s for gate in self.fail_on for s in GATE_STATUSES[gate]}
        return tuple(s for s in STATUSES if s in chosen)

    @property
    def failed(self) -> bool:
        """Whether a row's status is one the gate fails on."""
        return any(c.status in self.failing for c in self.changes)

    @property
    def outcome(self) -> str:
        """The gate's one-line outcome: PASS or FAIL (with what failed it) and the counts."""
        counts = ", ".join(f"{self.count(s)} {s}" for s in STATUSES if self.count(s))
        if not self.fail_on:
            return f"{len(self.changes)} rows compared: {counts}"
        if not self.failed:
            return f"PASS: {len(self.changes)} rows compared: {counts}"
        causes = ", ".join(f"{self.count(s)} {s}" for s in self.failing if self.count(s))
        return f"FAIL: {len(self.changes)} rows compared: {counts}; failed on {causes}"


def _status(
    gain: float, tolerance: float, difference: Difference, require_significance: bool, better: str
) -> str:
    if abs(gain) <= tolerance + EPSILON:
        return "unchanged"
    if require_significance and not difference.significant:
        return "not significant"
    if better == "none":
        return "changed"
    return "improvement" if gain > 0 else "regression"


def _order(c: Change) -> tuple[Any, ...]:
    """Worst first, then by task, metric, model and settings in natural (numeric) order."""
    values = pd.Series([v for _, v in c.setting], dtype=object)
    setting = tuple(natural_key(values)) if len(values) else ()
    return (STATUSES.index(c.status), c.task, c.metric, c.model, setting)


def _value(v: Any) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def compare(
    baseline: Results,
    candidate: Results,
    pairs: Sequence[tuple[str | None, str | None]],
    *,
    tolerance: Tolerance | None = None,
    require_significance: bool = False,
    fail_on: Iterable[str] = (),
    names: tuple[str, str] = ("baseline", "candidate"),
    level: float = stats.LEVEL,
    adjustment: str = DEFAULT_ADJUSTMENT,
) -> Comparison:
    """Match `baseline`'s rows of model a with `candidate`'s rows of model b for each (a, b).

    None on one side of a pair: that model exists only on the other side (all its rows are new or
    missing).
    """
    tolerance = tolerance or Tolerance()
    fail_on = frozenset(fail_on)
    unknown_gate = fail_on - GATES
    if unknown_gate:
        raise DiffbenchError(
            f"unknown --fail-on {', '.join(sorted(unknown_gate))}; "
            f"choose from {', '.join(sorted(GATES))}"
        )
    known_metrics = set(baseline.metrics["metric"]) | set(candidate.metrics["metric"])
    unknown = sorted(set(tolerance.per_metric) - known_metrics)
    if unknown:
        raise DiffbenchError(
            f"--tolerance names unknown metric {', '.join(unknown)}; "
            f"these runs have {', '.join(sorted(known_metrics))}"
        )
    tasks = merge_task_infos([(names[0], baseline.tasks), (names[1], candidate.tasks)])
    settings = sorted(
        {c for r in (baseline, candidate) for c in r.metrics.columns if c not in METRIC_COLUMNS}
    )
    key = ["task", "metric", *settings]

    cache: dict[tuple[int, str, str, tuple[tuple[str, str], ...]], SampleScores | None] = {}

    def samples_of(
        results: Results, task: str, model: str, setting: tuple[tuple[str, str], ...]
    ) -> SampleScores | None:
        cache_key = (id(results), task, model, setting)
        if cache_key not in cache:
            cache[cache_key] = results.samples_of(task, model, dict(setting))
        return cache[cache_key]

    def rows(results: Results, model: str | None) -> pd.DataFrame:
        frame = results.metrics[results.metrics["model"] == model]
        return frame.reindex(columns=[*METRIC_COLUMNS, *settings]).fillna({c: "" for c in settings})

    # (change fields, difference) of every matched row: statuses wait for the adjusted p-values.
    matched: list[tuple[dict[str, Any], Difference]] = []
    changes: list[Change] = []
    matched_any = False
    for a, b in pairs:
        joined = rows(baseline, a).merge(
            rows(candidate, b), on=key, how="outer", suffixes=("_b", "_c"), indicator=True
        )
        matched_any |= bool((joined["_merge"] == "both").any())
        for _, row in joined.iterrows():
            task, metric = str(row["task"]), str(row["metric"])
            info = tasks[task]
            order = {k: i for i, k in enumerate(info.setting_keys)}
            setting = tuple(
                sorted(
                    ((c, str(row[c])) for c in settings if str(row[c]) != ""),
                    key=lambda kv: (order.get(kv[0], len(order)), kv[0]),
                )
            )
            declared = info.metric(metric)
            lower = declared.better == "lower"
            tol = tolerance.of(metric)
            base_v, cand_v = _value(row.get("value_b")), _value(row.get("value_c"))
            label = str(b if a is None or a == b else a if b is None else f"{b} vs {a}")
            if base_v is None or cand_v is None:
                status = "missing" if cand_v is None and base_v is not None else "new"
                if base_v is None and cand_v is None:
                    status = "unchanged"
                changes.append(
                    Change(
                        task, metric, label, setting, base_v, cand_v, None, lower, tol, status,
                        declared.better,
                    )
                )  # fmt: skip
                continue
            where = dict(setting)
            assert a is not None and b is not None
            diff = stats.difference(
                base_v,
                cand_v,
                reference_scores=baseline.scores(task, metric, a, where),
                candidate_scores=candidate.scores(task, metric, b, where),
                kind=declared.kind,
                level=level,
            )
            ref_samples = samples_of(baseline, task, a, setting)
            cand_samples = samples_of(candidate, task, b, setting)
            differ = diff.inputs_differ or (
                ref_samples is not None
                and cand_samples is not None
                and stats.inputs_differ(ref_samples, cand_samples)
            )
            fields: dict[str, Any] = dict(
                task=task, metric=metric, model=label, setting=setting, baseline=base_v,
                candidate=cand_v, lower_is_better=lower, tolerance=tol,
                status="inputs differ" if differ else "", better=declared.better,
            )  # fmt: skip
            matched.append((fields, diff))
    untestable: list[Change] = []
    adjusted = stats.adjust([d for _, d in matched], adjustment, level)
    for (fields, _), adj in zip(matched, adjusted, strict=True):
        gain = -adj.delta if fields["lower_is_better"] else adj.delta
        if not fields["status"]:
            fields["status"] = _status(
                gain, fields["tolerance"], adj, require_significance, fields["better"]
            )
        change = Change(difference=adj, **fields)
        if change.status == "not significant" and adj.test == "none":
            untestable.append(change)
        changes.append(change)
    if not matched_any:
        raise DiffbenchError(
            f"{names[0]} and {names[1]} have no rows in common (same task, metric, setting and "
            "model label); use --map OLD=NEW for a renamed model"
        )
    if untestable:
        metrics = sorted({f"{c.task} {c.metric}" for c in untestable})
        first = untestable[0]
        why = first.difference.reason if first.difference else "no test"
        raise DiffbenchError(
            f"--require-significance cannot test {', '.join(metrics)} ({why}), and "
            f"{len(untestable)} such row(s) changed beyond tolerance (e.g. "
            f"{first.model} {first.setting_text or first.metric}); drop the flag, or give them "
            f"a --tolerance they stay within (e.g. {first.metric}=...)"
        )
    changes.sort(key=_order)
    return Comparison(
        names[0],
        names[1],
        tuple(changes),
        tolerance,
        require_significance,
        fail_on,
        level,
        adjustment,
    )


def compare_runs(
    baseline_dir: Path, candidate_dir: Path, label_map: Mapping[str, str], **gate: Any
) -> Comparison:
    """Each baseline model against the candidate model of the same (or mapped) label."""
    baseline, candidate = load_run(baseline_dir), load_run(candidate_dir)
    for old in label_map:
        if old not in baseline.models:
            raise DiffbenchError(
                f"--map names {old!r}, which is not a model of {baseline_dir} "
                f"({', '.join(baseline.models)})"
            )
    pairs: list[tuple[str | None, str | None]] = [(m, label_map.get(m, m)) for m in baseline.models]
    matched = {b for _, b in pairs}
    pairs += [(None, m) for m in candidate.models if m not in matched]
    return compare(
        baseline, candidate, pairs, names=(str(baseline_dir), str(candidate_dir)), **gate
    )


def compare_models(run_dir: Path, reference: str, model: str, **gate: Any) -> Comparison:
    """Model `model` of one run against model `reference` of the same run; under a sweep, at
    each swept value, and each variant against its own first value (`diffbench.variants`). A
    label names a model with its variants, or one variant (KEY=VALUE) alone."""
    results = load_run(run_dir)
    bases = {variants.base_of(m) for m in results.models}
    for label in (reference, model):
        if label not in results.models and label not in bases:
            raise DiffbenchError(
                f"{label!r} is not a model of {run_dir}; it has {', '.join(results.models)}"
            )
    if reference == model:
        raise DiffbenchError("--models needs two different models, e.g. --models base,diff")
    named = {m for m in results.models if m in (reference, model)}
    named |= {m for m in results.models if variants.base_of(m) in (reference, model)}
    pairs: list[tuple[str | None, str | None]] = [
        (p.against, p.model)
        for p in variants.pairs(results.models, reference)
        if p.against in named and p.model in named
    ]
    if not pairs:
        raise DiffbenchError(
            f"{reference} and {model} share no swept value, and a sweep variant is compared "
            "with another model at its own value only: name the models (--models base,diff) or "
            "two variants at one value"
        )
    names = (f"{run_dir}:{reference}", f"{run_dir}:{model}")
    return compare(results, results, pairs, names=names, **gate)
