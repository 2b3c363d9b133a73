"""report.md and report.html: one view of a report (tables of cells, provenance, legend) filled
into two templates.

The HTML page embeds its figures as base64 and its CSS inline, and its content security policy
forbids any fetch.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffbench.render import fill
from diffbench.render.cells import MISSING, Cell, Table

if TYPE_CHECKING:
    from diffbench.report import Line, PaperTable, Report

TEST_NAMES = {
    "McNemar exact": "McNemar's exact test",
    "sign-flip": "sign-flip test",
    "cluster sign-flip": "sign-flip test over clusters",
    "normal": "normal approximation from the stderrs",
}
MODEL_HEAD = ("model", "spec", "architecture", "parameters", "dtype", "max context", "weights")
PAPER_HEAD = ("paper Transformer (3B)", "paper DIFF (3B)")
PAPER_INTRO = (
    "The paper columns are the DIFF paper's own numbers (Ye et al., ICLR 2025: 3B models at "
    "4K-64K context), for reference only: they are not comparable in scale with this run's models. "
    "A chance column gives what a uniform guess among a row's choices would score; (at chance) "
    "marks a value whose interval holds it."
)
# No fetch of any kind: images only as data: URIs, styles only inline, no scripts.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class RunProvenance:
    """Where one run of the report came from."""

    path: str
    name: str
    seed: str
    started: str
    finished: str
    revision: str
    versions: str
    config: str  # the resolved configuration as indented JSON


@dataclass(frozen=True)
class Provenance:
    """Every model's identity and every run's origin, computed once for both renderings."""

    models: Table
    runs: tuple[RunProvenance, ...]


@dataclass(frozen=True)
class Figure:
    """A figure file as a report shows it."""

    path: Path

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def name(self) -> str:
        return self.path.name

    def data_uri(self) -> str:
        """The PNG inline, for a page that fetches nothing."""
        return "data:image/png;base64," + base64.b64encode(self.path.read_bytes()).decode("ascii")


def table(report: Report, rows: Sequence[Line], with_task: bool) -> Table:
    """Report lines as a table: settings, n, each model's value, each difference."""
    models = list(report.results.models)
    head = (["task"] if with_task else []) + ["metric", "setting", "n", *models]
    head += [f"{m} − {report.reference}" for m in report.others]
    body = []
    for ln in rows:
        ns = sorted({e.n for e in ln.estimates.values() if e.n is not None})
        row: list[str | Cell] = [ln.task] if with_task else []
        row += [f"{ln.metric} {'↓' if ln.lower_is_better else '↑'}", ln.label(with_task) or "—"]
        row.append("/".join(str(n) for n in ns) or "—")
        row += [Cell.of_estimate(ln.estimates.get(m), ln.chance) for m in models]
        row += [Cell.of_difference(ln.differences.get(m), ln.verdict(m)) for m in report.others]
        body.append(tuple(row))
    return Table(tuple(head), tuple(body), frozenset({"setting"}))


def paper_caption(t: PaperTable) -> str:
    """The paper table's title, what the run shows (task, metric, settings) and the paper's
    conditions; the table's source ("Table 2") is set apart by the templates."""
    shown = f"{t.task} {t.ref.metric} {'↓' if t.lower_is_better else '↑'}"
    if t.run_setting:
        shown += " at " + ", ".join(f"{k}={v}" for k, v in t.run_setting)
    note = f" Paper: {t.ref.note}." if t.ref.note else ""
    return f"{t.ref.title}. Run: {shown}.{note}"


def paper_table(t: PaperTable) -> Table:
    """A paper table: the row key, the run's value per model (with its interval), the paper's."""
    key = "/".join(k for k in (*t.ref.by, t.ref.variant_key) if k) or "metric"
    # A chance column where the task records one: what a uniform guess would score on the row.
    with_chance = any(row.chance is not None for row in t.rows)
    body = tuple(
        (
            row.label,
            *(Cell.of_estimate(row.estimates.get(c), row.chance) for c in t.columns),
            *([MISSING if row.chance is None else f"{row.chance:.3f}"] if with_chance else []),
            row.transformer or MISSING,
            row.diff or MISSING,
        )
        for row in t.rows
    )
    return Table((key, *t.columns, *(["chance"] if with_chance else []), *PAPER_HEAD), body)


def provenance(report: Report) -> Provenance:
    """Models and runs behind a report."""
    rows = []
    runs = []
    for run in report.results.runs:
        rec = run.record
        infos = rec.get("models", {})
        for label, shown in run.labels.items():
            info = infos.get(label, {})
            n_params = info.get("n_parameters")
            rows.append(
                (
                    shown,
                    str(info.get("spec", "?")),
                    str(info.get("architecture", "?")),
                    f"{n_params:,}" if isinstance(n_params, int) else "?",
                    str(info.get("dtype", "?")),
                    str(info.get("max_context", "?")),
                    str(info.get("fingerprint", "?"))[:19],
                )
            )
        runs.append(
            RunProvenance(
                path=str(run.path),
                name=run.path.name,
                seed=str(rec.get("config", {}).get("seed", "?")),
                started=str(rec.get("started", "?")),
                finished=str(rec.get("finished") or "not yet"),
                revision=str(rec.get("git_revision") or ""),
                versions=", ".join(f"{k} {v}" for k, v in sorted(rec.get("versions", {}).items())),
                config=json.dumps(rec.get("config", {}), indent=2, sort_keys=True),
            )
        )
    models = Table(MODEL_HEAD, tuple(rows), frozenset({"spec"}))
    return Provenance(models, tuple(runs))


def tests_used(report: Report) -> str:
    """Which tests gave this report's p-values, with how many differences each."""
    counts: dict[str, int] = {}
    for section in report.tasks:
        for ln in section.lines:
            for d in ln.differences.values():
                if d.test in TEST_NAMES:
                    counts[d.test] = counts.get(d.test, 0) + 1
    return "; ".join(f"{TEST_NAMES[t]}: {n}" for t, n in sorted(counts.items()))


def legend(report: Report) -> str:
    """How to read the summary's numbers."""
    used = tests_used(report)
    return (
        f"Values: {report.level:.0%} bootstrap interval over samples, resampling whole clusters "
        "where samples share a `cluster` (one test example under several draws or orders); "
        "normal from the stderr when the metric is no sample mean. Differences: model − "
        f"{report.reference}, paired by sample id (paired bootstrap interval); p: McNemar's exact "
        "test on binary scores without clusters, else the sign-flip test on per-cluster sums of "
        "the paired differences (a cluster counts once, so repeated draws of one example add no "
        "significance). (inputs differ): a sample id was measured on different inputs, so no "
        "paired test. (at chance): the value's interval holds what a uniform guess among the "
        "request's choices would score (1 / choices), so the model shows no skill on that row. "
        + (f"Tests used (differences per test): {used}. " if used else "")
        + f"▲/▼: significantly better/worse than {report.reference} at "
        f"α = {1 - report.level:.2g}, direction-aware (↑ higher is better, ↓ lower is better)."
    )


def _view(report: Report) -> dict[str, Any]:
    """What both templates show, computed once."""
    return {
        "paper": [
            {"source": t.ref.source, "caption": paper_caption(t), "table": paper_table(t)}
            for t in report.paper
        ],
        "paper_intro": PAPER_INTRO,
        "reference": report.reference,
        "others": report.others,
        "summary": table(report, report.summary, True),
        "legend": legend(report),
        "summary_figure": Figure(report.summary_figure) if report.summary_figure else None,
        "sections": [
            {
                "name": s.name,
                "description": s.description,
                "headline_note": s.headline_note,
                "figures": [Figure(f) for f in s.figures],
                "table": table(report, s.lines, False),
            }
            for s in report.tasks
        ],
        "provenance": provenance(report),
    }


def markdown(report: Report, figure_prefix: str = "figures") -> str:
    """The report as GitHub-flavoured Markdown; figures linked relative to the report."""
    return fill("report.md", figure_prefix=figure_prefix, **_view(report))


def html_page(report: Report) -> str:
    """The report as one self-contained HTML page."""
    return fill("report.html", csp=CSP, **_view(report))
