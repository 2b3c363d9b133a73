"""Intervals and paired tests: seeded bootstrap, McNemar's exact test, rows mapped to samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from diffbench import stats
from diffbench.compare import load_run
from scipy.stats import binomtest


def shared_run(tiny_pair: dict[str, Path], basetemp: Path) -> Path:
    """A real run (with report) of diff, base and twin (= diff's checkpoint again), 20 samples each.

    Made once per test session and shared by the stats, compare and report tests, which copy it
    before changing anything: one run instead of three keeps these modules fast.
    """
    run = basetemp / "shared-run" / "run"
    if not (run / "report.html").exists():
        shutil.rmtree(run, ignore_errors=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        diff, base = tiny_pair["tiny-diff"], tiny_pair["tiny-base"]
        res = run_cli(
            run.parent,
            "run",
            "--models",
            f"diff={diff},base={base},twin={diff}",
            "--set",
            "niah.lengths=256",
            "--set",
            "niah.samples=4",
            "--set",
            "niah.mode=score",
            "--output",
            "run",
        )
        assert res.returncode == 0, res.stderr
    return run


@pytest.fixture(scope="module")
def twin_run(tiny_pair, tmp_path_factory) -> Path:
    """A copy of the shared run: diff and twin are the same checkpoint under two labels."""
    run = shared_run(tiny_pair, tmp_path_factory.getbasetemp())
    copy = tmp_path_factory.mktemp("stats") / "run"
    shutil.copytree(run, copy)
    return copy


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    scores = np.array([1.0] * 7 + [0.0] * 13)
    first, second = stats.bootstrap_interval(scores), stats.bootstrap_interval(scores)
    assert first == second
    assert first.low < 0.35 < first.high
    assert first.low > 0.1 and first.high < 0.6


def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs():
    reference = np.array([1] * 10 + [0] * 12 + [1] * 1 + [0] * 9, dtype=float)
    candidate = np.array([1] * 10 + [0] * 12 + [0] * 1 + [1] * 9, dtype=float)
    p = stats.mcnemar_exact(reference, candidate)
    assert p == pytest.approx(binomtest(9, 10, 0.5).pvalue)
    assert p < 0.05
    assert stats.mcnemar_exact(reference, reference) == 1.0


def test_difference_is_paired_by_sample_id():
    ids = [f"s{i}" for i in range(30)]
    reference = pd.Series([0.0] * 30, index=ids)
    # Same scores, listed in another order: pairing is by id, not by position.
    candidate = pd.Series([1.0] * 25 + [0.0] * 5, index=ids)[::-1]
    d = stats.difference(0.0, 25 / 30, reference_scores=reference, candidate_scores=candidate)
    assert d.test == "McNemar exact" and d.n_pairs == 30 and d.significant
    assert d.interval is not None and d.interval.low > 0.6
    graded = stats.difference(
        0.0, 0.5, reference_scores=reference, candidate_scores=reference + 0.5
    )
    assert graded.test == "paired bootstrap" and graded.significant
    # Every resample favours the candidate: p is as small as the resamples can show, not zero.
    assert graded.p_value == pytest.approx(2 / (stats.RESAMPLES + 1))
    # A row that re-weights its samples (a mean of per-depth means) shifts the interval; the
    # p-value moves with it, so the two never disagree.
    noisy = pd.Series(np.random.default_rng(0).normal(0.1, 1.0, 30), index=ids)
    for value in (0.0, 0.2, 0.35, 0.5):
        d = stats.difference(0.0, value, reference_scores=reference, candidate_scores=noisy)
        assert d.interval is not None and d.p_value is not None
        assert (d.p_value < 0.05) == d.interval.excludes_zero()


def test_metrics_without_samples_get_a_normal_interval_from_their_stderr():
    e = stats.estimate(2.0, 100, 0.1, None)
    assert e.interval is not None and e.interval.method == "normal"
    assert e.interval.low == pytest.approx(2.0 - 1.96 * 0.1, abs=1e-3)
    assert stats.estimate(2.0, 1, float("nan"), None).interval is None
    d = stats.difference(2.0, 2.5, reference_stderr=0.1, candidate_stderr=0.1)
    assert d.test == "normal" and d.significant


def test_every_metric_row_maps_to_the_samples_it_averages(twin_run):
    results = load_run(twin_run)
    assert stats.sample_mean_metrics("niah") == {"accuracy"}
    for _, row in results.metrics.iterrows():
        setting = {k: row[k] for k in results.setting_columns("niah")}
        scores = results.scores("niah", row["metric"], row["model"], setting)
        assert scores is not None and len(scores) == int(row["n"])
        assert scores.mean() == pytest.approx(float(row["value"]))


def test_identical_models_show_no_significant_difference(twin_run):
    res = run_cli(
        twin_run.parent,
        "compare",
        str(twin_run),
        "--models",
        "diff,twin",
        "--format",
        "json",
        "--fail-on",
        "regression",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    changes = json.loads(res.stdout)["changes"]
    assert changes and all(c["status"] == "unchanged" for c in changes)
    for c in changes:
        assert c["delta"] == 0 and c["interval"] == [0, 0]
        assert c["test"] == "McNemar exact" and c["p_value"] == 1 and not c["significant"]
    summary = (twin_run / "report.md").read_text().split("## niah")[0]
    assert "| diff | base | twin | base − diff | twin − diff |" in summary
    twin_cells = [row.split(" | ")[-1] for row in summary.splitlines() if row.startswith("| niah")]
    assert twin_cells and all(c.startswith("+0.000 [+0.000, +0.000] p=1 |") for c in twin_cells)


def test_report_intervals_are_deterministic(twin_run):
    first = (twin_run / "report.md").read_bytes()
    # The run's own report was written with `--output run`: the same path prints the same.
    res = run_cli(twin_run.parent, "report", "run")
    assert res.returncode == 0, res.stderr
    assert (twin_run / "report.md").read_bytes() == first
