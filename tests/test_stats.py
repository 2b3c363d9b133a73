"""Intervals and paired tests: seeded (cluster) bootstrap, McNemar and sign-flip tests, rows mapped
to samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from diffbench import stats
from diffbench.api import CLUSTER_KEY
from diffbench.results import load_run
from scipy.stats import binomtest


def cached_run(basetemp: Path, name: str, *args: str) -> Path:
    """A real run (with report) of `diffbench run ARGS`, made once per test session under
    `name`; the tests that share it copy it before changing anything."""
    run = basetemp / name / "run"
    if not (run / "report.html").exists():
        shutil.rmtree(run, ignore_errors=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        tasks = () if "--tasks" in args else ("--tasks", "niah")
        res = run_cli(run.parent, "run", *tasks, *args, "--output", "run")
        assert res.returncode == 0, res.stderr
    return run


def shared_run(tiny_pair: dict[str, Path], basetemp: Path) -> Path:
    """A real run of diff, base and twin (= diff's checkpoint again), 20 NIAH samples each,
    shared by the stats, compare and report tests: one run instead of three keeps them fast."""
    diff, base = tiny_pair["tiny-diff"], tiny_pair["tiny-base"]
    models = f"diff={diff},base={base},twin={diff}"
    sets = ("--set", "niah.lengths=256", "--set", "niah.samples=4", "--set", "niah.mode=score")
    return cached_run(basetemp, "shared-run", "--models", models, *sets)


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
    assert graded.test == "sign-flip" and graded.significant
    # Every pair favours the candidate: the exact sign-flip p of 30 pairs, 2 / 2^30.
    assert graded.p_value == pytest.approx(2 / 2**30)
    # A row that re-weights its samples (a mean of per-depth means) shifts the interval with its
    # value; the test is on the paired samples and does not move.
    noisy = pd.Series(np.random.default_rng(0).normal(0.1, 1.0, 30), index=ids)
    shifted = [
        stats.difference(0.0, value, reference_scores=reference, candidate_scores=noisy)
        for value in (0.0, 0.2, 0.35, 0.5)
    ]
    assert len({d.p_value for d in shifted}) == 1
    lows = [d.interval.low for d in shifted if d.interval is not None]
    assert np.diff(lows) == pytest.approx([0.2, 0.15, 0.15])


def test_sign_flip_test_is_mcnemar_on_binary_pairs():
    for gained, lost in [(7, 1), (14, 2), (20, 5), (3, 3)]:
        sums = np.array([1.0] * gained + [-1.0] * lost + [0.0] * 10)
        expected = binomtest(gained, gained + lost, 0.5).pvalue
        assert stats.sign_flip_test(sums) == pytest.approx(expected, rel=1e-9)


def averaged_row(scores: np.ndarray, depths: np.ndarray) -> float:
    """A NIAH-like row value: the mean over depths of per-depth means, as metrics.csv keeps it."""
    value = pd.Series(scores).groupby(depths).mean().mean()
    return float(f"{value:.10g}")


def test_rounding_in_an_averaged_row_is_not_a_difference():
    # 5 depths x 20 samples, scores in {0, 0.5, 1} (two queried needles); the candidate differs
    # from the reference in one sample. The row values differ from the samples' means only by
    # rounding, which used to shift the interval off zero: most trials came out significant.
    depths = np.repeat(np.arange(5), 20)
    ids = [f"s{i}" for i in range(len(depths))]
    for seed in range(100):
        rng = np.random.default_rng(seed)
        ref = rng.choice([0.0, 0.5, 1.0], len(ids))
        cand = ref.copy()
        i = rng.integers(len(ids))
        cand[i] = 0.5 if ref[i] == 1.0 else 1.0
        d = stats.difference(
            averaged_row(ref, depths),
            averaged_row(cand, depths),
            reference_scores=pd.Series(ref, index=ids),
            candidate_scores=pd.Series(cand, index=ids),
        )
        assert d.interval is not None and d.p_value is not None
        assert not d.significant and not d.interval.excludes_zero(), (seed, d)
        assert d.p_value == 1.0  # one non-zero pair: either sign is as likely


@pytest.mark.parametrize(("n", "p"), [(1, 1.0), (2, 0.5)])
def test_one_or_two_pairs_are_never_significant(n, p):
    ids = [f"s{i}" for i in range(n)]
    reference = pd.Series([0.25] * n, index=ids)
    d = stats.difference(0.25, 0.75, reference_scores=reference, candidate_scores=reference + 0.5)
    assert d.p_value == pytest.approx(p) and not d.significant
    if n == 1:  # a bootstrap of one pair is a point, not an interval
        assert d.interval is None
        assert stats.estimate(0.25, 1, float("nan"), reference).interval is None


def draws_of_one_example(with_cluster: bool) -> stats.SampleIndex:
    """ICL-like samples: 24 test examples under 2 identical demonstration draws, two models.

    The candidate gains 7 examples and loses 1; each draw repeats the same scores.
    """
    reference = [0.0] * 7 + [1.0] + [1.0] * 8 + [0.0] * 8
    candidate = [1.0] * 7 + [0.0] + [1.0] * 8 + [0.0] * 8
    rows = []
    for model, scores in (("base", reference), ("diff", candidate)):
        for draw in (0, 1):
            for t, score in enumerate(scores):
                row = {"id": f"k4-d{draw}-t{t}", "model": model, "score": score, "draw": draw}
                if with_cluster:
                    row[CLUSTER_KEY] = f"k4-t{t}"
                rows.append(row)
    return stats.SampleIndex.build(pd.DataFrame(rows), ("draw",))


def test_repeated_draws_of_one_example_add_no_significance():
    index = draws_of_one_example(with_cluster=True)

    def diff(draw: str) -> stats.Difference:
        return stats.difference(
            index.scores("base", {"draw": draw}).mean(),
            index.scores("diff", {"draw": draw}).mean(),
            reference_scores=index.scores("base", {"draw": draw}),
            candidate_scores=index.scores("diff", {"draw": draw}),
        )

    one, both = diff("0"), diff("all")
    assert one.test == "McNemar exact" and one.p_value == pytest.approx(0.0703125)
    assert both.p_value is not None and both.p_value >= one.p_value - 1e-12
    assert not both.significant
    assert both.test == "cluster sign-flip" and both.n_pairs == 48 and both.n_clusters == 24
    # Each model's interval: the second draw repeats the first, so it is no narrower.
    for model in ("base", "diff"):
        alone = stats.estimate(0.0, None, float("nan"), index.scores(model, {"draw": "0"}))
        twice = stats.estimate(0.0, None, float("nan"), index.scores(model, {"draw": "all"}))
        assert alone.interval is not None and twice.interval is not None
        assert twice.interval.method == "cluster bootstrap"
        assert (twice.interval.low, twice.interval.high) == (
            alone.interval.low,
            alone.interval.high,
        )
    # Without the cluster key the 48 samples count as independent pairs: 14 gained, 2 lost.
    flat = draws_of_one_example(with_cluster=False)
    counted_twice = stats.difference(
        0.0,
        0.0,
        reference_scores=flat.scores("base", {"draw": "all"}),
        candidate_scores=flat.scores("diff", {"draw": "all"}),
    )
    assert counted_twice.p_value == pytest.approx(binomtest(14, 16, 0.5).pvalue)


def test_samples_measured_on_different_inputs_get_no_paired_test():
    ids = [f"s{i}" for i in range(30)]
    score = pd.Series([0.0] * 10 + [1.0] * 20, index=ids)
    cluster = pd.Series(ids, index=ids)
    same = pd.Series([f"h{i}" for i in range(30)], index=ids)
    other = same.copy()
    other["s3"] = "changed"
    reference = stats.SampleScores(score, cluster, same)
    d = stats.difference(
        0.6,
        0.7,
        reference_scores=reference,
        candidate_scores=stats.SampleScores(score, cluster, other),
    )
    assert d.inputs_differ and d.n_pairs == 0 and d.test == "none" and not d.significant
    paired = stats.difference(0.6, 0.7, reference_scores=reference, candidate_scores=reference)
    assert not paired.inputs_differ and paired.test == "McNemar exact"


def test_metrics_without_samples_get_a_normal_interval_from_their_stderr():
    e = stats.estimate(2.0, 100, 0.1, None)
    assert e.interval is not None and e.interval.method == "normal"
    assert e.interval.low == pytest.approx(2.0 - 1.96 * 0.1, abs=1e-3)
    assert stats.estimate(2.0, 1, float("nan"), None).interval is None
    d = stats.difference(2.0, 2.5, reference_stderr=0.1, candidate_stderr=0.1)
    assert d.test == "normal" and d.significant


def test_every_metric_row_maps_to_the_samples_it_averages(twin_run):
    results = load_run(twin_run)
    assert results.info("niah").sample_mean_metrics == {"accuracy"}  # as run.json records it
    for _, row in results.metrics.iterrows():
        setting = {k: row[k] for k in results.setting_columns("niah")}
        scores = results.scores("niah", row["metric"], row["model"], setting)
        assert scores is not None and len(scores) == int(row["n"])
        assert scores.mean() == pytest.approx(float(row["value"]))
        assert set(scores.cluster) == set(scores.score.index)  # NIAH names no clusters


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
