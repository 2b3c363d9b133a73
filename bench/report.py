"""Reports of one run, or several merged: report.md (a PR comment) and a self-contained HTML page.

Both open with a summary table (one row per task metric and headline setting, a column per model
with its 95% interval, and each model's difference from the reference model with a paired test),
then a section per task with its figures and every setting, then provenance. The HTML page embeds
its figures as base64 and its CSS inline, and its content security policy forbids any fetch.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from diffbench import figures, registry, stats
from diffbench.compare import Results, load_runs
from diffbench.errors import DiffbenchError
from diffbench.stats import Difference, Estimate
from diffbench.store import RunStore, natural_key, write_atomic

SUMMARY_VALUE = "all"
DIFFERENCES_STEM = "diffbench_differences"


@dataclass(frozen=True)
class Line:
    """One row of a report table: a task metric in one setting, every model, every difference."""

    task: str
    metric: str
    setting: tuple[tuple[str, str], ...]
    lower_is_better: bool
    estimates: dict[str, Estimate]
    differences: dict[str, Difference]

    def label(self, summary: bool = True) -> str:
        """`key=value, ...`; settings averaged over are left out of a summary's label."""
        return ", ".join(
            f"{k}={v}" for k, v in self.setting if not (summary and v == SUMMARY_VALUE)
        )


@dataclass(frozen=True)
class TaskSection:
    """A task's part of the report."""

    name: str
    description: str
    averaged_over: tuple[str, ...]
    lines: tuple[Line, ...]
    figures: tuple[Path, ...]


@dataclass(frozen=True)
class Report:
    """Everything a report shows, computed once and rendered as Markdown or HTML."""

    results: Results
    reference: str
    summary: tuple[Line, ...]
    tasks: tuple[TaskSection, ...]
    summary_figure: Path | None
    level: float = stats.LEVEL

    @property
    def others(self) -> list[str]:
        """The models compared against the reference."""
        return [m for m in self.results.models if m != self.reference]


def _lower_is_better(task: str) -> frozenset[str]:
    try:
        return frozenset(registry.load(task).lower_is_better)
    except DiffbenchError:
        return frozenset()


def lines(results: Results, rows: pd.DataFrame, reference: str, level: float) -> list[Line]:
    """Report lines for metric rows (one task), in metrics.csv's natural order."""
    if rows.empty:
        return []
    task = str(rows["task"].iloc[0])
    settings = results.setting_columns(task)
    rows = rows.sort_values([*settings, "metric"], key=natural_key, kind="stable")
    lower = _lower_is_better(task)
    out: list[Line] = []
    for key, group in rows.groupby([*settings, "metric"], sort=False):
        values = key if isinstance(key, tuple) else (key,)
        setting = tuple(zip(settings, map(str, values[:-1]), strict=True))
        metric = str(values[-1])
        where = dict(setting)
        by_model = {str(r["model"]): r for _, r in group.iterrows()}
        scores = {m: results.scores(task, metric, m, where) for m in by_model}
        estimates = {
            m: stats.estimate(
                float(r["value"]),
                None if pd.isna(r["n"]) else int(r["n"]),
                float(r["stderr"]),
                scores[m],
                level,
            )
            for m, r in by_model.items()
        }
        diffs: dict[str, Difference] = {}
        if reference in by_model:
            ref = by_model[reference]
            for m, r in by_model.items():
                if m != reference:
                    diffs[m] = stats.difference(
                        float(ref["value"]),
                        float(r["value"]),
                        reference_scores=scores[reference],
                        candidate_scores=scores[m],
                        reference_stderr=float(ref["stderr"]),
                        candidate_stderr=float(r["stderr"]),
                        level=level,
                    )
        out.append(Line(task, metric, setting, metric in lower, estimates, diffs))
    return out


def build(results: Results, reference: str | None = None) -> Report:
    """Compute every interval and test of a report (figures attached by `with_figures`)."""
    models = results.models
    reference = reference or models[0]
    if reference not in models:
        raise DiffbenchError(
            f"--reference {reference!r} is not a model of this report ({', '.join(models)})"
        )
    summary: list[Line] = []
    sections: list[TaskSection] = []
    for task in sorted(results.metrics["task"].unique()):
        rows = results.metrics[results.metrics["task"] == task]
        # Headline rows: those averaged over a setting (NIAH's depth="all"), else every row.
        averaged = [c for c in results.setting_columns(task) if (rows[c] == SUMMARY_VALUE).any()]
        all_lines = lines(results, rows, reference, stats.LEVEL)
        summary += [
            ln for ln in all_lines if all(dict(ln.setting)[c] == SUMMARY_VALUE for c in averaged)
        ]
        try:
            description = registry.load(task).description
        except DiffbenchError:
            description = ""
        sections.append(TaskSection(task, description, tuple(averaged), tuple(all_lines), ()))
    return Report(results, reference, tuple(summary), tuple(sections), None)


def with_figures(report: Report, figures_dir: Path) -> Report:
    """The report with the PNG figures found in `figures_dir` attached to their sections."""
    sections = tuple(
        replace(s, figures=tuple(sorted(figures_dir.glob(f"{s.name}_*.png")))) for s in report.tasks
    )
    forest = figures_dir / f"{DIFFERENCES_STEM}.png"
    return replace(report, tasks=sections, summary_figure=forest if forest.exists() else None)


# ---- cells ---------------------------------------------------------------------------------


def _estimate_text(e: Estimate | None) -> str:
    if e is None:
        return "—"
    if e.interval is None:
        return f"{e.value:.3f}"
    return f"{e.value:.3f} [{e.interval.low:.3f}, {e.interval.high:.3f}]"


def _verdict(line: Line, d: Difference) -> str:
    """'better' or 'worse' when significant (direction-aware) for the model, else ''."""
    if not d.significant:
        return ""
    gain = -d.delta if line.lower_is_better else d.delta
    return "better" if gain > 0 else "worse" if gain < 0 else ""


MARKERS = {"better": " ▲", "worse": " ▼", "": ""}


def _difference_text(line: Line, d: Difference | None) -> str:
    if d is None:
        return "—"
    text = f"{d.delta:+.3f}"
    if d.interval is not None:
        text += f" [{d.interval.low:+.3f}, {d.interval.high:+.3f}]"
    if d.p_value is not None:
        text += f" p={d.p_value:.2g}"
    if d.inputs_differ:
        text += " (inputs differ)"
    return text + MARKERS[_verdict(line, d)]


def _n_text(line: Line) -> str:
    ns = {e.n for e in line.estimates.values() if e.n is not None}
    return "/".join(str(n) for n in sorted(ns)) or "—"


def _metric_text(line: Line) -> str:
    return f"{line.metric} {'↓' if line.lower_is_better else '↑'}"


TableRows = list[tuple[list[str], list[str]]]  # (cells, verdict of each difference cell)


def _table(report: Report, rows: Sequence[Line], with_task: bool) -> tuple[list[str], TableRows]:
    """Header and cell rows of a table, as plain text (escaped by each renderer)."""
    models = list(report.results.models)
    head = (["task"] if with_task else []) + ["metric", "setting", "n", *models]
    head += [f"{m} − {report.reference}" for m in report.others]
    body = []
    for ln in rows:
        cells = ([ln.task] if with_task else []) + [_metric_text(ln), ln.label(with_task) or "—"]
        cells += [_n_text(ln)] + [_estimate_text(ln.estimates.get(m)) for m in models]
        cells += [_difference_text(ln, ln.differences.get(m)) for m in report.others]
        verdicts = [
            _verdict(ln, ln.differences[m]) if m in ln.differences else "" for m in report.others
        ]
        body.append((cells, verdicts))
    return head, body


TEST_NAMES = {
    "McNemar exact": "McNemar's exact test",
    "sign-flip": "sign-flip test",
    "cluster sign-flip": "sign-flip test over clusters",
    "normal": "normal approximation from the stderrs",
}


def _tests_used(report: Report) -> str:
    """Which tests gave this report's p-values, with how many differences each."""
    counts: dict[str, int] = {}
    for section in report.tasks:
        for ln in section.lines:
            for d in ln.differences.values():
                if d.test in TEST_NAMES:
                    counts[d.test] = counts.get(d.test, 0) + 1
    return "; ".join(f"{TEST_NAMES[t]}: {n}" for t, n in sorted(counts.items()))


def _legend(report: Report) -> str:
    used = _tests_used(report)
    return (
        f"Values: {report.level:.0%} bootstrap interval over samples, resampling whole clusters "
        "where samples share a `cluster` (one test example under several draws or orders); "
        "normal from the stderr when the metric is no sample mean. Differences: model − "
        f"{report.reference}, paired by sample id (paired bootstrap interval); p: McNemar's exact "
        "test on binary scores without clusters, else the sign-flip test on per-cluster sums of "
        "the paired differences (a cluster counts once, so repeated draws of one example add no "
        "significance). (inputs differ): a sample id was measured on different inputs, so no "
        "paired test. "
        + (f"Tests used (differences per test): {used}. " if used else "")
        + f"▲/▼: significantly better/worse than {report.reference} at "
        f"α = {1 - report.level:.2g}, direction-aware (↑ higher is better, ↓ lower is better)."
    )


# ---- Markdown ------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(report: Report, rows: Sequence[Line], with_task: bool) -> str:
    head, body = _table(report, rows, with_task)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells, verdicts in body:
        n_fixed = len(cells) - len(verdicts)
        marked = cells[:n_fixed] + [
            f"**{c}**" if v else c for c, v in zip(cells[n_fixed:], verdicts, strict=True)
        ]
        out.append("| " + " | ".join(_md_cell(c) for c in marked) + " |")
    return "\n".join(out)


def _runs_line(report: Report, quote: str = "`") -> str:
    parts = []
    for run in report.results.runs:
        rec = run.record
        parts.append(
            f"{quote}{run.path.name}{quote} (seed {rec.get('config', {}).get('seed', '?')}, "
            f"started {rec.get('started', '?')})"
        )
    return ("Run " if len(parts) == 1 else "Runs ") + ", ".join(parts) + "."


def _model_rows(report: Report) -> list[list[str]]:
    rows = []
    for run in report.results.runs:
        infos = run.record.get("models", {})
        for label, shown in run.labels.items():
            info = infos.get(label, {})
            n_params = info.get("n_parameters")
            rows.append(
                [
                    shown,
                    str(info.get("spec", "?")),
                    str(info.get("architecture", "?")),
                    f"{n_params:,}" if isinstance(n_params, int) else "?",
                    str(info.get("dtype", "?")),
                    str(info.get("max_context", "?")),
                    str(info.get("fingerprint", "?"))[:19],
                ]
            )
    return rows


MODEL_HEAD = ["model", "spec", "architecture", "parameters", "dtype", "max context", "weights"]


def markdown(report: Report, figure_prefix: str = "figures") -> str:
    """The report as GitHub-flavoured Markdown; figures linked relative to the report."""
    out = ["# diffbench report", "", _runs_line(report)]
    if report.others:
        out.append(f"Reference model: **{report.reference}**.")
    out += ["", "## Summary", "", _md_table(report, report.summary, True), ""]
    out += [_legend(report), ""]
    if report.summary_figure is not None:
        name = report.summary_figure
        out += [f"![{name.stem}]({figure_prefix}/{name.name})", ""]
    for section in report.tasks:
        out += [f"## {section.name}", ""]
        if section.description:
            out += [section.description, ""]
        out += [f"![{f.stem}]({figure_prefix}/{f.name})" for f in section.figures]
        if section.figures:
            out.append("")
        if section.averaged_over:
            out += [f"Summary rows average over {', '.join(section.averaged_over)}.", ""]
        out += ["<details><summary>Every setting</summary>", ""]
        out += [_md_table(report, section.lines, False), "", "</details>", ""]
    out += ["## Provenance", ""]
    out.append("| " + " | ".join(MODEL_HEAD) + " |")
    out.append("|" + "---|" * len(MODEL_HEAD))
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in _model_rows(report)]
    for run in report.results.runs:
        rec = run.record
        out += ["", f"`{run.path}`: started {rec.get('started', '?')}, "]
        out[-1] += f"finished {rec.get('finished') or 'not yet'}"
        if rec.get("git_revision"):
            out[-1] += f", diffbench revision `{rec['git_revision']}`"
        out[-1] += "."
        versions = rec.get("versions", {})
        out += ["", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
        out += ["", "<details><summary>Configuration</summary>", "", "```json"]
        out += [json.dumps(rec.get("config", {}), indent=2, sort_keys=True), "```", "</details>"]
    return "\n".join(out) + "\n"


# ---- HTML ----------------------------------------------------------------------------------

CSS = """
body { font-family: Georgia, 'DejaVu Serif', serif; color: #1b1b1b; margin: 2rem auto;
       max-width: 1180px; padding: 0 1.2rem; line-height: 1.45; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #1f4e9c; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; color: #1f4e9c; }
table { border-collapse: collapse; font-size: .85rem; margin: .8rem 0; }
th, td { border: 1px solid #d5d8dc; padding: .25rem .55rem; text-align: left;
         font-variant-numeric: tabular-nums; white-space: nowrap; }
td.setting { white-space: normal; min-width: 12rem; }
.ci { display: block; font-size: .72rem; color: #566573; font-weight: normal; }
.wide { overflow-x: auto; }
th { background: #eef2f8; }
tr:nth-child(even) td { background: #fafbfc; }
td.better { background: #d5f0de !important; font-weight: bold; }
td.worse { background: #f8d7d3 !important; font-weight: bold; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .8rem; color: #566573; }
.legend, .meta { font-size: .85rem; color: #444; }
pre { background: #f4f6f7; padding: .7rem; overflow-x: auto; font-size: .78rem; }
code { font-size: .85em; }
"""
WRAPPED = frozenset({"setting", "spec"})  # long text columns that may wrap
# No fetch of any kind: images only as data: URIs, styles only inline, no scripts.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _html_table(head: Sequence[str], body: Sequence[tuple[list[str], list[str]]]) -> str:
    out = [
        '<div class="wide"><table>',
        "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead>",
    ]
    out.append("<tbody>")
    for cells, verdicts in body:
        n_fixed = len(cells) - len(verdicts)
        classes = ["setting" if h in WRAPPED else "" for h in head[:n_fixed]] + list(verdicts)
        tds = "".join(
            f'<td class="{c}">{_html_cell(x)}</td>' if c else f"<td>{_html_cell(x)}</td>"
            for x, c in zip(cells, classes, strict=True)
        )
        out.append(f"<tr>{tds}</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _html_cell(text: str) -> str:
    """A value cell as its number (and marker) over its interval and p-value in small print."""
    number, sep, rest = text.partition(" [")
    if not sep:
        return _esc(text)
    marker = next((m for m in MARKERS.values() if m and rest.endswith(m)), "")
    rest = rest.removesuffix(marker)
    return f'{_esc(number + marker)}<span class="ci">[{_esc(rest)}</span>'


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(path.stem)}">'
        f"<figcaption>{_esc(path.stem)}</figcaption></figure>"
    )


def html_page(report: Report) -> str:
    """The report as one self-contained HTML page."""
    body = ["<h1>diffbench report</h1>", f'<p class="meta">{_esc(_runs_line(report, quote=""))}']
    if report.others:
        body[-1] += f" Reference model: <b>{_esc(report.reference)}</b>."
    body[-1] += "</p>"
    body.append("<h2>Summary</h2>")
    head, rows = _table(report, report.summary, True)
    body.append(_html_table(head, rows))
    body.append(f'<p class="legend">{_esc(_legend(report))}</p>')
    if report.summary_figure is not None:
        body.append(_figure(report.summary_figure))
    for section in report.tasks:
        body.append(f'<h2 id="task-{_esc(section.name)}">{_esc(section.name)}</h2>')
        if section.description:
            body.append(f"<p>{_esc(section.description)}</p>")
        body += [_figure(f) for f in section.figures]
        if section.averaged_over:
            body.append(
                f'<p class="meta">Summary rows average over '
                f"{_esc(', '.join(section.averaged_over))}.</p>"
            )
        head, rows = _table(report, section.lines, False)
        body += ["<details open><summary>Every setting</summary>", _html_table(head, rows)]
        body.append("</details>")
    body.append("<h2>Provenance</h2>")
    body.append(_html_table(MODEL_HEAD, [(r, []) for r in _model_rows(report)]))
    for run in report.results.runs:
        rec = run.record
        meta = (
            f"{run.path}: started {rec.get('started', '?')}, "
            f"finished {rec.get('finished') or 'not yet'}"
        )
        if rec.get("git_revision"):
            meta += f", diffbench revision {rec['git_revision']}"
        body.append(f'<p class="meta">{_esc(meta)}.</p>')
        versions = ", ".join(f"{k} {v}" for k, v in sorted(rec.get("versions", {}).items()))
        body.append(f'<p class="meta">{_esc(versions)}</p>')
        config = json.dumps(rec.get("config", {}), indent=2, sort_keys=True)
        body.append(f"<details><summary>Configuration</summary><pre>{_esc(config)}</pre></details>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        "<title>diffbench report</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


# ---- files ---------------------------------------------------------------------------------


def draw(results: Results, out_dir: Path, report: Report | None = None) -> list[Path]:
    """Every task's figures and the differences figure into `out_dir`; return the files."""
    paths: list[Path] = []
    for task_name in sorted(results.metrics["task"].unique()):
        task = registry.load(task_name)
        rows = results.metrics[results.metrics["task"] == task_name]
        index = results.samples.get(task_name)
        samples = index.raw if index is not None else pd.DataFrame()
        paths += task.figures(rows, samples, out_dir)
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
    """Short row labels: task, metric, and only the settings that vary between rows."""
    varying = {
        k
        for k in {k for ln in summary for k, _ in ln.setting}
        if len({dict(ln.setting).get(k) for ln in summary}) > 1
    }
    metrics = {ln.metric for ln in summary}
    out = []
    for ln in summary:
        shown = ", ".join(f"{k}={v}" for k, v in ln.setting if k in varying and v != SUMMARY_VALUE)
        name = ln.task if len(metrics) == 1 else f"{ln.task} {ln.metric}"
        out.append(f"{name}: {shown}" if shown else name)
    return out


def plot(run_dir: Path) -> list[Path]:
    """Draw every figure of a run from its store; return the files written."""
    store = RunStore.open_existing(run_dir)
    return draw(load_runs([run_dir]), store.figures_dir)


def _write_pair(report: Report, out_dir: Path) -> list[Path]:
    md, page = out_dir / "report.md", out_dir / "report.html"
    write_atomic(md, markdown(report))
    write_atomic(page, html_page(report))
    return [md, page]


def write(run_dir: Path, reference: str | None = None) -> Path:
    """Write report.md and report.html into a run directory; return report.md's path."""
    store = RunStore.open_existing(run_dir)
    report = with_figures(build(load_runs([run_dir]), reference), store.figures_dir)
    return _write_pair(report, run_dir)[0]


def default_output(run_dirs: Sequence[Path]) -> Path:
    """Where a report merging several runs goes unless told: results/report__<hash of runs>."""
    key = "\n".join(str(d.resolve()) for d in run_dirs)
    return Path("results") / f"report__{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def write_any(
    run_dirs: Sequence[Path], output: Path | None = None, reference: str | None = None
) -> list[Path]:
    """report.md and report.html of one run (in place) or of several merged; their paths.

    A run's own report reuses its figures (drawing them if there are none); a report elsewhere
    draws its own into `<output>/figures`.
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
        out_dir = output or default_output(run_dirs)
        figures_dir = out_dir / "figures"
        draw(results, figures_dir, report)
    return _write_pair(with_figures(report, figures_dir), out_dir)
