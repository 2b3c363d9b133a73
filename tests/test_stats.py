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
    """A real run of diff, base and twin (= diff's checkpoint again), 40 NIAH samples each (8
    haystack draws at 5 depths: enough units for a paired test to reach significance),
    shared by the stats, compare and report tests: one run instead of three keeps them fast."""
    diff, base = tiny_pair["tiny-diff"], tiny_pair["tiny-base"]
    models = f"diff={diff},base={base},twin={diff}"
    sets = ("--set", "niah.lengths=256", "--set", "niah.samples=8", "--set", "niah.mode=score")
    return cached_run(basetemp, "shared-run", "--models", models, *sets)


@pytest.fixture(scope="module")
def twin_run(tiny_pair, tmp_path_factory) -> Path:
    """A copy of the shared run: diff and twin are the same checkpoint under two labels."""
    run = shared_run(tiny_pair, tmp_path_factory.getbasetemp())
    copy = tmp_path_factory.mktemp("stats") / "run"
    shutil.copytree(run, copy)
    return copy


def test_a_proportion_gets_a_wilson_interval_never_of_zero_width():
    scores = np.array([1.0] * 7 + [0.0] * 13)
    e = stats.estimate(0.35, 20, float("nan"), pd.Series(scores), "proportion")
    assert e.interval is not None and e.interval.method == "Wilson"
    assert e.interval.low == pytest.approx(0.1812, abs=1e-3)
    assert e.interval.high == pytest.approx(0.5671, abs=1e-3)
    # 60 of 60 (the old percentile bootstrap said [1.000, 1.000]): Wilson's lower bound ~0.94.
    perfect = stats.estimate(1.0, 60, float("nan"), pd.Series(np.ones(60)), "proportion")
    assert perfect.interval is not None
    assert 0.93 < perfect.interval.low < 0.95 and perfect.interval.high == 1.0
    # 2 of 4 units where each unit's five samples agree (NIAH 2/2 on 4 haystacks, old:
    # [0.500, 0.500]): the units, not the 20 samples, set the width.
    clustered = stats.SampleScores(
        pd.Series([1.0] * 10 + [0.0] * 10, index=[f"s{i}" for i in range(20)]),
        pd.Series([f"h{i // 5}" for i in range(20)], index=[f"s{i}" for i in range(20)]),
        pd.Series("", index=[f"s{i}" for i in range(20)]),
    )
    e = stats.estimate(0.5, 20, float("nan"), clustered, "proportion")
    assert e.n_clusters == 4 and e.interval is not None
    assert e.interval.low < 0.2 and e.interval.high > 0.8
    # All-zero clustered scores: each unit counts once, and the interval still has width.
    zeros = stats.SampleScores(pd.Series(0.0, index=clustered.score.index), clustered.cluster,
                               clustered.inputs)  # fmt: skip
    e = stats.estimate(0.0, 20, float("nan"), zeros, "proportion")
    assert e.interval is not None and e.interval.high == pytest.approx(stats.wilson(0.0, 4)[1])


def test_a_mean_gets_a_t_interval_over_its_units():
    values = np.array([0.1, 0.3, 0.2, 0.4])
    e = stats.estimate(0.25, 4, float("nan"), pd.Series(values), "mean")
    assert e.interval is not None and e.interval.method == "t"
    half = 3.182446 * values.std(ddof=1) / 2  # t(0.975, 3) * se
    assert e.interval.low == pytest.approx(0.25 - half) and e.interval.high == pytest.approx(
        0.25 + half
    )


def test_a_continuous_metric_on_four_paired_haystacks_gets_the_exact_test_not_a_z():
    # The review's evidence: NIAH attention_noise, depth=50, 1/1, 4 haystacks, delta -0.029 with
    # stderrs 0.001: the old unpaired z-test gave p = 1.3e-90. Four paired units can give no p
    # below 2/2^4 = 0.125.
    ids = [f"h{i}" for i in range(4)]
    base = pd.Series([0.500, 0.503, 0.498, 0.501], index=ids)
    diff = base - pd.Series([0.028, 0.030, 0.029, 0.0296], index=ids)
    d = stats.difference(
        float(base.mean()), float(diff.mean()), reference_scores=base, candidate_scores=diff,
        kind="mean",
    )  # fmt: skip
    assert d.test == "sign-flip" and d.p_value == pytest.approx(0.125)
    assert d.p_min == pytest.approx(0.125) and not d.can_reach and not d.significant
    assert d.interval is not None and d.interval.method == "paired t"
    # A statistic (not a mean over samples) gets no test at all, whatever its stderr.
    none = stats.difference(1.0, 2.0, kind="statistic")
    assert none.test == "none" and none.p_value is None and "statistic" in none.reason


def test_delta_interval_and_test_come_from_the_same_paired_ids():
    # Reference: 50 samples, 12 of them ones; candidate: those 12 ids, all ones. The old code
    # took delta from every row (+0.760) and the test from the 12 shared ids (p=1).
    ids = [f"s{i}" for i in range(50)]
    reference = pd.Series([1.0] * 12 + [0.0] * 38, index=ids)
    candidate = pd.Series(1.0, index=ids[:12])
    d = stats.difference(
        0.24, 1.0, reference_scores=reference, candidate_scores=candidate, kind="proportion"
    )
    assert d.delta == 0.0 and d.n_pairs == 12
    assert (d.n_reference, d.n_candidate) == (50, 12)
    assert d.p_value == 1.0 and d.interval is not None and d.interval.low < 0 < d.interval.high


def test_holm_and_benjamini_hochberg_adjust_a_family():
    p = [0.01, 0.04, 0.03, 0.005]
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    diffs = [stats.Difference(0.1, 10, None, x, "sign-flip", x < 0.05, 10, p_min=0.002) for x in p]
    bh = stats.adjust(diffs, "benjamini-hochberg")
    assert [d.p_adjusted for d in bh] == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert all(d.significant for d in bh) and bh[0].adjustment == "benjamini-hochberg"
    holm = stats.adjust(diffs, "holm")
    assert [d.significant for d in holm] == [True, False, False, True]
    untested = stats.Difference(0.1, 0, None, None, "none", False)
    assert stats.adjust([untested], "holm") == [untested]


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
    d = stats.difference(
        0.0, 25 / 30, reference_scores=reference, candidate_scores=candidate, kind="proportion"
    )
    assert d.test == "McNemar exact" and d.n_pairs == 30 and d.significant
    assert d.interval is not None and d.interval.method == "Newcombe paired"
    assert d.interval.low > 0.6
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
    if n == 1:  # one unit gives no interval
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
        alone = stats.estimate(
            0.0, None, float("nan"), index.scores(model, {"draw": "0"}), "proportion"
        )
        twice = stats.estimate(
            0.0, None, float("nan"), index.scores(model, {"draw": "all"}), "proportion"
        )
        assert alone.interval is not None and twice.interval is not None
        assert twice.interval.method == "Wilson" and twice.n_clusters == 24
        assert (twice.interval.low, twice.interval.high) == pytest.approx(
            (alone.interval.low, alone.interval.high)
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


def test_statistics_get_an_interval_only_from_their_tasks_stderr_and_no_test():
    e = stats.estimate(2.0, 100, 0.1, None, "statistic")
    assert e.interval is not None and e.interval.method == "normal (task's stderr)"
    assert e.interval.low == pytest.approx(2.0 - 1.96 * 0.1, abs=1e-3)
    assert stats.estimate(2.0, 1, float("nan"), None, "statistic").interval is None
    # A mean whose samples are missing gets no interval from a stderr, and no test.
    assert stats.estimate(2.0, 100, 0.1, None, "mean").interval is None
    d = stats.difference(2.0, 2.5)
    assert d.test == "none" and not d.significant and d.p_value is None


def test_every_metric_row_maps_to_the_samples_it_averages(twin_run):
    results = load_run(twin_run)
    info = results.info("niah")  # as run.json records it
    assert info.metric("accuracy").kind == "proportion"
    assert info.metric("accuracy").unit == "haystack draw"
    for _, row in results.metrics.iterrows():
        setting = {k: row[k] for k in results.setting_columns("niah")}
        scores = results.scores("niah", row["metric"], row["model"], setting)
        assert scores is not None and len(scores) == int(row["n"])
        assert scores.mean() == pytest.approx(float(row["value"]))
        # The unit is the haystack draw, read at every depth: 8 draws behind every row.
        assert scores.n_clusters() == 8
        assert set(scores.cluster) == {f"L256-n1r1-s{k}" for k in range(8)}


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
        assert c["delta"] == 0 and c["interval"][0] < 0 < c["interval"][1]  # never zero width
        assert c["test"] in ("McNemar exact", "cluster sign-flip") and c["p_value"] == 1
        assert not c["significant"]
        assert c["n_clusters"] <= 8 and c["p_adjusted"] == 1
    summary = (twin_run / "report.md").read_text().split("## niah")[0]
    assert "| diff | base | twin | base − diff | twin − diff |" in summary
    twin_cells = [row.split(" | ")[-1] for row in summary.splitlines() if row.startswith("| niah")]
    assert twin_cells and all(c.startswith("+0.000 [-") and " p=1 " in c for c in twin_cells)


def test_report_intervals_are_deterministic(twin_run):
    first = (twin_run / "report.md").read_bytes()
    # The run's own report was written with `--output run`: the same path prints the same.
    res = run_cli(twin_run.parent, "report", "run")
    assert res.returncode == 0, res.stderr
    assert (twin_run / "report.md").read_bytes() == first


def test_a_task_that_emits_an_undeclared_metric_stops_the_aggregation(tmp_path):
    from diffbench import runner
    from diffbench.store import RunStore
    from diffbench.tasks.zeroshot import TASK, ZeroshotConfig

    class Renamed:
        """zeroshot, whose rows name a metric it never declared."""

        def __getattr__(self, name: str):
            return getattr(TASK, name)

        def aggregate(self, config, samples):
            return TASK.aggregate(config, samples).assign(metric="acc")

    store = RunStore(tmp_path / "run")
    store.append("zeroshot", "m", {"id": "q0", "model": "m", "format": "code", "facts": 1,
                                   "score": 1.0})  # fmt: skip
    config = ZeroshotConfig()
    with store.lock():
        good = runner.aggregate(store, {"zeroshot": runner.PreparedTask(TASK, config)})
        assert set(good["metric"]) == {"accuracy"}
        with pytest.raises(RuntimeError, match="does not declare: acc"):
            runner.aggregate(store, {"zeroshot": runner.PreparedTask(Renamed(), config)})


def test_identical_paired_proportions_get_an_interval_of_nonzero_width():
    # Two sweep variants that answer alike: 6 of 12 right on the same ids. Without Newcombe's
    # continuity correction phi = 1 and the interval was [+0.000, +0.000].
    ids = [f"s{i}" for i in range(12)]
    same = pd.Series([1.0] * 6 + [0.0] * 6, index=ids)
    d = stats.difference(0.5, 0.5, reference_scores=same, candidate_scores=same, kind="proportion")
    assert d.interval is not None and d.interval.low < -0.05 and d.interval.high > 0.05
    assert d.interval.low == pytest.approx(-d.interval.high)


def depth_samples() -> pd.DataFrame:
    """One model's scores at two depths, two samples at depth 0 and one at 100, three clusters."""
    return pd.DataFrame(
        {
            "model": ["m"] * 3,
            "length": [256] * 3,
            "depth": [0.0, 0.0, 100.0],
            CLUSTER_KEY: ["a", "b", "a"],
            "score": [1.0, 0.0, 1.0],
        }
    )


def test_aggregate_means_averages_cells_or_samples_into_the_all_row():
    from diffbench.api import ALL, METRIC_COLUMNS, Metric, aggregate_means, stderr_of_mean

    accuracy = [Metric("accuracy")]
    cells = aggregate_means("t", depth_samples(), accuracy, ("length", "depth"), over=("depth",))
    assert list(cells.columns) == [*METRIC_COLUMNS, "length", "depth"]
    by_depth = cells.set_index("depth")
    assert by_depth["value"].to_dict() == {"0": 0.5, "100": 1.0, ALL: 0.75}  # each depth alike
    assert by_depth["n"].to_dict() == {"0": 2, "100": 1, ALL: 3}
    assert by_depth.loc[ALL, "stderr"] == pytest.approx(stderr_of_mean([1.0, 0.0, 1.0]))
    pooled = aggregate_means(
        "t", depth_samples(), accuracy, ("length", "depth"), over=("depth",), weigh="samples"
    )
    assert pooled.set_index("depth").loc[ALL, "value"] == pytest.approx(2 / 3)  # each sample
    # Over clusters, the ALL row's stderr is that of the cluster means (a: 1.0, b: 0.0).
    clustered = aggregate_means(
        "t", depth_samples(), accuracy, ("length", "depth"), over=("depth",), cluster=CLUSTER_KEY
    )
    assert clustered.set_index("depth").loc[ALL, "stderr"] == pytest.approx(0.5)


def test_aggregate_means_reads_a_metrics_key_and_its_per_setting_mapping():
    from diffbench.api import Metric, aggregate_means

    samples = pd.DataFrame(
        {
            "model": ["m", "m"],
            "source": ["s", "s"],
            "lm": [{"acc": True}, {"acc": False}],
            "nll_at": [{"1": 2.0, "8": 1.0}, {"1": 4.0}],
            "absent": [None, None],
        }
    )
    metrics = [
        Metric("acc", key="lm.acc"),
        Metric("nll_at", "lower", "mean", "nll_at", by="position"),
        Metric("absent", key="absent"),  # no sample has a value: no rows
    ]
    rows = aggregate_means("t", samples, metrics, ("source",))
    assert rows.set_index("metric").loc["acc", ["value", "n"]].tolist() == [0.5, 2]
    at = rows[rows["metric"] == "nll_at"].set_index("position")
    assert at["value"].to_dict() == {"1": 3.0, "8": 1.0} and at["n"].to_dict() == {"1": 2, "8": 1}
    assert set(rows["metric"]) == {"acc", "nll_at"}
    with pytest.raises(ValueError, match="over"):
        aggregate_means("t", samples, metrics, ("source",), over=("position",))
