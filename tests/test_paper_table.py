"""The paper in miniature: a report opens with the paper's own numbers beside the run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffbench import registry, report, runner
from diffbench.api import PaperRef, TaskInfo
from diffbench.config import Sweep, expand_sweep
from diffbench.models import ModelSpec

PAIR = (ModelSpec("tiny-base", "tiny-base"), ModelSpec("tiny-diff", "tiny-diff"))
SECTION = "## The paper in miniature\n"
PAPER_HEAD = ["paper Transformer (3B)", "paper DIFF (3B)"]
SHIPPED_TASKS = ("niah", "icl", "hallucination", "outliers", "zeroshot", "throughput", "nll")


def run_and_report(out: Path, cfg: runner.RunConfig) -> Path:
    """A real run with its report; one torch thread while it runs."""
    threads = torch.get_num_threads()
    # Sub-million-parameter models: on a CPU shared with other work, a second thread costs
    # several times what it gives.
    torch.set_num_threads(1)
    try:
        run_dir = runner.run(cfg)
    finally:
        torch.set_num_threads(threads)
    report.write(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def niah_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped pair on niah: generate mode, N/R 1/1 and 2/2, one sample at one depth."""
    options = {"niah": {"lengths": (256,), "depths": (50.0,), "needles": ("1/1", "2/2"),
                        "samples": 1, "mode": "generate", "answer_tokens": 8}}  # fmt: skip
    out = tmp_path_factory.mktemp("paper") / "niah"
    return run_and_report(out, runner.RunConfig(("niah",), PAIR, options, output=out))


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped pair on zeroshot under logit_bits 16 and 4 (a --sweep), 4 examples each."""
    models = expand_sweep(PAIR, Sweep("logit_bits", ("16", "4")))
    options = {"zeroshot": {"samples": 4, "formats": ("code",), "facts": (1, 4), "filler": 2}}
    out = tmp_path_factory.mktemp("paper") / "sweep"
    return run_and_report(out, runner.RunConfig(("zeroshot",), models, options, output=out))


def paper_section(md: str) -> dict[str, tuple[str, list[list[str]]]]:
    """report.md's paper tables by source and title: (caption, rows of cells, header first)."""
    section = md.split(SECTION)[1].split("\n## ")[0]
    tables: dict[str, tuple[str, list[list[str]]]] = {}
    caption = ""
    for line in section.splitlines():
        if line.startswith("**"):
            caption = line
            source = line.split("**")[1]
            title = line.split("**: ")[1].split(". Run: ")[0]
            tables[f"{source}: {title}"] = (caption, [])
        elif line.startswith("| ") and caption:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            tables[next(reversed(tables))][1].append(cells)
    return tables


def value(run: Path, task: str, model: str, **setting: str) -> float:
    """A metric row's value from metrics.csv."""
    m = pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)
    rows = m[(m["task"] == task) & (m["model"] == model)]
    for k, v in setting.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, rows
    return float(rows["value"].iloc[0])


def test_report_opens_with_the_papers_table_2_beside_both_models(niah_run):
    md = (niah_run / "report.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## The paper in miniature", "## Summary"]
    intro = md.split(SECTION)[1].strip().splitlines()[0]
    assert "3B models at 4K-64K context" in intro and "for reference only" in intro
    caption, rows = paper_section(md)[
        "Table 2: Multi-needle retrieval accuracy, N needles / R queried"
    ]
    assert "Run: niah accuracy ↑ at length=256." in caption and "Paper: 4K context" in caption
    holm = "tiny-diff − tiny-base (Holm)"
    assert rows[0] == ["needles/queries", "tiny-base", "tiny-diff", holm, *PAPER_HEAD]
    assert [r[0] for r in rows[1:]] == ["1/1", "2/2"]
    assert rows[1][-2:] == ["1.00", "1.00"] and rows[2][-2:] == ["0.85", "0.92"]
    for row, (n, r) in zip(rows[1:], (("1", "1"), ("2", "2")), strict=True):
        for cell, model in zip(row[1:3], ("tiny-base", "tiny-diff"), strict=True):
            v = value(niah_run, "niah", model, metric="accuracy", mode="generate", depth="all",
                      needles=n, queries=r)  # fmt: skip
            assert cell.split(" ")[0] == f"{v:.3f}"  # the run's value (one sample: no interval)


def test_the_variant_tables_rows_are_the_swept_values_and_its_columns_the_base_models(sweep_run):
    md = (sweep_run / "report.md").read_text()
    assert md.index(SECTION) < md.index("## Summary")
    caption, rows = paper_section(md)["Figure 8: Zero-shot accuracy vs attention-logit bits"]
    assert "DIFF holds 16→6 bits" in caption
    # DIFF against the Transformer at the same number of bits, Holm-adjusted over the section.
    holm = "tiny-diff − tiny-base (Holm)"
    assert rows[0] == ["facts/logit_bits", "tiny-base", "tiny-diff", holm, "chance", *PAPER_HEAD]
    assert [r[0] for r in rows[1:]] == ["1/16", "1/4", "4/16", "4/4"]
    marked = []
    for row in rows[1:]:
        facts, bits = row[0].split("/")
        assert row[4] == "0.250"  # four choices
        assert " adj. " in row[3] and ("units: p≥" in row[3] or "p=" in row[3])
        for cell, base in zip(row[1:3], ("tiny-base", "tiny-diff"), strict=True):
            v = value(sweep_run, "zeroshot", f"{base}@logit_bits={bits}", format="all", facts=facts)
            assert cell.startswith(f"{v:.3f} [")  # the run's value with its interval
            low, high = (float(x) for x in cell.split("[")[1].split("]")[0].split(", "))
            # Marked exactly where the interval holds what a uniform guess scores.
            assert cell.endswith("(at chance)") == (low <= 0.25 <= high), cell
            marked.append(cell.endswith("(at chance)"))
        assert row[5:] == ["—", "—"]  # the paper gives no exact numbers
    assert not all(marked)
    # Both kinds of cell, whatever this small run scored: marked exactly when the interval holds
    # what a uniform guess scores.
    from diffbench.render.cells import Cell
    from diffbench.stats import Estimate, Interval

    low = Cell.of_estimate(Estimate(0.2, 20, Interval(0.08, 0.42, "Wilson")), 0.25)
    high = Cell.of_estimate(Estimate(0.9, 20, Interval(0.70, 0.97, "Wilson")), 0.25)
    assert low.note == "at chance" and high.note == ""


def test_paper_tables_without_rows_in_the_run_are_left_out(niah_run):
    section = (niah_run / "report.md").read_text().split(SECTION)[1].split("\n## ")[0]
    # Table 3 needs attention mode, Figure 5 needs N/R 8/1: this run has neither.
    assert "Table 3" not in section and "Figure 5" not in section


def test_the_html_report_opens_with_the_paper_section(niah_run):
    page = (niah_run / "report.html").read_text()
    assert page.index('<h2 id="paper">The paper in miniature</h2>') < page.index('id="summary"')
    section = page.split('id="paper"')[1].split('id="summary"')[0]
    assert "<b>Table 2</b>" in section and "<th>paper DIFF (3B)</th>" in section
    assert "<td>0.85</td><td>0.92</td>" in section


def test_run_json_round_trips_the_papers_numbers(niah_run, sweep_run):
    for run, task in ((niah_run, "niah"), (sweep_run, "zeroshot")):
        record = json.loads((run / "run.json").read_text())
        stored = TaskInfo.from_json(record["task_info"][task])
        assert stored == TaskInfo.of(registry.load(task))
        assert stored.paper and all(isinstance(p, PaperRef) for p in stored.paper)
    for task in SHIPPED_TASKS:
        info = TaskInfo.of(registry.load(task))
        assert TaskInfo.from_json(json.loads(json.dumps(info.to_json()))) == info


def test_every_paper_reference_names_its_tasks_metric_and_settings():
    for task in SHIPPED_TASKS:
        info = TaskInfo.of(registry.load(task))
        for ref in info.paper:
            # Or a metric reports derive (throughput's Table 7 rate relative to the reference).
            derived = {m.relative for m in info.metric_defs if m.relative}
            assert ref.metric in {*info.metrics, *derived}, (task, ref.source)
            assert set(ref.where) | set(ref.by) <= set(info.setting_keys), (task, ref.source)
            assert ref.source and ref.title and ref.note
    assert not TaskInfo.of(registry.load("nll")).paper  # the paper has no number for it


def test_a_run_json_without_paper_numbers_still_loads_and_reports(niah_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(niah_run, old)
    record = json.loads((old / "run.json").read_text())
    for info in record["task_info"].values():
        del info["paper"]  # as runs written before PaperRef
    (old / "run.json").write_text(json.dumps(record))
    md = report.write(old).read_text()
    assert SECTION not in md  # no paper numbers recorded: no section
    assert md.index("## Summary") < md.index("## niah")
    assert "| niah | accuracy ↑ | mode=generate, length=256, needles=2, queries=2 |" in md
