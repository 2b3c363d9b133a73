"""Runs and models side by side: load run directories, match their metric rows, gate on changes.

Rows match on task, metric, model label and every setting column (numbers compared as numbers:
`25.0` is `25`). A baseline row without a candidate value (absent, empty or NaN) is "missing",
the reverse is "new"; a row whose samples were measured on different inputs (another
`input_sha256` for the same sample id) is "inputs differ" and gets no paired test. Each metric's
direction comes from its task (`lower_is_better`). A matched row is a regression when the
candidate is worse by more than the metric's tolerance (and, if asked, significantly so by the
paired test of `diffbench.stats`). A regression gate also fails on every row it cannot compare:
missing rows and rows whose inputs differ.
"""

from __future__ import annotations

import functools
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from diffbench import registry, stats
from diffbench.errors import DiffbenchError
from diffbench.stats import Difference, SampleIndex, SampleScores
from diffbench.store import METRIC_COLUMNS, RunStore, natural_key

STATUSES = (
    "regression",
    "missing",
    "inputs differ",
    "new",
    "improvement",
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


# ---- loading runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """One run directory of a comparison and how its model labels appear there."""

    path: Path
    record: dict[str, Any]
    labels: dict[str, str]  # label in the run -> label in the comparison


@dataclass(frozen=True)
class Results:
    """Metric rows and per-sample scores of one or more runs, with models in display order."""

    metrics: pd.DataFrame
    samples: dict[str, SampleIndex]
    runs: tuple[RunRecord, ...]
    models: tuple[str, ...]

    def setting_columns(self, task: str) -> list[str]:
        """The setting columns a task's rows use, in the task's display order."""
        rows = self.metrics[self.metrics["task"] == task]
        used = [c for c in rows.columns if c not in METRIC_COLUMNS and (rows[c] != "").any()]
        order = {k: i for i, k in enumerate(_task_setting_keys(task))}
        return sorted(used, key=lambda c: (order.get(c, len(order)), c))

    def scores(
        self, task: str, metric: str, model: str, setting: Mapping[str, str]
    ) -> SampleScores | None:
        """Per-sample scores behind a row (by sample id), or None if it is no mean of them."""
        if metric not in stats.sample_mean_metrics(task):
            return None
        return self.samples_of(task, model, setting)

    def samples_of(self, task: str, model: str, setting: Mapping[str, str]) -> SampleScores | None:
        """The samples measured in a row's setting, whatever its metric (None if there are none)."""
        if task not in self.samples:
            return None
        found = self.samples[task].scores(model, setting)
        return found if len(found) else None


@functools.cache
def _task_setting_keys(task: str) -> tuple[str, ...]:
    try:
        return tuple(registry.load(task).setting_keys)
    except DiffbenchError:
        return ()


def load_run(run_dir: Path) -> Results:
    """One run directory's metrics and samples."""
    store = RunStore.open_existing(run_dir)
    record = store.read_run()
    metrics = store.metrics()
    for column in (c for c in metrics.columns if c not in METRIC_COLUMNS):
        # A setting written 25.0 by one run and 25 by another is one setting.
        metrics[column] = metrics[column].map(lambda v: "" if v == "" else stats.setting_text(v))
    samples: dict[str, SampleIndex] = {}
    for task in sorted(metrics["task"].unique()):
        keys = _task_setting_keys(task) or tuple(
            c for c in metrics.columns if c not in METRIC_COLUMNS
        )
        samples[task] = SampleIndex.build(store.samples(task), keys)
    configured = [m["label"] for m in record.get("config", {}).get("models", [])]
    present = list(dict.fromkeys(metrics["model"]))
    models = [m for m in configured if m in present] + [m for m in present if m not in configured]
    labels = {m: m for m in models}
    return Results(metrics, samples, (RunRecord(run_dir, record, labels),), tuple(models))


def _relabel(results: Results, suffix: str) -> Results:
    labels = {m: f"{m}@{suffix}" for m in results.models}
    metrics = results.metrics.assign(model=results.metrics["model"].map(labels))
    samples = {
        t: SampleIndex(
            s.frame.assign(model=s.frame["model"].map(labels)),
            s.setting_keys,
            s.raw.assign(model=s.raw["model"].map(labels)) if "model" in s.raw else s.raw,
        )
        for t, s in results.samples.items()
    }
    runs = tuple(RunRecord(r.path, r.record, labels) for r in results.runs)
    return Results(metrics, samples, runs, tuple(labels.values()))


def row_keys(metrics: pd.DataFrame) -> set[tuple[str, ...]]:
    """(task, metric, setting values...) of every row, model left out."""
    settings = sorted(c for c in metrics.columns if c not in METRIC_COLUMNS)
    return set(metrics[["task", "metric", *settings]].itertuples(index=False, name=None))


def load_runs(run_dirs: Sequence[Path]) -> Results:
    """Several runs merged into one comparison; labels shared by runs get `@<run name>` added."""
    parts = [load_run(d) for d in run_dirs]
    if len(parts) == 1:
        return parts[0]
    seen = [m for p in parts for m in p.models]
    names = [p.runs[0].path.name for p in parts]
    suffixes = names if len(set(names)) == len(names) else [str(i + 1) for i in range(len(parts))]
    parts = [
        _relabel(p, s) if any(seen.count(m) > 1 for m in p.models) else p
        for p, s in zip(parts, suffixes, strict=True)
    ]
    metrics = pd.concat([p.metrics for p in parts], ignore_index=True)
    settings = [c for c in metrics.columns if c not in METRIC_COLUMNS]
    metrics[settings] = metrics[settings].fillna("")  # a setting one run's tasks do not have
    common = set.intersection(*(row_keys(metrics[metrics["model"].isin(p.models)]) for p in parts))
    if not common:
        raise DiffbenchError(
            f"runs {', '.join(str(d) for d in run_dirs)} have no rows in common "
            "(no task, metric and setting that they all measured)"
        )
    samples: dict[str, SampleIndex] = {}
    for task in sorted(metrics["task"].unique()):
        indexes = [p.samples[task] for p in parts if task in p.samples]
        keys = tuple(dict.fromkeys(k for i in indexes for k in i.setting_keys))
        frame = pd.concat([i.frame for i in indexes], ignore_index=True)
        raw = pd.concat([i.raw for i in indexes], ignore_index=True)
        samples[task] = SampleIndex(frame, keys, raw)
    runs = tuple(r for p in parts for r in p.runs)
    return Results(metrics, samples, runs, tuple(m for p in parts for m in p.models))


# ---- tolerance -----------------------------------------------------------------------------


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


# ---- matching and the gate -----------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One compared row: its identity, both values, the paired difference and its verdict."""

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


@functools.cache
def _direction(task: str) -> frozenset[str]:
    try:
        return frozenset(registry.load(task).lower_is_better)
    except DiffbenchError:
        raise DiffbenchError(
            f"task {task!r} is not installed, so which direction of its metrics is better "
            "is unknown; install the package that provides it"
        ) from None


def _status(
    gain: float, tolerance: float, difference: Difference, require_significance: bool
) -> str:
    if abs(gain) <= tolerance + EPSILON:
        return "unchanged"
    if require_significance and not difference.significant:
        return "not significant"
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

    changes: list[Change] = []
    untestable: list[Change] = []
    matched_any = False
    for a, b in pairs:
        joined = rows(baseline, a).merge(
            rows(candidate, b), on=key, how="outer", suffixes=("_b", "_c"), indicator=True
        )
        matched_any |= bool((joined["_merge"] == "both").any())
        for _, row in joined.iterrows():
            task, metric = str(row["task"]), str(row["metric"])
            order = {k: i for i, k in enumerate(_task_setting_keys(task))}
            setting = tuple(
                sorted(
                    ((c, str(row[c])) for c in settings if str(row[c]) != ""),
                    key=lambda kv: (order.get(kv[0], len(order)), kv[0]),
                )
            )
            lower = metric in _direction(task)
            tol = tolerance.of(metric)
            base_v, cand_v = _value(row.get("value_b")), _value(row.get("value_c"))
            label = str(b if a is None or a == b else a if b is None else f"{b} vs {a}")
            if base_v is None or cand_v is None:
                status = "missing" if cand_v is None and base_v is not None else "new"
                if base_v is None and cand_v is None:
                    status = "unchanged"
                changes.append(
                    Change(task, metric, label, setting, base_v, cand_v, None, lower, tol, status)
                )
                continue
            where = dict(setting)
            assert a is not None and b is not None
            diff = stats.difference(
                base_v,
                cand_v,
                reference_scores=baseline.scores(task, metric, a, where),
                candidate_scores=candidate.scores(task, metric, b, where),
                reference_stderr=float(row["stderr_b"]),
                candidate_stderr=float(row["stderr_c"]),
                level=level,
            )
            ref_samples = samples_of(baseline, task, a, setting)
            cand_samples = samples_of(candidate, task, b, setting)
            differ = diff.inputs_differ or (
                ref_samples is not None
                and cand_samples is not None
                and stats.inputs_differ(ref_samples, cand_samples)
            )
            gain = -diff.delta if lower else diff.delta
            status = "inputs differ" if differ else _status(gain, tol, diff, require_significance)
            change = Change(task, metric, label, setting, base_v, cand_v, diff, lower, tol, status)
            if status == "not significant" and diff.test == "none":
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
        raise DiffbenchError(
            f"--require-significance cannot test {', '.join(metrics)}: no per-sample scores and "
            f"no stderr, and {len(untestable)} such row(s) changed beyond tolerance (e.g. "
            f"{first.model} {first.setting_text or first.metric}); drop the flag, or give them "
            f"a --tolerance they stay within (e.g. {first.metric}=...)"
        )
    changes.sort(key=_order)
    return Comparison(
        names[0], names[1], tuple(changes), tolerance, require_significance, fail_on, level
    )


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
    """Model `model` of one run against model `reference` of the same run."""
    results = load_run(run_dir)
    for label in (reference, model):
        if label not in results.models:
            raise DiffbenchError(
                f"{label!r} is not a model of {run_dir}; it has {', '.join(results.models)}"
            )
    if reference == model:
        raise DiffbenchError("--models needs two different models, e.g. --models base,diff")
    names = (f"{run_dir}:{reference}", f"{run_dir}:{model}")
    return compare(results, results, [(reference, model)], names=names, **gate)


# ---- output --------------------------------------------------------------------------------


def _num(v: float | None, sign: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:+.3f}" if sign else f"{v:.3f}"


def _ci(d: Difference | None) -> str:
    if d is None or d.interval is None:
        return "—"
    return f"[{d.interval.low:+.3f}, {d.interval.high:+.3f}]"


def _p(d: Difference | None) -> str:
    if d is None or d.p_value is None:
        return "—"
    return f"{d.p_value:.3g}"


def _cells(c: Change) -> list[str]:
    d = c.difference
    arrow = "↓" if c.lower_is_better else "↑"
    return [
        c.status,
        c.task,
        f"{c.metric} {arrow}",
        c.setting_text or "—",
        c.model,
        _num(c.baseline),
        _num(c.candidate),
        _num(d.delta if d else None, sign=True),
        _ci(d),
        _p(d),
        f"{c.tolerance:g}",
    ]


HEADER = ["status", "task", "metric", "setting", "model", "baseline", "candidate", "Δ"]
HEADER += ["95% CI", "p", "tolerance"]


def _verdict(cmp: Comparison) -> str:
    counts = ", ".join(f"{cmp.count(s)} {s}" for s in STATUSES if cmp.count(s))
    if not cmp.fail_on:
        return f"{len(cmp.changes)} rows compared: {counts}"
    if not cmp.failed:
        return f"PASS: {len(cmp.changes)} rows compared: {counts}"
    causes = ", ".join(f"{cmp.count(s)} {s}" for s in cmp.failing if cmp.count(s))
    return f"FAIL: {len(cmp.changes)} rows compared: {counts}; failed on {causes}"


def render_text(cmp: Comparison) -> str:
    """An aligned plain-text table of every compared row, worst first."""
    header = [h if h != "95% CI" else f"{cmp.level:.0%} CI" for h in HEADER]
    table = [header, *(_cells(c) for c in cmp.changes)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [f"baseline:  {cmp.baseline}", f"candidate: {cmp.candidate}", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in table]
    lines += ["", _verdict(cmp)]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _md_table(rows: Sequence[Change], level: float) -> list[str]:
    header = [h if h != "95% CI" else f"{level:.0%} CI" for h in HEADER]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in rows:
        cells = _cells(c)
        if c.status in ("regression", "missing", "inputs differ"):
            cells[0] = f"**{c.status}**"
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return out


def render_markdown(cmp: Comparison) -> str:
    """GitHub-flavoured Markdown: verdict, the rows that changed, then every row folded."""
    icon = "" if not cmp.fail_on else ("❌ " if cmp.failed else "✅ ")
    out = [f"### {icon}diffbench compare", ""]
    out.append(f"Baseline `{cmp.baseline}`, candidate `{cmp.candidate}`.")
    out.append("")
    out.append(f"**{_verdict(cmp)}.**")
    gate = (
        f"Tolerance {cmp.tolerance}"
        + (", significance required" if cmp.require_significance else "")
        + f"; failing on {', '.join(cmp.failing) or 'nothing'}."
    )
    out += ["", gate, ""]
    notable = [c for c in cmp.changes if c.status != "unchanged"]
    if notable:
        out += _md_table(notable, cmp.level)
    else:
        out.append("No row changed beyond its tolerance.")
    out += ["", f"<details><summary>All {len(cmp.changes)} rows</summary>", ""]
    out += _md_table(cmp.changes, cmp.level)
    out += ["", "</details>", ""]
    out.append(
        "Δ = candidate − baseline; ↑/↓: higher/lower is better. Intervals: paired bootstrap over "
        "samples shared by id (whole clusters where samples share a `cluster`, e.g. one test "
        "example under several draws); p: McNemar's exact test for binary scores without "
        "clusters, else the sign-flip test on per-cluster sums of the paired differences; rows "
        "without samples: normal approximation from both stderrs. Inputs differ: a sample id "
        "was measured on different inputs in the two runs, so no paired test."
    )
    tests = sorted({c.difference.test for c in cmp.changes if c.difference is not None} - {"none"})
    if tests:
        out.append(f"Tests used: {', '.join(tests)}.")
    return "\n".join(out) + "\n"


def _change_dict(c: Change) -> dict[str, Any]:
    d = c.difference
    return {
        "task": c.task,
        "metric": c.metric,
        "model": c.model,
        "setting": dict(c.setting),
        "baseline": c.baseline,
        "candidate": c.candidate,
        "delta": d.delta if d else None,
        "interval": [d.interval.low, d.interval.high] if d and d.interval else None,
        "interval_method": d.interval.method if d and d.interval else None,
        "p_value": d.p_value if d else None,
        "test": d.test if d else None,
        "significant": d.significant if d else None,
        "n_pairs": d.n_pairs if d else None,
        "n_clusters": d.n_clusters if d else None,
        "inputs_differ": c.status == "inputs differ",
        "lower_is_better": c.lower_is_better,
        "tolerance": c.tolerance,
        "status": c.status,
    }


def render_json(cmp: Comparison) -> str:
    """Every compared row and the gate's verdict as JSON."""
    data = {
        "baseline": cmp.baseline,
        "candidate": cmp.candidate,
        "level": cmp.level,
        "tolerance": asdict(cmp.tolerance),
        "require_significance": cmp.require_significance,
        "fail_on": sorted(cmp.fail_on),
        "failing_statuses": list(cmp.failing),
        "failed": cmp.failed,
        "counts": {s: cmp.count(s) for s in STATUSES},
        "changes": [_change_dict(c) for c in cmp.changes],
    }
    return json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"


def render_junit(cmp: Comparison) -> str:
    """JUnit XML: one testcase per compared row; regressions (and gated rows) are failures."""
    failing = {"regression"} | set(cmp.failing)
    suite = ET.Element(
        "testsuite",
        name="diffbench compare",
        tests=str(len(cmp.changes)),
        failures=str(sum(c.status in failing for c in cmp.changes)),
        errors="0",
        skipped=str(
            sum(c.status in ("missing", "new") and c.status not in failing for c in cmp.changes)
        ),
    )
    props = ET.SubElement(suite, "properties")
    for name, value in (("baseline", cmp.baseline), ("candidate", cmp.candidate)):
        ET.SubElement(props, "property", name=name, value=value)
    for c in cmp.changes:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"diffbench.{c.task}.{c.metric}",
            name=f"{c.model} [{c.setting_text}]" if c.setting else c.model,
        )
        d = c.difference
        text = (
            f"{c.status}: baseline {_num(c.baseline)}, candidate {_num(c.candidate)}, "
            f"delta {_num(d.delta if d else None, sign=True)} {_ci(d)}, p {_p(d)}, "
            f"tolerance {c.tolerance:g}, {'lower' if c.lower_is_better else 'higher'} is better"
        )
        if c.status in failing:
            ET.SubElement(case, "failure", message=text, type=c.status).text = text
        elif c.status in ("missing", "new"):
            ET.SubElement(case, "skipped", message=text)
        else:
            ET.SubElement(case, "system-out").text = text
    root = ET.Element("testsuites", name="diffbench", tests=suite.get("tests", "0"))
    root.set("failures", suite.get("failures", "0"))
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


RENDERERS = {"text": render_text, "md": render_markdown, "json": render_json, "junit": render_junit}


# ---- listing runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """What `diffbench runs` shows of one run directory."""

    path: Path
    tasks: tuple[str, ...]
    models: tuple[str, ...]
    started: str
    finished: str | None


def list_runs(root: Path) -> list[RunSummary]:
    """Run directories directly under `root` (those holding run.json), oldest first."""
    if not root.is_dir():
        raise DiffbenchError(f"{root} is not a directory; run something first or pass --root")
    out = []
    for run_file in root.glob("*/run.json"):
        try:
            record = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        config = record.get("config", {})
        out.append(
            RunSummary(
                run_file.parent,
                tuple(config.get("tasks", {})),
                tuple(m.get("label", "?") for m in config.get("models", [])),
                str(record.get("started", "")),
                record.get("finished"),
            )
        )
    return sorted(out, key=lambda r: (r.started, r.path.name))
