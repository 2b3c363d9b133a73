"""The run directory under stress: two writers, a torn last line, changed tokenizers and inputs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import CliResult, models_arg, run_cli
from diffbench.api import INPUT_KEY, SCORE_KEY
from diffbench.errors import DiffbenchError
from diffbench.store import RunStore

SCORE_RUN = [
    "run",
    "--tasks",
    "niah",
    "--set",
    "niah.lengths=512,1024",
    "--set",
    "niah.samples=2",
    "--set",
    "niah.mode=score",
    "--no-report",
]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_line_error(res: CliResult, *fragments: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    err = res.stderr.strip().splitlines()[-1]  # after any progress lines
    assert err.startswith("diffbench: error:"), res.stderr
    for fragment in fragments:
        assert fragment in err, err


def stop_when(args: list[str], cwd: Path, watched: Path, min_lines: int) -> subprocess.Popen:
    """Start the CLI and SIGSTOP it once `watched` holds `min_lines` lines (it stays mid-run)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffbench.cli", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if watched.exists() and len(watched.read_text().splitlines()) >= min_lines:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the run finished before it could be stopped"
    return proc


def test_second_writer_of_a_run_directory_is_refused_and_the_first_writes_no_duplicates(
    tiny_pair, tmp_path
):
    out = tmp_path / "run"
    args = [
        "run",
        "--tasks",
        "niah",
        "--set",
        "niah.lengths=512,1024",
        "--set",
        "niah.samples=2",
        "--models",
        f"diff={tiny_pair['tiny-diff']}",
        "--no-report",
        "--output",
        str(out),
    ]
    samples = out / "samples" / "niah" / "diff.jsonl"
    first = stop_when(args, tmp_path, samples, 3)
    try:
        before = samples.read_bytes()
        second = run_cli(tmp_path, *args)
        assert_one_line_error(second, str(out), "another diffbench process")
        assert samples.read_bytes() == before  # the refused process wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    ids = [s["id"] for s in lines(samples)]
    assert len(ids) == len(set(ids)) == 40


def test_report_and_compare_read_through_a_torn_last_line_and_leave_it_alone(tiny_pair, tmp_path):
    out = tmp_path / "run"
    res = run_cli(tmp_path, *SCORE_RUN, "--models", models_arg(tiny_pair), "--output", str(out))
    assert res.returncode == 0, res.stderr
    samples = out / "samples" / "niah" / "diff.jsonl"
    complete = lines(samples)
    with samples.open("a") as fh:  # a run killed in the middle of writing a line
        fh.write('{"id": "niah-torn", "task": "niah", "model": "diff", "sco')
    torn = samples.read_bytes()

    report = run_cli(tmp_path, "report", str(out))
    assert report.returncode == 0, report.stderr
    compare = run_cli(tmp_path, "compare", str(out), "--models", "base,diff")
    assert compare.returncode == 0, compare.stderr
    assert "Traceback" not in report.stderr + compare.stderr
    assert samples.read_bytes() == torn  # readers never repair: only the locked writer does

    frame = RunStore.open_existing(out).samples("niah")
    assert sorted(frame.loc[frame["model"] == "diff", "id"]) == sorted(s["id"] for s in complete)


def test_a_damaged_line_before_the_last_is_a_one_line_error(tmp_path):
    store = RunStore(tmp_path)
    path = store.samples_file("niah", "diff")
    path.parent.mkdir(parents=True)
    good = json.dumps({"id": "a", "model": "diff", SCORE_KEY: 1.0})
    path.write_text(f"{good}\n{{not json\n{good}\n")
    with pytest.raises(DiffbenchError, match="line 2") as err:
        store.samples("niah")
    assert "\n" not in str(err.value)


def test_resume_refuses_a_checkpoint_whose_tokenizer_files_changed(tiny_pair, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_pair["tiny-diff"], model)
    args = [*SCORE_RUN, "--set", "niah.lengths=512", "--models", f"diff={model}"]
    out = tmp_path / "run"
    first = run_cli(tmp_path, *args, "--output", str(out))
    assert first.returncode == 0, first.stderr
    record = (out / "run.json").read_bytes()

    # Same weights, other tokenizer bytes: the scores could differ, so the run must not mix them.
    tokenizer = model / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))
    again = run_cli(tmp_path, *args, "--output", str(out))
    assert_one_line_error(again, "'diff' has changed", "tokenizer files")
    assert (out / "run.json").read_bytes() == record


def test_run_recorded_before_tokenizers_were_hashed_still_resumes(tiny_pair, tmp_path):
    args = [*SCORE_RUN, "--set", "niah.lengths=512", "--models", f"diff={tiny_pair['tiny-diff']}"]
    out = tmp_path / "run"
    assert run_cli(tmp_path, *args, "--output", str(out)).returncode == 0
    run_file = out / "run.json"
    record = json.loads(run_file.read_text())
    weights_only = record["models"]["diff"]["fingerprint"].split(";")[0]  # the old format
    record["models"]["diff"]["fingerprint"] = weights_only
    run_file.write_text(json.dumps(record))

    again = run_cli(tmp_path, *args, "--output", str(out))
    assert again.returncode == 0, again.stderr
    assert "10/10 already scored" in again.stderr
    upgraded = json.loads(run_file.read_text())["models"]["diff"]["fingerprint"]
    assert upgraded.startswith(weights_only + ";tokenizer:")


def test_resume_rescores_exactly_the_sample_whose_inputs_changed(tiny_pair, tmp_path):
    args = [*SCORE_RUN, "--models", f"diff={tiny_pair['tiny-diff']}"]
    out = tmp_path / "run"
    first = run_cli(tmp_path, *args, "--output", str(out))
    assert first.returncode == 0, first.stderr
    metrics = (out / "metrics.csv").read_bytes()
    path = out / "samples" / "niah" / "diff.jsonl"
    original = lines(path)

    # As if the prompt of sample 3 had been built differently when it was scored: its stored
    # result (score included) belongs to other inputs and must not count.
    tampered = [dict(s) for s in original]
    tampered[3][INPUT_KEY] = "0" * 16
    tampered[3][SCORE_KEY] = 1.0 - float(tampered[3][SCORE_KEY])
    path.write_text("".join(json.dumps(s) + "\n" for s in tampered))

    again = run_cli(tmp_path, *args, "--output", str(out))
    assert again.returncode == 0, again.stderr
    assert "19/20 already scored" in again.stderr
    after = lines(path)
    assert after[:-1] == tampered
    assert after[-1] == original[3]  # the same sample, scored again on today's inputs
    assert (out / "metrics.csv").read_bytes() == metrics

    frame = RunStore.open_existing(out).samples("niah").set_index("id")
    assert frame.loc[original[3]["id"], INPUT_KEY] == original[3][INPUT_KEY]
    assert len(frame) == 20 and not frame.index.duplicated().any()
    assert pd.Series(frame[SCORE_KEY]).notna().all()


def test_a_file_where_the_run_directory_should_be_is_a_one_line_error(tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("keep me\n")
    with pytest.raises(DiffbenchError, match="is a file") as err, RunStore(target).lock():
        pass
    assert "\n" not in str(err.value)
    assert target.read_text() == "keep me\n"
