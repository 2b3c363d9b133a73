"""Throughput (Table 7): every model's timed repeats interleaved, one sample per repeat, paired by
id across models; mean rates with an interval over repeats; no relative rows in the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from diffbench.api import ThroughputRequest, stderr_of_mean
from diffbench.backends.hf import HFBackend
from diffbench.models import ModelSpec
from diffbench.tasks.throughput import TASK

OPTIONS = [
    "--set", "throughput.lengths=16,32", "--set", "throughput.new_tokens=2",
    "--set", "throughput.repeats=3", "--no-report", "--output", "run",
]  # fmt: skip
RUN = ["run", "--tasks", "throughput", *OPTIONS]
IDS = {f"L{n}-r{r}" for n in (16, 32) for r in range(3)}


def models(pair: dict[str, Path]) -> list[str]:
    return ["--models", f"base={pair['tiny-base']},diff={pair['tiny-diff']}"]


def lines(run: Path, model: str) -> list[str]:
    return (run / "samples" / "throughput" / f"{model}.jsonl").read_text().splitlines()


def samples(run: Path) -> pd.DataFrame:
    return pd.DataFrame([json.loads(x) for m in ("base", "diff") for x in lines(run, m)])


@pytest.fixture(scope="module")
def run(tiny_pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three repeats at two lengths on the tiny pair."""
    cwd = tmp_path_factory.mktemp("throughput")
    res = run_cli(cwd, *RUN, *models(tiny_pair))
    assert res.returncode == 0, res.stderr
    return cwd / "run"


def test_the_models_timed_repeats_alternate(run: Path) -> None:
    order = samples(run).sort_values("timed_at")
    assert list(order["model"]) == ["base", "diff"] * len(IDS)
    # Repeat r of every model before repeat r + 1 of any, one length after the other.
    assert list(order["id"]) == [i for i in sorted(IDS, key=length_and_repeat) for _ in "ab"]


def length_and_repeat(sample_id: str) -> tuple[int, int]:
    length, repeat = sample_id.removeprefix("L").split("-r")
    return int(length), int(repeat)


def test_each_repeat_is_one_sample_and_the_samples_pair_by_id_across_models(run: Path) -> None:
    s = samples(run)
    for model in ("base", "diff"):
        mine = s[s["model"] == model]
        assert set(mine["id"]) == IDS and len(mine) == len(IDS)
        assert (mine["prefill_tokens_per_s"] > 0).all() and (mine["decode_tokens_per_s"] > 0).all()
        assert (mine["peak_memory_mb"] > 0).all()
    # The same request under the same id: a paired comparison matches them.
    digests = s.pivot(index="id", columns="model", values="input_sha256")
    assert (digests["base"] == digests["diff"]).all()


def test_rows_are_means_over_repeats_with_their_stderr_and_no_relative_rows(run: Path) -> None:
    m = pd.read_csv(run / "metrics.csv")
    assert set(m["metric"]) == {"prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_mb"}
    assert not m["metric"].str.endswith("_relative").any()
    rows = m.set_index(["model", "length", "metric"])
    s = samples(run)
    for (model, length), g in s.groupby(["model", "length"]):
        for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            row = rows.loc[(model, length, metric)]
            assert row["value"] == pytest.approx(g[metric].mean())
            assert row["stderr"] == pytest.approx(stderr_of_mean(g[metric]))
            assert row["n"] == 3
        peak = rows.loc[(model, length, "peak_memory_mb")]
        assert peak["value"] == pytest.approx(g["peak_memory_mb"].max())


def test_the_rates_declare_their_relative_metric_and_repeat_unit() -> None:
    declared = {m.name: m for m in TASK.metrics}
    assert declared["prefill_tokens_per_s"].relative == "prefill_relative"
    assert declared["decode_tokens_per_s"].relative == "decode_relative"
    assert {m.unit for m in TASK.metrics} == {"timing repeat"}
    assert declared["peak_memory_mb"].kind == "statistic"
    assert declared["peak_memory_mb"].better == "lower"
    assert TASK.paper[0].metric == "prefill_relative"


def test_a_rerun_resumes_without_retiming_stored_repeats(
    run: Path, tiny_pair: dict[str, Path], tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # A run stopped after base's last repeat: diff's last two repeats never stored.
    kept = lines(copy, "diff")[:-2]
    lost = {json.loads(x)["id"] for x in lines(copy, "diff")[-2:]}
    (copy / "samples" / "throughput" / "diff.jsonl").write_text("\n".join(kept) + "\n")
    before = {m: lines(copy, m) for m in ("base", "diff")}
    res = run_cli(tmp_path, *RUN, *models(tiny_pair))
    assert res.returncode == 0, res.stderr
    assert "throughput/2 models in turn: 10/12 already scored" in res.stderr
    assert lines(copy, "base") == before["base"]  # nothing re-timed
    after = lines(copy, "diff")
    assert after[: len(kept)] == before["diff"]
    assert {json.loads(x)["id"] for x in after[len(kept) :]} == lost
    # A second rerun times nothing at all.
    again = {m: lines(copy, m) for m in ("base", "diff")}
    res = run_cli(tmp_path, *RUN, *models(tiny_pair))
    assert res.returncode == 0, res.stderr
    assert {m: lines(copy, m) for m in ("base", "diff")} == again


def test_the_removed_reference_option_is_refused_in_one_line(tiny_pair, tmp_path) -> None:
    res = run_cli(tmp_path, *RUN, *models(tiny_pair), "--set", "throughput.reference=base")
    assert res.returncode == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("diffbench: error:")]
    assert len(errors) == 1 and "unknown option throughput.reference" in errors[0], res.stderr
    assert not (tmp_path / "run").exists()


def test_a_backend_warms_each_shape_up_once_and_counts_its_own_memory(tiny_pair) -> None:
    b = HFBackend.load(ModelSpec("base", str(tiny_pair["tiny-base"])))
    prefills: list[int] = []  # prompt lengths of the forwards that are prefills
    b.model.register_forward_pre_hook(lambda _, args: prefills.append(args[0].shape[1]))
    request = ThroughputRequest(24, new_tokens=2, repeats=1, warmup=2)
    b.throughput([request])
    assert [n for n in prefills if n > 1] == [24, 24, 24]  # two warm-ups, one timed
    _, t = b.throughput([request, ThroughputRequest(40, new_tokens=2, repeats=1, warmup=1)])
    assert [n for n in prefills if n > 1] == [24] * 4 + [40] * 2  # 24 is warm, 40 is not
    weights = sum(p.numel() * p.element_size() for p in b.model.parameters())
    assert t.peak_memory_bytes >= weights and t.timed_at > 0
    b.close()


@pytest.mark.slow  # torchrun
def test_under_torchrun_rank_0_alone_times_every_model_in_turn(tiny_pair, tmp_path) -> None:
    from test_sharding import torchrun

    res = torchrun(
        tmp_path, 2, "run", "--tasks", "niah,throughput", *OPTIONS, *models(tiny_pair),
        "--set", "niah.lengths=256", "--set", "niah.samples=1", "--set", "niah.mode=score",
        "--set", "niah.needles=1/1",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    assert not list(run.glob("samples/*/rank*")), "rank folders left after the merge"
    order = samples(run).sort_values("timed_at")
    assert list(order["model"]) == ["base", "diff"] * len(IDS)
    assert set(order["id"]) == IDS
    # Only rank 0 timed: one interleaved pass, and the other rank never claimed a repeat.
    assert res.stderr.count("throughput/2 models in turn: 0/12 already scored") == 1
    assert "throughput/base rank" not in res.stderr
    assert "niah/base rank 1/2" in res.stderr  # the per-model task is still sharded
    assert (run / "samples" / "niah" / "diff.jsonl").is_file()


def test_reports_divide_by_their_reference_when_built_also_for_merged_runs(
    run: Path, tmp_path: Path
) -> None:
    from diffbench.report import build
    from diffbench.results import load_run, load_runs

    s = samples(run)
    by_model = {m: g.set_index("id")["prefill_tokens_per_s"] for m, g in s.groupby("model")}
    l32 = [i for i in sorted(IDS) if i.startswith("L32-")]
    expected = by_model["diff"][l32].mean() / by_model["base"][l32].mean() - 1

    def relative(report, model: str) -> float:
        (line,) = [
            ln
            for sec in report.tasks
            for ln in sec.lines
            if ln.metric == "prefill_relative" and dict(ln.setting)["length"] == "32"
        ]
        return line.estimates[model].value

    one = build(load_run(run), reference="base")
    assert relative(one, "base") == 0.0
    assert relative(one, "diff") == pytest.approx(expected, rel=1e-6)
    line = next(ln for sec in one.tasks for ln in sec.lines if ln.metric == "prefill_relative")
    interval = line.estimates["diff"].interval
    assert interval is not None and interval.method == "t over paired ratios"
    # The other reference: the same pair read the other way round.
    flipped = build(load_run(run), reference="diff")
    assert relative(flipped, "base") == pytest.approx(1 / (1 + expected) - 1, rel=1e-6)
    # Two runs of one model each, merged: each is divided by the report's reference, not by
    # itself (the old task-side rows gave 0.000 for both).
    parts = {}
    for model in ("base", "diff"):
        part = tmp_path / model
        shutil.copytree(run, part)
        other = "diff" if model == "base" else "base"
        (part / "samples" / "throughput" / f"{other}.jsonl").unlink()
        metrics = pd.read_csv(part / "metrics.csv", dtype=str, keep_default_na=False)
        metrics[metrics["model"] == model].to_csv(part / "metrics.csv", index=False)
        parts[model] = part
    merged = build(load_runs([parts["base"], parts["diff"]]), reference="base")
    assert relative(merged, "diff") == pytest.approx(expected, rel=1e-6)
