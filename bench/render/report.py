"""report.md and report.html: one view of a report (tables of cells, provenance, legend) filled
into two templates.

The HTML page embeds its figures as base64 and its CSS inline, and its content security policy
forbids any fetch.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffbench.api import ARROWS
from diffbench.render import fill
from diffbench.render.cells import MISSING, Cell, Table, Text
from diffbench.render.view import Line, PaperTable, Report
from diffbench.stats import Difference
from diffbench.variants import base_of, value_of

TEST_NAMES = {
    "McNemar exact": "McNemar's exact test",
    "sign-flip": "sign-flip test",
    "cluster sign-flip": "sign-flip test over units",
}
MODEL_HEAD = (
    "model", "spec", "architecture", "parameters", "dtype", "max context", "chat template",
    "weights",
)  # fmt: skip


def chat_template(has_template: bool, options: dict[str, Any]) -> str:
    """Whether a model's chat template wrapped its prompts: applied (tasks whose `chat` option is
    false still skip it), off (the model option chat_template=false), or none (it has none)."""
    if not has_template:
        return "none"
    off = str(options.get("chat_template", True)).strip().lower() in ("false", "0", "no")
    return "off" if off else "applied"


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


def _counts(ln: Line) -> str:
    """`n/units` of a line's models (samples and independent units), or a dash."""
    pairs = sorted(
        {(e.n, e.n_clusters) for e in ln.estimates.values() if e.n is not None},
        key=lambda x: (x[0] or 0, x[1] or 0),
    )
    return ", ".join(f"{n}/{k}" if k is not None else str(n) for n, k in pairs) or "—"


def _method(ln: Line) -> str:
    """The line's interval method and test, short."""
    intervals = sorted({e.interval.method for e in ln.estimates.values() if e.interval})
    found = [*ln.differences.values(), *ln.sweep_differences.values()]
    tests = sorted({d.test for d in found if d.test != "none"})
    return "; ".join(filter(None, (", ".join(intervals), ", ".join(tests)))) or "—"


def _against_note(cell: Cell, against: str | None) -> Cell:
    if not against:
        return cell
    return replace(cell, note=", ".join(filter(None, (f"vs {against}", cell.note))))


def table(report: Report, rows: Sequence[Line], with_task: bool) -> Table:
    """Report lines as a table: settings, samples/units, each model's value, each difference."""
    models = list(report.results.models)
    head = (["task"] if with_task else []) + ["metric", "setting", "n/units", "method", *models]
    head += [f"{m} − {report.reference}" for m in report.others]
    body = []
    for ln in rows:
        row: list[str | Cell] = [ln.task] if with_task else []
        row += [f"{ln.metric} {ARROWS[ln.better]}", ln.label(with_task) or "—"]
        row += [_counts(ln), _method(ln)]
        row += [Cell.of_estimate(ln.estimates.get(m), ln.chance) for m in models]
        row += [
            _against_note(
                Cell.of_difference(ln.differences.get(m), ln.verdict(m)),
                ln.against.get(m) if ln.against.get(m) != report.reference else None,
            )
            for m in report.others
        ]
        body.append(tuple(row))
    return Table(tuple(head), tuple(body), frozenset({"setting"}))


def summary_table(report: Report, rows: Sequence[Line]) -> Table:
    """The summary: a row per line and swept value, a value column per model (its sweep variants
    share it; the value has a column of its own, only under a sweep), and each model's difference
    from the reference model at the same value (`diffbench.variants`)."""
    reference = base_of(report.reference)
    # (line, swept (key, value) or None, model -> its label at that value) per row
    keyed: list[tuple[Line, tuple[str, str] | None, dict[str, str]]] = []
    for ln in rows:
        at: dict[tuple[str, str] | None, dict[str, str]] = {}
        for m in report.results.models:
            if m in ln.estimates:
                at.setdefault(value_of(m), {})[base_of(m)] = m
        keyed += [(ln, value, labels) for value, labels in at.items()]

    def difference(ln: Line, labels: dict[str, str], model: str) -> Difference | None:
        label = labels.get(model, "")
        same = ln.against.get(label) == labels.get(reference)
        return ln.differences.get(label) if same else None

    order = dict.fromkeys(base_of(m) for m in report.results.models)
    models = [b for b in order if any(b in labels for _, _, labels in keyed)]
    compared = [
        b for b in models if b != reference and any(difference(ln, lb, b) for ln, _, lb in keyed)
    ]
    keys = list(dict.fromkeys(value[0] for _, value, _ in keyed if value is not None))
    head = ["task", "metric", "setting", *keys, "n/units", "method", *models]
    head += [f"{b} − {reference}" for b in compared]
    body = []
    for ln, value, labels in keyed:
        diffs = {labels[b]: d for b in compared if (d := difference(ln, labels, b)) is not None}
        shown = replace(
            ln,
            estimates={m: e for m, e in ln.estimates.items() if m in labels.values()},
            differences=diffs,
            sweep_differences={},
        )
        row: list[str | Cell] = [ln.task, f"{ln.metric} {ARROWS[ln.better]}", ln.label() or "—"]
        row += [value[1] if value is not None and value[0] == k else MISSING for k in keys]
        row += [_counts(shown), _method(shown)]
        row += [Cell.of_estimate(ln.estimates.get(labels.get(b, "")), ln.chance) for b in models]
        row += [
            Cell.of_difference(diffs.get(labels.get(b, "")), shown.verdict(labels.get(b, "")))
            for b in compared
        ]
        body.append(tuple(row))
    return Table(tuple(head), tuple(body), frozenset({"setting"}))


def sweep_table(rows: Sequence[Line], with_task: bool) -> Table | None:
    """Each swept model against its own variant at the sweep's first value, or None."""
    body = []
    for ln in rows:
        for m, d in ln.sweep_differences.items():
            row: list[str | Cell] = [ln.task] if with_task else []
            row += [f"{ln.metric} {ARROWS[ln.better]}", ln.label(with_task) or "—", m]
            row += [ln.sweep_against[m], Cell.of_difference(d, ln.sweep_verdict(m))]
            body.append(tuple(row))
    if not body:
        return None
    head = (["task"] if with_task else []) + ["metric", "setting", "model", "against", "Δ"]
    return Table(tuple(head), tuple(body), frozenset({"setting"}))


def paper_caption(t: PaperTable) -> str:
    """The paper table's title, what the run shows (task, metric, settings) and the paper's
    conditions; the table's source ("Table 2") is set apart by the templates."""
    shown = f"{t.task} {t.ref.metric} {ARROWS[t.rows[0].better] if t.rows else ''}"
    if t.run_setting:
        shown += " at " + ", ".join(f"{k}={v}" for k, v in t.run_setting)
    note = f" Paper: {t.ref.note}." if t.ref.note else ""
    return f"{t.ref.title}. Run: {shown}.{note}"


def paper_table(t: PaperTable) -> Table:
    """A paper table: the row key, the run's value per model (with its interval), the paper's."""
    key = "/".join(k for k in (*t.ref.by, t.ref.variant_key) if k) or "metric"
    # A chance column where the task records one: what a uniform guess would score on the row.
    with_chance = any(row.chance is not None for row in t.rows)
    compared = [c for c in t.columns if any(c in row.differences for row in t.rows)]
    reference = next((c for c in t.columns if c not in compared), "")
    body: tuple[tuple[str | Text | Cell, ...], ...] = tuple(
        (
            row.label,
            *(Cell.of_estimate(row.estimates.get(c), row.chance) for c in t.columns),
            *(Cell.of_difference(row.differences.get(c), row.verdict(c)) for c in compared),
            *([MISSING if row.chance is None else f"{row.chance:.3f}"] if with_chance else []),
            row.transformer or MISSING,
            row.diff or MISSING,
        )
        for row in t.rows
    )
    head = (
        key,
        *t.columns,
        *(f"{c} − {reference} (Holm)" for c in compared),
        *(["chance"] if with_chance else []),
        *PAPER_HEAD,
    )
    return Table(head, body)


def provenance(report: Report) -> Provenance:
    """Models and runs behind a report."""
    rows: list[tuple[str, ...]] = []
    runs = []
    for run in report.results.runs:
        rec = run.record
        options = {m.get("label"): m.get("options", {}) for m in rec.config.get("models", [])}
        for label, shown in run.labels.items():
            info = rec.models.get(label)  # None: a model its run never recorded
            rows.append(
                (shown, *(("?",) * (len(MODEL_HEAD) - 1)))
                if info is None
                else (
                    shown,
                    info.spec,
                    info.architecture,
                    f"{info.n_parameters:,}",
                    info.dtype,
                    str(info.max_context),
                    chat_template(info.has_chat_template, options.get(label) or {}),
                    info.fingerprint[:19],
                )
            )
        runs.append(
            RunProvenance(
                path=str(run.path),
                name=run.path.name,
                seed="?" if rec.seed is None else str(rec.seed),
                started=rec.started or "?",
                finished=rec.finished or "not yet",
                revision=rec.git_revision or "",
                versions=", ".join(f"{k} {v}" for k, v in sorted(rec.versions.items())),
                config=json.dumps(rec.config, indent=2, sort_keys=True),
            )
        )
    models = Table(MODEL_HEAD, tuple(rows), frozenset({"spec"}))
    return Provenance(models, tuple(runs))


def tests_used(report: Report) -> str:
    """Which tests gave this report's p-values, with how many differences each."""
    counts: dict[str, int] = {}
    for section in report.tasks:
        for ln in section.lines:
            for d in (*ln.differences.values(), *ln.sweep_differences.values()):
                if d.test in TEST_NAMES:
                    counts[d.test] = counts.get(d.test, 0) + 1
    return "; ".join(f"{TEST_NAMES[t]}: {n}" for t, n in sorted(counts.items()))


def legend(report: Report) -> str:
    """How to read the summary's numbers."""
    used = tests_used(report)
    alpha = f"{1 - report.level:.2g}"
    return (
        f"n/units: samples and independent units (a NIAH haystack draw, an ICL test example, a "
        f"document, a sequence: samples of one unit count once). Values: {report.level:.0%} "
        "interval over units, as the method column says: Wilson for a proportion, at the "
        "effective sample size of its units; t with the cluster-robust standard error for a "
        "mean; none for a statistic (a top-1, a margin over orders), which gets no test. "
        f"Differences: model − {report.reference} (under a sweep: the reference's variant at the "
        "same swept value, never another; the summary gives each value a row, the task tables "
        "note it as vs), from the samples both measured, paired by id: Newcombe's paired "
        "interval for a proportion, a paired t for a mean; p: McNemar's exact test on binary "
        "scores with one sample per unit, else the exact sign-flip test on per-unit sums of the "
        "paired differences. k units can give no p below 2/2^k: a row noted p≥… cannot reach "
        f"α = {alpha} whatever the models do. Many rows are tested: adj. is the p-value adjusted "
        "by Benjamini-Hochberg over every row of this report (false discovery rate), and the "
        "paper tables use Holm over their own rows (family-wise error). (inputs differ): a "
        "sample id was measured on different inputs, so no paired test. (at chance): the value's "
        "interval holds what a uniform guess among the request's choices would score. "
        + (f"Tests used (differences per test): {used}. " if used else "")
        + f"▲/▼: significantly better/worse than the model compared with, adjusted p < {alpha}, "
        "direction-aware (↑ higher is better, ↓ lower is better, · neither: no verdict)."
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
        "summary": summary_table(report, report.summary),
        "legend": legend(report),
        "summary_figure": Figure(report.summary_figure) if report.summary_figure else None,
        "sections": [
            {
                "name": s.name,
                "description": s.description,
                "headline_note": s.headline_note,
                "figures": [Figure(f) for f in s.figures],
                "table": table(report, s.lines, False),
                "sweep": sweep_table(s.lines, False),
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
