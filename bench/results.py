"""Run directories read into frames: metric rows, per-sample scores, and each task's description.

Everything a reader needs to know about a task (its metrics, their direction, which of them are
sample means, its setting keys and headline rows) comes from the `task_info` that run.json
records; no task plugin is imported to read a run. A run written before run.json described its
tasks falls back, in `_installed_task_info` alone, to the installed plugin, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from diffbench.api import METRIC_COLUMNS, TaskInfo, setting_text
from diffbench.errors import DiffbenchError
from diffbench.stats import SampleIndex, SampleScores
from diffbench.store import RunRecord, RunStore

log = logging.getLogger("diffbench")


@dataclass(frozen=True)
class LoadedRun:
    """One run directory of a comparison, its run record, and how its model labels appear
    there."""

    path: Path
    record: RunRecord
    labels: dict[str, str]  # label in the run -> label in the comparison


@dataclass(frozen=True)
class Results:
    """Metric rows and per-sample scores of one or more runs, with models in display order and
    each task's recorded description."""

    metrics: pd.DataFrame
    samples: dict[str, SampleIndex]
    runs: tuple[LoadedRun, ...]
    models: tuple[str, ...]
    tasks: Mapping[str, TaskInfo]

    def info(self, task: str) -> TaskInfo:
        """What the runs record about `task`."""
        return self.tasks[task]

    def setting_columns(self, task: str) -> list[str]:
        """The setting columns a task's rows use, in the task's display order."""
        rows = self.metrics[self.metrics["task"] == task]
        used = [c for c in rows.columns if c not in METRIC_COLUMNS and (rows[c] != "").any()]
        order = {k: i for i, k in enumerate(self.info(task).setting_keys)}
        return sorted(used, key=lambda c: (order.get(c, len(order)), c))

    def scores(
        self, task: str, metric: str, model: str, setting: Mapping[str, str]
    ) -> SampleScores | None:
        """Per-sample values behind a row (by sample id), or None if it is no mean of them."""
        declared = self.info(task).metric(metric)
        if not declared.sample_mean or task not in self.samples:
            return None
        found = self.samples[task].scores(model, setting, declared)
        return found if len(found) else None

    def samples_of(self, task: str, model: str, setting: Mapping[str, str]) -> SampleScores | None:
        """The samples measured in a row's setting, whatever its metric (None if there are none)."""
        if task not in self.samples:
            return None
        found = self.samples[task].scores(model, setting)
        return found if len(found) else None


def _installed_task_info(task: str, run_dir: Path) -> TaskInfo:
    """The one place a reader imports a plugin: for a run written before run.json described its
    tasks (no `task_info`), the installed plugin's description stands in, with a warning."""
    from diffbench import registry

    try:
        plugin = registry.load(task)
    except DiffbenchError:
        raise DiffbenchError(
            f"{run_dir / 'run.json'} does not describe task {task!r} (a run written before "
            f"diffbench recorded task_info) and no installed plugin provides it; install the "
            f"package that provides {task!r} to read this run"
        ) from None
    log.warning(
        "%s: run.json does not describe task %r (an older run); using the installed plugin's "
        "description of its metrics",
        run_dir,
        task,
    )
    return TaskInfo.of(plugin)


def task_infos(run_dir: Path, record: RunRecord, tasks: Iterable[str]) -> dict[str, TaskInfo]:
    """Each of `tasks` as run.json describes it (an older run: as its installed plugin does)."""
    recorded = record.task_info
    out: dict[str, TaskInfo] = {}
    for task in tasks:
        if task not in recorded:
            out[task] = _installed_task_info(task, run_dir)
            continue
        try:
            out[task] = TaskInfo.from_json(recorded[task])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise DiffbenchError(
                f"{run_dir / 'run.json'}: task_info of {task!r} is malformed ({err!r})"
            ) from None
    return out


def merge_task_infos(sources: Sequence[tuple[str, Mapping[str, TaskInfo]]]) -> dict[str, TaskInfo]:
    """One description per task from several runs (the first run's), refusing runs that disagree
    on which direction of a metric is better: a gate or a report could not honour both."""
    out: dict[str, TaskInfo] = {}
    first_seen: dict[str, str] = {}
    for where, infos in sources:
        for task, info in infos.items():
            if task not in out:
                out[task], first_seen[task] = info, where
                continue
            known = out[task]
            shared = set(known.metrics) & set(info.metrics)
            flipped = sorted(
                m for m in shared if known.higher_is_better(m) != info.higher_is_better(m)
            )
            if flipped:
                raise DiffbenchError(
                    f"{first_seen[task]} and {where} disagree on whether lower is better for "
                    f"{task} {', '.join(flipped)}; compare runs of one version of the task"
                )
    return out


def load_run(run_dir: Path) -> Results:
    """One run directory's metrics, samples and task descriptions."""
    store = RunStore.open_existing(run_dir)
    record = store.read_record()
    metrics = store.metrics()
    for column in (c for c in metrics.columns if c not in METRIC_COLUMNS):
        # A setting written 25.0 by one run and 25 by another is one setting.
        metrics[column] = metrics[column].map(lambda v: "" if v == "" else setting_text(v))
    # In the run's own task order (run.json's `task_order`; runs before it: alphabetical).
    measured = set(metrics["task"].unique())
    order = [t for t in record.task_order if t in measured]
    names = order + sorted(measured - set(order))
    tasks = task_infos(run_dir, record, names)
    samples: dict[str, SampleIndex] = {}
    for task in names:
        keys = tasks[task].setting_keys or tuple(
            c for c in metrics.columns if c not in METRIC_COLUMNS
        )
        samples[task] = SampleIndex.build(store.samples(task), keys, tasks[task].metric_defs)
    configured = record.model_labels
    present = list(dict.fromkeys(metrics["model"]))
    models = [m for m in configured if m in present] + [m for m in present if m not in configured]
    labels = {m: m for m in models}
    return Results(metrics, samples, (LoadedRun(run_dir, record, labels),), tuple(models), tasks)


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
    runs = tuple(LoadedRun(r.path, r.record, labels) for r in results.runs)
    return Results(metrics, samples, runs, tuple(labels.values()), results.tasks)


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
    tasks = merge_task_infos([(str(p.runs[0].path), p.tasks) for p in parts])
    samples: dict[str, SampleIndex] = {}
    for task in sorted(metrics["task"].unique()):
        indexes = [p.samples[task] for p in parts if task in p.samples]
        keys = tuple(dict.fromkeys(k for i in indexes for k in i.setting_keys))
        frame = pd.concat([i.frame for i in indexes], ignore_index=True)
        raw = pd.concat([i.raw for i in indexes], ignore_index=True)
        samples[task] = SampleIndex(frame, keys, raw)
    runs = tuple(r for p in parts for r in p.runs)
    return Results(metrics, samples, runs, tuple(m for p in parts for m in p.models), tasks)


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
    """Run directories directly under `root` (those holding run.json), oldest first; one whose
    run.json cannot be read (damaged, or from a newer diffbench) is left out with a warning."""
    if not root.is_dir():
        raise DiffbenchError(f"{root} is not a directory; run something first or pass --root")
    out = []
    for run_file in root.glob("*/run.json"):
        try:
            record = RunStore(run_file.parent).read_record()
        except DiffbenchError as err:
            log.warning("skipping %s: %s", run_file.parent, err)
            continue
        out.append(
            RunSummary(
                run_file.parent,
                record.task_names,
                record.model_labels,
                record.started,
                record.finished,
            )
        )
    return sorted(out, key=lambda r: (r.started, r.path.name))
