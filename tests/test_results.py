"""Reading a run needs no task plugin: run.json describes each task (metrics, directions, sample
means, setting keys, headline rows), and reports and the gate read it from there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import rename_tasks, run_cli
from test_cli_errors import assert_one_line_error
from test_report import default_grid_run
from test_store import TODAYS_RUN_JSON, cli_main, first_run_json, write_run_json

# A task name no installed plugin has.
UNPLUGGED = "icl_unplugged"


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory) -> Path:
    """The shared default-grid run of the shipped pair (niah and icl); never edited."""
    return default_grid_run(tmp_path_factory.getbasetemp())


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def edit_record(run: Path, edit) -> None:
    record = json.loads((run / "run.json").read_text())
    edit(record)
    (run / "run.json").write_text(json.dumps(record, indent=2))


def rename_task(run: Path, old: str, new: str) -> None:
    """Rename a task wherever a run names it: run.json, the samples, metrics.csv."""
    rename_tasks(run, {old: new})


def forget_task_info(run: Path) -> None:
    """The run as diffbench wrote it before run.json described its tasks."""
    edit_record(run, lambda record: record.pop("task_info"))


def plant_changes(run: Path, task: str) -> None:
    """tiny-diff's margin at the largest shot count up by 0.2 (worse: lower is better) and its
    1-shot accuracy up by 0.2 (better)."""
    metrics = pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)
    icl = (metrics["task"] == task) & (metrics["model"] == "tiny-diff")
    shots = pd.to_numeric(metrics["shots"], errors="coerce")
    margin = icl & (metrics["metric"] == "margin") & (shots == shots[icl].max())
    accuracy = icl & (metrics["metric"] == "accuracy") & (metrics["shots"] == "1")
    accuracy &= metrics["draw"] == "all"
    assert margin.sum() == 1 and accuracy.sum() == 1
    for mask in (margin, accuracy):
        metrics.loc[mask, "value"] = f"{float(metrics.loc[mask, 'value'].iloc[0]) + 0.2:.10g}"
    metrics.to_csv(run / "metrics.csv", index=False)


def summary(run: Path, task: str = "icl") -> str:
    """report.md's summary (table and legend), the task renamed back to `task`."""
    text = (run / "report.md").read_text().split("## Summary\n")[1].split("\n![")[0]
    return text.replace(UNPLUGGED, task)


def verdicts(baseline: Path, candidate: Path) -> tuple[int, list[tuple]]:
    """The gate's exit status and every row's identity, direction and status."""
    res = run_cli(
        baseline.parent,
        "compare",
        str(baseline),
        str(candidate),
        "--format",
        "json",
        "--tolerance",
        "0.01",
        "--fail-on",
        "regression",
    )
    assert res.returncode in (0, 1), res.stderr
    rows = [
        (
            c["task"].replace(UNPLUGGED, "icl"),
            c["metric"],
            c["model"],
            json.dumps(c["setting"], sort_keys=True),
            c["lower_is_better"],
            c["status"],
        )
        for c in json.loads(res.stdout)["changes"]
    ]
    return res.returncode, rows


def test_a_task_without_its_plugin_reports_and_gates_as_with_it(grid_run, tmp_path):
    base, cand = copy_run(grid_run, tmp_path / "base"), copy_run(grid_run, tmp_path / "cand")
    plant_changes(cand, "icl")
    bare_base = copy_run(base, tmp_path / "bare" / "base")
    bare_cand = copy_run(cand, tmp_path / "bare" / "cand")
    for run in (bare_base, bare_cand):
        rename_task(run, "icl", UNPLUGGED)
    for run in (base, bare_base):
        res = run_cli(tmp_path, "report", str(run))
        assert res.returncode == 0, res.stderr
    assert summary(bare_base) == summary(base)
    assert "| icl | margin ↓ |" in summary(bare_base)  # lower is better, read from run.json

    with_plugin, without = verdicts(base, cand), verdicts(bare_base, bare_cand)
    assert without == with_plugin
    status, rows = without
    assert status == 1
    changed = {(r[0], r[1], r[2]): (r[4], r[5]) for r in rows if r[5] != "unchanged"}
    # Margin went up: worse, since lower is better; accuracy went up: better.
    assert changed == {
        ("icl", "margin", "tiny-diff"): (True, "regression"),
        ("icl", "accuracy", "tiny-diff"): (False, "improvement"),
    }


def test_a_run_from_before_task_info_reads_through_the_installed_plugin(grid_run, tmp_path):
    old = copy_run(grid_run, tmp_path / "old")
    forget_task_info(old)
    res = run_cli(tmp_path, "report", str(old))
    assert res.returncode == 0, res.stderr
    assert "run.json does not describe task 'icl' (an older run)" in res.stderr
    assert summary(old) == summary(grid_run)
    # Neither described nor installed: one line, the same from every reader of the run.
    rename_task(old, "icl", UNPLUGGED)
    for args in (["report", str(old)], ["compare", str(old), "--models", "tiny-base,tiny-diff"]):
        assert_one_line_error(
            run_cli(tmp_path, *args),
            f"does not describe task '{UNPLUGGED}'",
            "no installed plugin provides it",
        )


def test_redrawing_figures_without_the_task_plugin_draws_them_from_run_json(grid_run, tmp_path):
    run = copy_run(grid_run, tmp_path / "run")
    rename_task(run, "icl", UNPLUGGED)
    shutil.rmtree(run / "figures")
    res = run_cli(tmp_path, "plot", str(run))
    assert res.returncode == 0, res.stderr
    assert "no figures of task" not in res.stderr  # the specs are in run.json
    assert list((run / "figures").glob(f"{UNPLUGGED}_*.png"))
    assert (run / "figures" / "niah_heatmap_score_n1r1.png").exists()


def test_runs_that_disagree_on_a_metrics_direction_are_refused(grid_run, tmp_path):
    other = copy_run(grid_run, tmp_path / "other")

    def flip_margin(record: dict) -> None:
        for m in record["task_info"]["icl"]["metric_defs"]:
            if m["name"] == "margin":
                m["better"] = "higher"

    edit_record(other, flip_margin)
    for args in (
        ["compare", str(grid_run), str(other)],
        ["report", str(grid_run), str(other), "--output", str(tmp_path / "merged")],
    ):
        assert_one_line_error(
            run_cli(tmp_path, *args), "disagree on whether lower is better for icl margin"
        )


def test_runs_lists_run_records_of_every_version_and_skips_a_newer_or_damaged_one(tmp_path, capsys):
    root = tmp_path / "results"
    write_run_json(root / "today", TODAYS_RUN_JSON)
    write_run_json(root / "first", first_run_json())
    write_run_json(root / "newer", {**TODAYS_RUN_JSON, "diffbench_run": 3})
    write_run_json(root / "torn", '{"diffbench_run": 2, "conf')
    assert cli_main("runs", "--root", str(root)) == 0
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines()[1:]]
    started = TODAYS_RUN_JSON["started"]
    assert sorted(rows) == [
        [str(root / "first"), "zeroshot", "tiny-diff", started, "—"],  # stopped: no finished
        [str(root / "today"), "zeroshot", "tiny-diff", started, TODAYS_RUN_JSON["finished"]],
    ]
    assert "skipping" in err and "newer diffbench (run record version 3" in err
    assert f"{root / 'torn' / 'run.json'} is not valid JSON" in err


def test_a_report_reads_its_provenance_from_a_first_version_run_record(grid_run, tmp_path):
    old = copy_run(grid_run, tmp_path / "old")

    def first_version(record: dict) -> None:
        for key in ("task_order", "world_size", "finished"):
            del record[key]
        record["diffbench_run"] = 1
        del record["models"]["tiny-base"]  # a model the record never got to

    edit_record(old, first_version)
    res = run_cli(tmp_path, "report", str(old))
    assert res.returncode == 0, res.stderr
    md = (old / "report.md").read_text()
    provenance = md.split("## Provenance\n")[1]
    assert "| tiny-base | ? | ? | ? | ? | ? | ? |" in provenance
    assert "DiffLlamaForCausalLM" in provenance
    assert ", finished not yet" in provenance
    # The same rows, tasks in alphabetical order (the record has no task_order).
    assert sorted(summary(old).splitlines()) == sorted(summary(grid_run).splitlines())
    assert summary(old).index("| icl |") < summary(old).index("| niah |")
