"""The CLI end to end on real tiny Llama and DiffLlama checkpoints: outputs, resume, batching."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import kill_when, models_arg

SMALL = ["--tasks", "niah", "--set", "niah.lengths=256,512", "--set", "niah.samples=2"]


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_store_report_and_figures_for_both_architectures(cli, tiny_pair, tmp_path):
    out = tmp_path / "run"
    res = cli("run", *SMALL, "--models", models_arg(tiny_pair), "--output", str(out))
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["models"]["diff"]["architecture"] == "DiffLlamaForCausalLM"
    assert run["models"]["base"]["architecture"] == "LlamaForCausalLM"
    assert run["models"]["diff"]["fingerprint"].startswith("sha256:")
    assert run["config"]["tasks"]["niah"]["lengths"] == [256, 512]
    assert {"torch", "transformers", "diffbench"} <= set(run["versions"])

    metrics = pd.read_csv(out / "metrics.csv", dtype=str, keep_default_na=False)
    assert list(metrics.columns[:6]) == ["task", "metric", "model", "value", "n", "stderr"]
    assert {"length", "depth", "needles", "queries", "mode"} <= set(metrics.columns)
    # 2 models x 2 modes x 2 lengths x (5 depths + the mean over depths)
    assert len(metrics) == 2 * 2 * 2 * 6
    assert set(metrics["model"]) == {"diff", "base"}

    for model in ("diff", "base"):
        samples = read_samples(out / "samples" / "niah" / f"{model}.jsonl")
        assert len(samples) == 2 * 5 * 2 * 2  # lengths x depths x samples x modes
        assert len({s["id"] for s in samples}) == len(samples)
        assert all({"id", "input_sha256", "target", "output", "score"} <= set(s) for s in samples)
        assert all(s["n_prompt_tokens"] <= s["length"] for s in samples)

    report = (out / "report.md").read_text()
    assert "| diff | base |" in report.replace(" base − diff |", "")
    for ext in ("png", "pdf"):
        assert (out / "figures" / f"niah_heatmap_score_n1r1.{ext}").stat().st_size > 1000


def test_same_seed_gives_byte_identical_metrics_and_rerun_resumes(cli, tiny_pair, tmp_path):
    args = ["run", *SMALL, "--set", "niah.mode=score", "--models", models_arg(tiny_pair)]
    first = cli(*args, "--output", str(tmp_path / "a"))
    second = cli(*args, "--output", str(tmp_path / "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a = (tmp_path / "a" / "metrics.csv").read_bytes()
    assert a == (tmp_path / "b" / "metrics.csv").read_bytes()
    again = cli(*args, "--output", str(tmp_path / "a"))
    assert again.returncode == 0
    assert "resuming" in again.stderr
    assert "20/20 already scored" in again.stderr
    assert (tmp_path / "a" / "metrics.csv").read_bytes() == a


def test_default_output_is_named_from_the_run_identity(cli, tiny_pair, tmp_path):
    args = [
        "run",
        *SMALL,
        "--set",
        "niah.mode=score",
        "--set",
        "niah.lengths=256",
        "--models",
        f"diff={tiny_pair['tiny-diff']}",
        "--no-report",
    ]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    run_dir = Path(first.stdout.strip().splitlines()[-1])
    assert run_dir.parts[0] == "results" and run_dir.name.startswith("niah__diff__")
    again = cli(*args)
    assert Path(again.stdout.strip().splitlines()[-1]) == run_dir
    assert "already scored" in again.stderr


def test_default_run_dir_of_the_default_suite_is_short_stable_and_follows_the_config(
    tmp_path, monkeypatch
):
    from diffbench.cli import DEFAULT_SUITE, build_parser
    from diffbench.runconfig import build_run

    monkeypatch.chdir(tmp_path)

    def run_dir(*argv: str) -> Path:
        output = build_run(build_parser().parse_args(["run", *argv])).output
        assert output is not None
        return output

    first = run_dir()
    assert first.parent == Path("results") and len(str(first)) < 60, first
    shipped = "tiny-base+tiny-diff+tiny-diff2"
    assert re.fullmatch(rf"default__{re.escape(shipped)}__[0-9a-f]{{10}}", first.name), first
    assert run_dir() == first  # the same command resumes the same directory
    reseeded = run_dir("--seed", "7")
    assert reseeded != first and reseeded.name.startswith(f"default__{shipped}__")
    # A copy of the suite is named after its file; the same identity keeps the same hash.
    (tmp_path / "paper.yaml").write_text(DEFAULT_SUITE.read_text(encoding="utf-8"))
    copy = run_dir("--config", "paper.yaml")
    assert copy.name == first.name.replace("default__", "paper__", 1)
    assert run_dir("--tasks", "niah,icl,nll,zeroshot").name.startswith(
        f"niah+icl+nll+1more__{shipped}__"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["paper.yaml"]  # nothing written


@pytest.mark.slow  # a killed subprocess, twice the run
def test_sigkill_mid_run_then_rerun_matches_uninterrupted_run(cli, tiny_pair, tmp_path):
    args = [
        "run",
        "--tasks",
        "niah",
        "--set",
        "niah.lengths=256,512",
        "--set",
        "niah.samples=2",
        "--models",
        models_arg(tiny_pair),
        "--no-report",
    ]
    killed = tmp_path / "killed"
    first_file = killed / "samples" / "niah" / "diff.jsonl"
    partial = kill_when([*args, "--output", str(killed)], tmp_path, first_file, 5)
    assert 5 <= partial < 40

    resumed = cli(*args, "--output", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    clean = cli(*args, "--output", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    assert (killed / "metrics.csv").read_bytes() == (
        tmp_path / "clean" / "metrics.csv"
    ).read_bytes()
    for model in ("diff", "base"):
        ids = [s["id"] for s in read_samples(killed / "samples" / "niah" / f"{model}.jsonl")]
        assert len(ids) == len(set(ids)) == 40


def test_batch_size_one_and_eight_give_identical_niah_results(cli, tiny_pair, tmp_path):
    runs = {}
    for bs in (1, 8):
        out = tmp_path / f"bs{bs}"
        res = cli(
            "run",
            *SMALL,
            "--set",
            "niah.depths=0,50,100",
            "--models",
            models_arg(tiny_pair),
            "--no-report",
            "--model-args",
            f"diff:batch_size={bs}",
            "--model-args",
            f"base:batch_size={bs}",
            "--output",
            str(out),
        )
        assert res.returncode == 0, res.stderr
        runs[bs] = out
    assert (runs[1] / "metrics.csv").read_bytes() == (runs[8] / "metrics.csv").read_bytes()
    for model in ("diff", "base"):
        one = {s["id"]: s for s in read_samples(runs[1] / "samples" / "niah" / f"{model}.jsonl")}
        eight = {s["id"]: s for s in read_samples(runs[8] / "samples" / "niah" / f"{model}.jsonl")}
        assert one.keys() == eight.keys()
        for sid, s in one.items():
            assert s["output"] == eight[sid]["output"], sid
            if "logprobs" in s:
                for x, y in zip(s["logprobs"], eight[sid]["logprobs"], strict=True):
                    assert abs(x - y) < 1e-4


def test_report_and_plot_commands_redo_outputs_from_the_store(cli, tiny_pair, tmp_path):
    out = tmp_path / "run"
    res = cli(
        "run",
        *SMALL,
        "--set",
        "niah.mode=score",
        "--models",
        models_arg(tiny_pair),
        "--output",
        str(out),
        "--no-report",
    )
    assert res.returncode == 0, res.stderr
    assert not (out / "report.md").exists()
    assert cli("plot", str(out)).returncode == 0
    assert (out / "figures" / "niah_heatmap_score_n1r1.png").exists()
    rep = cli("report", str(out))
    assert rep.returncode == 0
    assert "![niah_heatmap_score_n1r1]" in (out / "report.md").read_text()


def test_list_shows_tasks_options_metrics_and_builtin_models(cli):
    res = cli("list")
    assert res.returncode == 0, res.stderr
    for text in ("niah:", "lengths", "list[int]", "accuracy", "paper-4k", "smollm2", "tiny-diff"):
        assert text in res.stdout
    assert "the default is tiny-base, tiny-diff" in res.stdout
    # The shipped pair is present in every install, so neither is flagged as missing.
    assert not [line for line in res.stdout.splitlines() if "tiny-" in line and "[not" in line]


def test_run_without_models_evaluates_the_shipped_set(cli, tmp_path):
    out = tmp_path / "run"
    res = cli("run", "--tasks", "niah", "--limit", "1", "--set", "niah.depths=50",
              "--output", str(out), "--no-report")  # fmt: skip
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    assert set(run["models"]) == {"tiny-diff", "tiny-base", "tiny-diff2"}
    assert run["models"]["tiny-diff"]["architecture"] == "DiffLlamaForCausalLM"
    assert run["models"]["tiny-base"]["architecture"] == "LlamaForCausalLM"
    assert run["models"]["tiny-diff2"]["architecture"] == "DiffV2ForCausalLM"
    # The default NIAH grid fits inside the pair's training context.
    assert run["models"]["tiny-diff"]["max_context"] >= max(
        run["config"]["tasks"]["niah"]["lengths"]
    )
