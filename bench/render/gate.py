"""`diffbench compare` output: an aligned text table, Markdown (a template), JSON and JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from diffbench.api import ARROWS
from diffbench.gate import STATUSES, Change, Comparison
from diffbench.render import fill
from diffbench.render.cells import Cell, Table, Text
from diffbench.stats import Difference

# Statuses a reader must not miss, whether or not this gate fails on them.
ALARMING = frozenset({"regression", "missing", "inputs differ"})


def _head(level: float) -> tuple[str, ...]:
    return (
        "status", "task", "metric", "setting", "model", "baseline", "candidate", "Δ",
        f"{level:.0%} CI", "p", "p adj.", "units", "tolerance",
    )  # fmt: skip


def _row(c: Change) -> tuple[Text | str, ...]:
    d = c.difference
    delta = Cell.of_difference(d)
    return (
        Text(c.status, c.status in ALARMING),
        c.task,
        f"{c.metric} {ARROWS[c.better]}",
        c.setting_text or "—",
        c.model,
        Cell(c.baseline).number,
        Cell(c.candidate).number,
        delta.number,
        delta.bounds or "—",
        delta.p_value or "—",
        Cell.p_text(d.p_adjusted if d else None) or "—",
        units(d),
        f"{c.tolerance:g}",
    )


def units(d: Difference | None) -> str:
    """`pairs/units` of a tested row, with the test's floor where the units cannot reach the
    level; what stopped a test otherwise."""
    if d is None:
        return "—"
    if d.test == "none":
        return d.reason or "—"
    text = f"{d.n_pairs}/{d.n_clusters}"
    if d.n_reference is not None:
        text += f" (of {d.n_reference}/{d.n_candidate} samples)"
    if not d.can_reach:
        text += f" p≥{d.p_min:.3g}"
    return text


def table(cmp: Comparison, changes: Sequence[Change]) -> Table:
    """Compared rows as a table, one column per quantity."""
    return Table(_head(cmp.level), tuple(_row(c) for c in changes))


def render_text(cmp: Comparison) -> str:
    """An aligned plain-text table of every compared row, worst first."""
    t = table(cmp, cmp.changes)
    cells = [list(t.head), *([str(x) for x in row] for row in t.rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(t.head))]
    lines = [f"baseline:  {cmp.baseline}", f"candidate: {cmp.candidate}", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in cells]
    lines += ["", cmp.outcome]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def render_markdown(cmp: Comparison) -> str:
    """GitHub-flavoured Markdown: the outcome, the rows that changed, then every row folded."""
    tests = sorted({c.difference.test for c in cmp.changes if c.difference is not None} - {"none"})
    return fill(
        "compare.md",
        cmp=cmp,
        icon="" if not cmp.fail_on else ("❌ " if cmp.failed else "✅ "),
        notable=table(cmp, [c for c in cmp.changes if c.status != "unchanged"]),
        every=table(cmp, cmp.changes),
        tests=tests,
    )


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
        "p_adjusted": d.p_adjusted if d else None,
        "adjustment": d.adjustment if d else None,
        "p_min": d.p_min if d else None,
        "test": d.test if d else None,
        "no_test_reason": d.reason if d and d.test == "none" else None,
        "significant": d.significant if d else None,
        "n_pairs": d.n_pairs if d else None,
        "n_clusters": d.n_clusters if d else None,
        "n_baseline": d.n_reference if d else None,
        "n_candidate": d.n_candidate if d else None,
        "inputs_differ": c.status == "inputs differ",
        "lower_is_better": c.lower_is_better,
        "better": c.better,
        "tolerance": c.tolerance,
        "status": c.status,
    }


def render_json(cmp: Comparison) -> str:
    """Every compared row and the gate's outcome as JSON."""
    data = {
        "baseline": cmp.baseline,
        "candidate": cmp.candidate,
        "level": cmp.level,
        "adjustment": cmp.adjustment,
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
        delta = Cell.of_difference(c.difference)
        text = (
            f"{c.status}: baseline {Cell(c.baseline).number}, candidate "
            f"{Cell(c.candidate).number}, delta {delta.number} {delta.bounds or '—'}, "
            f"p {delta.p_value or '—'}, tolerance {c.tolerance:g}, "
            f"{'lower' if c.lower_is_better else 'higher'} is better"
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


RENDERERS: dict[str, Callable[[Comparison], str]] = {
    "text": render_text,
    "md": render_markdown,
    "json": render_json,
    "junit": render_junit,
}
