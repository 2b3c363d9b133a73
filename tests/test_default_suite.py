"""The default suite: `diffbench run` without --tasks runs every task family of the paper on the
shipped pair, and a sweep scoped to some tasks leaves the others on the unswept models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from diffbench.cli import DEFAULT_SUITE
from diffbench.config import Sweep, expand_sweep
from diffbench.errors import DiffbenchError
from diffbench.models import ModelSpec
from diffbench.store import RunStore

SUITE = yaml.safe_load(DEFAULT_SUITE.read_text(encoding="utf-8"))
PAIR = ("tiny-base", "tiny-diff", "tiny-diff2")


@pytest.fixture(scope="module")
def limited_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default suite on the shipped pair, one sample per setting."""
    from conftest import run_cli

    cwd = tmp_path_factory.mktemp("suite")
    res = run_cli(cwd, "run", "--limit", "1", "--output", "run", "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd / "run"


def test_the_default_suite_covers_every_task_family_of_the_paper() -> None:
    assert set(SUITE["tasks"]) == {
        "niah", "icl", "hallucination", "outliers", "zeroshot", "nll", "throughput"
    }  # fmt: skip
    assert SUITE["options"]["niah"]["mode"] == "all"  # Table 3's attention allocation too
    assert SUITE["sweep_tasks"] == ["zeroshot"]


@pytest.mark.slow
def test_the_default_suite_with_limit_writes_rows_for_every_task_and_all_three_models(
    limited_run: Path,
) -> None:
    metrics = RunStore(limited_run).metrics()
    for task in SUITE["tasks"]:
        rows = metrics[metrics["task"] == task]
        models = set(rows["model"])
        if task in SUITE["sweep_tasks"]:  # only the sweep's variants run it
            bits = SUITE["sweep"]["logit_bits"]
            assert models == {f"{m}@logit_bits={b}" for m in PAIR for b in bits}, task
        else:
            assert models == set(PAIR), task
        assert rows["value"].notna().any(), task
    niah = metrics[metrics["task"] == "niah"]
    assert {"generate", "score", "attention"} <= set(niah["mode"])


@pytest.mark.slow
def test_a_limited_default_run_records_each_models_tasks_and_writes_the_report(
    limited_run: Path,
) -> None:
    record = RunStore(limited_run).read_run()
    tasks = {m["label"]: m.get("tasks") for m in record["config"]["models"]}
    assert tasks["tiny-base"] == [t for t in SUITE["tasks"] if t != "zeroshot"]
    assert tasks["tiny-diff@logit_bits=4"] == ["zeroshot"]
    assert (limited_run / "report.md").is_file()


def test_a_task_scoped_sweep_keeps_the_unswept_models_for_the_other_tasks() -> None:
    models = (ModelSpec("a", "tiny-base"), ModelSpec("b", "tiny-diff", {"dtype": "float32"}))
    out = expand_sweep(
        models, Sweep("logit_bits", ("16", "4"), ("zeroshot",)), ("niah", "zeroshot")
    )
    assert [(m.label, m.tasks) for m in out] == [
        ("a", ("niah",)),
        ("a@logit_bits=16", ("zeroshot",)),
        ("a@logit_bits=4", ("zeroshot",)),
        ("b", ("niah",)),
        ("b@logit_bits=16", ("zeroshot",)),
        ("b@logit_bits=4", ("zeroshot",)),
    ]
    assert out[5].options == {"dtype": "float32", "logit_bits": "4"}
    assert out[0].runs("niah") and not out[0].runs("zeroshot")
    # Scoped to every task of the run: the unswept models have nothing left to run.
    only = expand_sweep(models, Sweep("logit_bits", ("8",), ("zeroshot",)), ("zeroshot",))
    assert [m.label for m in only] == ["a@logit_bits=8", "b@logit_bits=8"]
    with pytest.raises(DiffbenchError, match="sweep tasks icl are not tasks of this run"):
        expand_sweep(models, Sweep("logit_bits", ("8",), ("icl",)), ("niah",))


@pytest.mark.slow
def test_the_metrics_of_a_scoped_sweep_have_no_rows_for_a_model_on_a_task_it_did_not_run(
    limited_run: Path,
) -> None:
    metrics = RunStore(limited_run).metrics()
    assert metrics[(metrics["task"] == "zeroshot") & metrics["model"].isin(PAIR)].empty
    swept = metrics["model"].str.contains("@", regex=False)
    assert metrics[swept & (metrics["task"] != "zeroshot")].empty


@pytest.mark.slow
def test_the_report_opens_with_the_paper_and_follows_the_runs_task_order(limited_run: Path) -> None:
    md = (limited_run / "report.md").read_text(encoding="utf-8")
    heads = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert heads[0] == "The paper in miniature"
    assert [h for h in heads if h in SUITE["tasks"]] == SUITE["tasks"]  # not alphabetical
    paper = md.split("## The paper in miniature")[1].split("\n## ")[0]
    for source in ("Table 2", "Table 3", "Table 4", "Table 5", "Table 7", "Figure 8"):
        assert f"**{source}**" in paper, source
