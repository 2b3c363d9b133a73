"""Reports of one run, or several merged: what report.md and report.html show, and their figures.

A report opens with the paper in miniature: for each table a task's plugin declared the paper's
numbers of (`TaskInfo.paper`), the run's rows beside the paper's. A summary follows: each task's
headline rows (the rows its paper reports, as run.json
records them in `task_info`), a column per model with its 95% interval, and each model's
difference from the reference model with a paired test. A section per task follows with its
figures and every setting, then provenance. Everything comes from the store, figures too (drawn
from the figure specs run.json records): no task plugin is imported. `diffbench.render` lays
the report out and draws the figures.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
from diffbench import figures, stats, variants
from diffbench.api import (
    ALL,
    ARROWS,
    LARGEST,
    WILDCARDS,
    Headline,
    MetricKind,
    PaperRef,
    TaskInfo,
    setting_text,
)
from diffbench.config import split_variant
from diffbench.errors import DiffbenchError
from diffbench.render.figures import task_figures
from diffbench.render.report import html_page, markdown
from diffbench.render.view import Line, PaperRow, PaperTable, Report, TaskSection
from diffbench.results import Results, load_runs
from diffbench.stats import Difference, Estimate, SampleScores
from diffbench.store import RunStore, natural_key, write_atomic

log = logging.getLogger("diffbench")

DIFFERENCES_STEM = "diffbench_differences"
LEVEL = stats.LEVEL
# Multiplicity control: Holm over the paper section's differences, Benjamini-Hochberg over
# every other row's.
PAPER_FAMILY = "holm"
EXPLORATORY = "benjamini-hochberg"


def lines(results: Results, rows: pd.DataFrame, reference: str, level: float) -> list[Line]:
    """Report lines for metric rows (one task), in metrics.csv's natural order."""
    if rows.empty:
        return []
    task = str(rows["task"].iloc[0])
    info = results.info(task)
    settings = results.setting_columns(task)
    # Paired over the run's models, so a variant's first value is the sweep's, not the row's.
    paired = variants.pairs(results.models, reference)
    rows = rows.sort_values([*settings, "metric"], key=natural_key, kind="stable")
    out: list[Line] = []
    for key, group in rows.groupby([*settings, "metric"], sort=False):
        values = key if isinstance(key, tuple) else (key,)
        setting = tuple(zip(settings, map(str, values[:-1]), strict=True))
        metric = str(values[-1])
        where = dict(setting)
        by_model = {str(r["model"]): r for _, r in group.iterrows()}
        declared = info.metric(metric)
        scores = {m: results.scores(task, metric, m, where) for m in by_model}
        estimates = {
            m: stats.estimate(
                float(r["value"]),
                None if pd.isna(r["n"]) else int(r["n"]),
                float(r["stderr"]),
                scores[m],
                declared.kind,
                level,
            )
            for m, r in by_model.items()
        }

        row_values = {m: float(r["value"]) for m, r in by_model.items()}

        diffs: dict[str, Difference] = {}
        against: dict[str, str] = {}
        sweep_diffs: dict[str, Difference] = {}
        sweep_against: dict[str, str] = {}
        for pair in paired:
            if pair.model not in by_model or pair.against not in by_model:
                continue
            diff = _difference(row_values, scores, declared.kind, level, pair.against, pair.model)
            (sweep_diffs if pair.within else diffs)[pair.model] = diff
            (sweep_against if pair.within else against)[pair.model] = pair.against
        # The models answered the same requests: the first that records a chance gives it.
        levels = (sc.chance_level() for sc in scores.values() if sc is not None)
        chance = next((c for c in levels if c is not None), None)
        out.append(
            Line(
                task,
                metric,
                setting,
                declared.better == "lower",
                estimates,
                diffs,
                chance,
                declared.better,
                declared.unit,
                against,
                sweep_diffs,
                sweep_against,
            )
        )
        if declared.relative and reference in by_model:
            out.append(relative_line(out[-1], declared.relative, row_values, scores, reference))
    return out


def relative_line(
    line: Line,
    name: str,
    values: dict[str, float],
    scores: dict[str, SampleScores | None],
    reference: str,
) -> Line:
    """The line of a metric's `relative` twin: each model's value over the reference's, minus 1,
    with a t interval over the per-unit ratios where both measured the same units (throughput's
    interleaved repeats). Its test is the absolute row's; this line carries none."""
    estimates: dict[str, Estimate] = {}
    base = values[reference]
    for m, value in values.items():
        if m == reference or base == 0:
            estimates[m] = Estimate(0.0 if m == reference else float("nan"), None, None)
            continue
        ref_s, own = scores.get(reference), scores.get(m)
        interval, n, k = None, None, None
        if ref_s is not None and own is not None:
            shared = ref_s.score.index.intersection(own.score.index)
            ratios = own.score.loc[shared].to_numpy(float) / ref_s.score.loc[shared].to_numpy(float)
            n, k = len(shared), int(own.cluster.loc[shared].nunique())
            interval = stats.mean_interval(ratios - 1, own.cluster.loc[shared].to_numpy(), "mean")
            if interval is not None:
                interval = stats.Interval(interval.low, interval.high, "t over paired ratios")
                # Centred on the row's ratio of means rather than the mean of ratios.
                interval = stats.shifted(interval, value / base - 1, float((ratios - 1).mean()))
        estimates[m] = Estimate(value / base - 1, n, interval, k)
    return replace(
        line,
        metric=name,
        estimates=estimates,
        differences={},
        against={},
        sweep_differences={},
        sweep_against={},
        chance=None,
    )


def _difference(
    values: dict[str, float],
    scores: dict[str, SampleScores | None],
    kind: MetricKind,
    level: float,
    reference: str,
    model: str,
) -> Difference:
    """`model`'s row against `reference`'s, paired over their samples."""
    return stats.difference(
        values[reference],
        values[model],
        reference_scores=scores[reference],
        candidate_scores=scores[model],
        kind=kind,
        level=level,
    )


def _largest(values: Sequence[str]) -> str | None:
    """The largest of setting values in natural order (numbers as numbers), wildcards left out."""
    real = pd.Series([v for v in values if v not in WILDCARDS], dtype=object)
    if real.empty:
        return None
    return str(max(zip(natural_key(real), real, strict=True))[1])


def headline_lines(info: TaskInfo, task_lines: Sequence[Line]) -> list[Line]:
    """The lines a task's summary shows: for each of its headline rows, the lines of that
    metric whose settings match the headline's fixed values (a value, ALL, or LARGEST: the
    largest value among lines that agree on every other fixed setting), in headline order,
    each at the run's largest setting (`at_largest`). A task that declares none: the lines
    averaged over every averaged setting, at the run's largest setting."""
    chosen: list[Line] = []
    for found, fixed in _headline_groups(info, task_lines):
        chosen += [ln for ln in at_largest(found, fixed)[0] if ln not in chosen]
    return chosen


def _headline_groups(
    info: TaskInfo, task_lines: Sequence[Line]
) -> list[tuple[list[Line], frozenset[str]]]:
    """Each headline's matching lines and the settings it fixes (a task with none: one group of
    the lines averaged over every averaged setting)."""
    if not info.headline:
        averaged = {k for ln in task_lines for k, v in ln.setting if v == ALL}
        found = [ln for ln in task_lines if all(dict(ln.setting).get(k) == ALL for k in averaged)]
        return [(found, frozenset(averaged))]
    return [(matching_lines(head, task_lines), frozenset(head.where)) for head in info.headline]


def at_largest(
    found: Sequence[Line], fixed: frozenset[str] = frozenset()
) -> tuple[list[Line], list[str], list[str]]:
    """Of the lines of one headline, those at the run's largest setting, with the settings it
    averaged over and those it took the largest of. Of each setting not in `fixed`: the line
    averaged over it (value ALL) rather than its per-value lines (NIAH's depths); then, among
    lines that agree on every text setting (a mode, a dataset: a row each), those with the
    largest numbers (a length, a shot count, N/R), compared in setting order."""
    keys = list(dict.fromkeys(k for ln in found for k, _ in ln.setting if k not in fixed))
    shown = {ln.setting for ln in found}

    def averaged_twin(ln: Line, key: str) -> bool:
        twin = tuple((k, ALL if k == key else v) for k, v in ln.setting)
        return dict(ln.setting).get(key) not in WILDCARDS and twin in shown

    averaged = [k for k in keys if any(averaged_twin(ln, k) for ln in found)]
    kept = [ln for ln in found if not any(averaged_twin(ln, k) for k in averaged)]
    numeric = [
        k
        for k in keys
        if all(_is_number(v) for ln in kept if (v := dict(ln.setting).get(k, "")) not in WILDCARDS)
    ]

    def group(ln: Line) -> tuple[object, ...]:
        s = dict(ln.setting)
        text = tuple((k, v) for k, v in ln.setting if k not in numeric)
        return (ln.metric, text, tuple(s.get(k, "") == "" for k in numeric))

    def rank(ln: Line) -> tuple[tuple[int, float], ...]:
        s = dict(ln.setting)
        # A row averaged over a setting stands above each of its values.
        return tuple(
            (2, 0.0) if v == ALL else (0, 0.0) if v == "" else (1, float(v))
            for v in (s.get(k, "") for k in numeric)
        )

    top: dict[tuple[object, ...], tuple[tuple[int, float], ...]] = {}
    for ln in kept:
        top[group(ln)] = max(top.get(group(ln), rank(ln)), rank(ln))
    largest = [k for k in numeric if len({dict(ln.setting).get(k) for ln in kept}) > 1]
    return [ln for ln in kept if rank(ln) == top[group(ln)]], averaged, largest


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def matching_lines(head: Headline | PaperRef, task_lines: Sequence[Line]) -> list[Line]:
    """The lines of `head.metric` whose settings match `head.where` (a value, ALL, or LARGEST:
    the largest value among lines that agree on every other fixed setting), in line order."""
    fixed = {k: setting_text(v) for k, v in head.where.items() if v != LARGEST}
    largest = [k for k, v in head.where.items() if v == LARGEST]
    found = [
        ln
        for ln in task_lines
        if ln.metric == head.metric and all(dict(ln.setting).get(k) == v for k, v in fixed.items())
    ]
    for key in largest:
        # "Largest" within each group of lines that agree on every setting but this one.
        groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
        for ln in found:
            rest = tuple(kv for kv in ln.setting if kv[0] != key)
            groups.setdefault(rest, []).append(dict(ln.setting).get(key, ""))
        top = {rest: _largest(vals) for rest, vals in groups.items()}
        found = [
            ln
            for ln in found
            if dict(ln.setting).get(key) == top[tuple(kv for kv in ln.setting if kv[0] != key)]
        ]
    return found


def paper_table(
    task: str, ref: PaperRef, task_lines: Sequence[Line], models: Sequence[str]
) -> PaperTable:
    """The run's lines matching a paper reference as one table: a row per value of `ref.by`
    (or of the swept option `ref.variant_key`), a column per model (or per base model), and the
    paper's numbers. Rows that share a key are told apart by the settings they differ in."""
    found = matching_lines(ref, task_lines)
    # (row key, line, column -> estimate, column -> difference) per row, in line order
    # (variants: in model order; a variant's difference is from the reference's variant at the
    # same swept value).
    keyed: list[tuple[str, Line, dict[str, Estimate]]] = []
    row_diffs: list[dict[str, Difference]] = []
    for ln in found:
        prefix = "/".join(dict(ln.setting).get(k, "") for k in ref.by)
        if not ref.variant_key:
            keyed.append((prefix, ln, {m: ln.estimates[m] for m in models if m in ln.estimates}))
            row_diffs.append(dict(ln.differences))
            continue
        per_value: dict[str, dict[str, Estimate]] = {}
        per_value_diffs: dict[str, dict[str, Difference]] = {}
        for m in models:
            variant = split_variant(m)
            if m in ln.estimates and variant is not None and variant[1] == ref.variant_key:
                per_value.setdefault(variant[2], {})[variant[0]] = ln.estimates[m]
                against = split_variant(ln.against.get(m, ""))
                if m in ln.differences and against is not None and against[2] == variant[2]:
                    per_value_diffs.setdefault(variant[2], {})[variant[0]] = ln.differences[m]
        for v, e in per_value.items():
            keyed.append(("/".join(filter(None, (prefix, v))), ln, e))
            row_diffs.append(per_value_diffs.get(v, {}))
    # Columns in model order: a base label where its first variant stands.
    bases = [(split_variant(m) or (m,))[0] if ref.variant_key else m for m in models]
    columns = tuple(c for c in dict.fromkeys(bases) if any(c in e for _, _, e in keyed))
    if not keyed:
        return PaperTable(task, ref, False, (), (), ())
    # Settings whose value differs between the matched lines label the rows; the rest are the
    # run's conditions, shown once (those that `where` chose: its LARGEST ones).
    keys = [k for k, _ in keyed[0][1].setting]
    varying = [
        k
        for k in keys
        if k not in ref.by and len({dict(ln.setting).get(k) for _, ln, _ in keyed}) > 1
    ]
    shared = tuple(
        (k, v) for k, v in keyed[0][1].setting if ref.where.get(k) == LARGEST and k not in varying
    )
    rows = []
    for (key, ln, estimates), diffs in zip(keyed, row_diffs, strict=True):
        detail = ", ".join(f"{k}={dict(ln.setting).get(k, '')}" for k in varying)
        label = " ".join(filter(None, (key, f"({detail})" if detail else ""))) or ref.metric
        rows.append(
            PaperRow(
                label,
                estimates,
                ref.transformer.get(key, ""),
                ref.diff.get(key, ""),
                ln.chance,
                diffs,
                ln.better,
            )
        )
    return PaperTable(task, ref, keyed[0][1].lower_is_better, columns, tuple(rows), shared)


def paper_tables(results: Results, sections: Sequence[TaskSection]) -> list[PaperTable]:
    """Every paper table of the report's tasks that has rows in this run, in the sections' task
    order (the run's)."""
    out = []
    for section in sections:
        for ref in results.info(section.name).paper:
            table = paper_table(section.name, ref, section.lines, results.models)
            if table.rows:
                out.append(table)
    return out


def describe_headline(info: TaskInfo, task_lines: Sequence[Line] = ()) -> str:
    """Which of a task's rows the summary shows, in words (with `task_lines`, only the headline
    rows the run measured, and the settings that its largest setting chose too)."""
    heads: Sequence[Headline | None] = info.headline or (None,)
    parts = []
    for head, (found, fixed) in zip(heads, _headline_groups(info, task_lines), strict=True):
        if task_lines and not found:
            continue
        _, also_averaged, also_largest = at_largest(found, fixed)
        where = head.where if head else {}
        averaged = [k for k, v in where.items() if v == ALL] + also_averaged
        largest = [k for k, v in where.items() if v == LARGEST] + also_largest
        fixed_at = [f"{k}={v}" for k, v in where.items() if v not in (ALL, LARGEST)]
        words = [head.metric if head else "those averaged over every averaged setting"]
        if averaged:
            words.append(f"averaged over {_listed(averaged)}")
        if largest:
            words.append(f"at the largest {_listed(largest)}")
        if fixed_at:
            words.append(f"at {_listed(fixed_at)}")
        parts.append(words[0] + " " + ", ".join(words[1:]) if len(words) > 1 else words[0])
    return f"Summary rows: {'; '.join(parts) or 'none (no headline row was measured)'}."


def _listed(names: Sequence[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1])))


def build(results: Results, reference: str | None = None) -> Report:
    """Compute every interval and test of a report (figures attached by `with_figures`)."""
    models = results.models
    reference = reference or models[0]
    if reference not in models:
        raise DiffbenchError(
            f"--reference {reference!r} is not a model of this report ({', '.join(models)})"
        )
    measured = [t for t in results.tasks if t in set(results.metrics["task"])]  # the run's order
    per_task = {
        task: lines(results, results.metrics[results.metrics["task"] == task], reference, LEVEL)
        for task in measured
    }
    # The paper section is a small family declared in advance: Holm. Every other row is
    # exploration: Benjamini-Hochberg over all of them together.
    raw_sections = [TaskSection(t, "", "", tuple(per_task[t]), ()) for t in measured]
    paper = tuple(_holm_paper(paper_tables(results, raw_sections)))
    adjusted = iter(_adjust_lines([ln for t in measured for ln in per_task[t]], EXPLORATORY))
    summary: list[Line] = []
    sections: list[TaskSection] = []
    for task in measured:
        info = results.info(task)
        task_lines = [next(adjusted) for _ in per_task[task]]
        summary += headline_lines(info, task_lines)
        sections.append(
            TaskSection(
                task,
                info.description,
                describe_headline(info, task_lines),
                tuple(task_lines),
                (),
            )
        )
    return Report(results, reference, tuple(summary), tuple(sections), None, paper=paper)


def _adjust_lines(found: Sequence[Line], method: str) -> list[Line]:
    """The lines with every difference's p adjusted over all of them as one family."""
    flat = [d for ln in found for d in (*ln.differences.values(), *ln.sweep_differences.values())]
    adjusted = iter(stats.adjust(flat, method))
    out = []
    for ln in found:
        diffs = {m: next(adjusted) for m in ln.differences}
        sweep = {m: next(adjusted) for m in ln.sweep_differences}
        out.append(replace(ln, differences=diffs, sweep_differences=sweep))
    return out


def _holm_paper(tables: Sequence[PaperTable]) -> list[PaperTable]:
    """The paper tables with Holm's adjustment over every difference they show."""
    flat = [d for t in tables for row in t.rows for d in row.differences.values()]
    adjusted = iter(stats.adjust(flat, PAPER_FAMILY))
    out = []
    for t in tables:
        rows = tuple(
            replace(row, differences={c: next(adjusted) for c in row.differences}) for row in t.rows
        )
        out.append(replace(t, rows=rows))
    return out


def with_figures(report: Report, figures_dir: Path) -> Report:
    """The report with the PNG figures found in `figures_dir` attached to their sections."""
    sections = tuple(
        replace(s, figures=tuple(sorted(figures_dir.glob(f"{s.name}_*.png")))) for s in report.tasks
    )
    forest = figures_dir / f"{DIFFERENCES_STEM}.png"
    return replace(report, tasks=sections, summary_figure=forest if forest.exists() else None)


# ---- figures -------------------------------------------------------------------------------


def draw(results: Results, out_dir: Path, report: Report | None = None) -> list[Path]:
    """Every task's figures, as its run.json declares them, and the differences figure into
    `out_dir`; return the files. No task plugin is needed: a task recorded without figure specs
    (an older run) gets its sweep figures only, with a warning."""
    paths: list[Path] = []
    for task in sorted(results.metrics["task"].unique()):
        rows = results.metrics[results.metrics["task"] == task]
        paths += task_figures(results.info(str(task)), rows, out_dir)
    if len(results.models) > 1:
        paths += draw_differences(report or build(results), out_dir)
    return paths


def draw_differences(report: Report, out_dir: Path) -> list[Path]:
    """Each model's difference from the reference per summary row, with intervals."""
    if not report.summary or not report.others:
        return []
    nan = float("nan")
    series = {
        m: [
            (d.delta, d.interval.low, d.interval.high)
            if d is not None and d.interval is not None
            else (d.delta if d is not None else nan, nan, nan)
            for d in (ln.differences.get(m) for ln in report.summary)
        ]
        for m in report.others
    }
    colors = figures.model_colors(report.results.models)
    labels = _figure_labels(report.summary)
    return figures.differences(labels, series, report.reference, out_dir, DIFFERENCES_STEM, colors)


def _figure_labels(summary: Sequence[Line]) -> list[str]:
    """Short row labels: task, metric (with its direction), and the settings that vary among
    the task's summary rows."""
    values: dict[tuple[str, str], set[str]] = {}
    for ln in summary:
        for k, v in ln.setting:
            values.setdefault((ln.task, k), set()).add(v)
    out = []
    for ln in summary:
        shown = ", ".join(
            f"{k}={v}" for k, v in ln.setting if len(values[(ln.task, k)]) > 1 and v != ALL
        )
        name = f"{ln.task} {ln.metric} {ARROWS[ln.better]}"
        out.append(f"{name}: {shown}" if shown else name)
    return out


def plot(run_dir: Path) -> list[Path]:
    """Draw every figure of a run from its store; return the files written."""
    store = RunStore.open_existing(run_dir)
    return draw(load_runs([run_dir]), store.figures_dir)


# ---- files ---------------------------------------------------------------------------------


def _write_pair(report: Report, out_dir: Path) -> list[Path]:
    md, page = out_dir / "report.md", out_dir / "report.html"
    write_atomic(md, markdown(report))
    write_atomic(page, html_page(report))
    return [md, page]


def write_with_figures(run_dir: Path, reference: str | None = None) -> tuple[Path, list[Path]]:
    """Draw a run's figures and write its report.md and report.html, computing every interval
    and test once; report.md's path and the figure files."""
    store = RunStore.open_existing(run_dir)
    results = load_runs([run_dir])
    built = build(results, reference)
    figures = draw(results, store.figures_dir, built)
    return _write_pair(with_figures(built, store.figures_dir), run_dir)[0], figures


def write(run_dir: Path, reference: str | None = None) -> Path:
    """Write report.md and report.html into a run directory; return report.md's path."""
    store = RunStore.open_existing(run_dir)
    report = with_figures(build(load_runs([run_dir]), reference), store.figures_dir)
    return _write_pair(report, run_dir)[0]


def merged_report_dir(run_dirs: Sequence[Path]) -> Path:
    """Where a report merging several runs goes unless told: results/report__<hash of runs>."""
    key = "\n".join(str(d.resolve()) for d in run_dirs)
    return Path("results") / f"report__{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def write_any(
    run_dirs: Sequence[Path], output: Path | None = None, reference: str | None = None
) -> list[Path]:
    """report.md and report.html of one run (in place) or of several merged; their paths.

    A run's own report reuses its figures (drawing them if there are none); a report elsewhere
    draws its own into `<output>/figures`. A task whose run.json records no figure specs (an
    older run) gets no figures of its own, and a warning; its tables are all there.
    """
    results = load_runs(run_dirs)
    report = build(results, reference)
    if len(run_dirs) == 1 and output is None:
        out_dir = run_dirs[0]
        figures_dir = RunStore.open_existing(out_dir).figures_dir
        if not any(figures_dir.glob("*.png")):
            draw(results, figures_dir, report)
        else:  # the differences figure depends on --reference
            draw_differences(report, figures_dir)
    else:
        out_dir = output or merged_report_dir(run_dirs)
        figures_dir = out_dir / "figures"
        draw(results, figures_dir, report)
    return _write_pair(with_figures(report, figures_dir), out_dir)
