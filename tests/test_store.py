"""The run directory under stress: two writers, a torn last line, changed tokenizers and inputs."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import CliResult, models_arg, run_cli
from diffbench import cli
from diffbench.api import INPUT_KEY, SCORE_KEY, ModelInfo, TaskInfo
from diffbench.errors import DiffbenchError
from diffbench.store import RUN_RECORD_VERSION, RunRecord, RunStore

SCORE_RUN = [
    "run",
    "--tasks",
    "niah",
    "--set",
    "niah.lengths=256,512",
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


@pytest.mark.slow  # a second process against a stopped first one
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


# ---- run.json, the run record --------------------------------------------------------------

# run.json as diffbench wrote it at version 2 (a real zero-shot run of the shipped tiny-diff,
# copied, its task description trimmed to the fields TaskInfo reads).
TODAYS_RUN_JSON = {
    "command": ["bench/cli.py", "run", "--tasks", "zeroshot", "--models", "tiny-diff"],
    "config": {
        "limit": None,
        "models": [{"label": "tiny-diff", "options": {}, "spec": "tiny-diff"}],
        "seed": 1234,
        "tasks": {
            "zeroshot": {
                "choices": 4,
                "facts": [1, 2, 4],
                "filler": 6,
                "formats": ["needle"],
                "preset": "",
                "samples": 8,
            }
        },
    },
    "diffbench_run": 2,
    "finished": "2026-12-07T21:58:31+0000",
    "git_revision": "f2ea996c912576fa7362edb373d6e9f800daab57",
    "models": {
        "tiny-diff": {
            "architecture": "DiffLlamaForCausalLM",
            "backend": "hf",
            "dtype": "float32",
            "fingerprint": "sha256:7f7f06c89d6e3e64;tokenizer:ef36506498498bc9",
            "has_chat_template": False,
            "label": "tiny-diff",
            "max_context": 1024,
            "n_parameters": 721792,
            "path": "/work/main/bench/models/tiny-diff",
            "spec": "tiny-diff",
        }
    },
    "started": "2026-12-07T21:58:29+0000",
    "task_info": {
        "zeroshot": {
            "description": "Zero-shot multiple choice: recall a fact from a short passage",
            "headline": [{"metric": "accuracy", "where": {"format": "all"}}],
            "lower_is_better": [],
            "metric_defs": [
                {
                    "better": "higher",
                    "by": "",
                    "key": "score",
                    "kind": "proportion",
                    "name": "accuracy",
                    "note": "",
                    "relative": "",
                    "unit": "passage",
                }
            ],
            "metrics": ["accuracy"],
            "name": "zeroshot",
            "paper": [],
            "sample_mean_metrics": ["accuracy"],
            "setting_keys": ["format", "facts"],
        }
    },
    "task_order": ["zeroshot"],
    "versions": {"diffbench": "0.1.0", "python": "3.11.7", "torch": "2.13.0+cpu"},
    "world_size": 1,
}


def first_run_json() -> dict:
    """run.json as the first diffbench wrote it (version 1): no task_info, task_order or
    world_size, and no `finished` for a run that was stopped."""
    old = copy.deepcopy(TODAYS_RUN_JSON)
    for key in ("task_info", "task_order", "world_size", "finished"):
        del old[key]
    old["diffbench_run"] = 1
    return old


def write_run_json(run_dir: Path, content: dict | str | bytes) -> Path:
    """A run directory whose run.json holds `content` (a dict as JSON, text or bytes as is)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return run_dir


def cli_main(*argv: str) -> int:
    """`diffbench ARGV` through cli.main in this process (its log handler removed after)."""
    logger = logging.getLogger("diffbench")
    handlers = list(logger.handlers)
    try:
        return cli.main(list(argv))
    finally:
        for extra in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(extra)


def test_a_run_record_round_trips_through_run_json_in_todays_shape(tmp_path):
    store = RunStore(write_run_json(tmp_path / "run", TODAYS_RUN_JSON))
    record = store.read_record()
    assert record.version == RUN_RECORD_VERSION == 2  # the written shape has not changed
    assert record.models["tiny-diff"] == ModelInfo(**TODAYS_RUN_JSON["models"]["tiny-diff"])
    assert record.model_labels == ("tiny-diff",) and record.task_names == ("zeroshot",)
    assert record.seed == 1234 and record.world_size == 1
    assert record.finished == "2026-12-07T21:58:31+0000"
    assert TaskInfo.from_json(record.task_info["zeroshot"]).metrics == ("accuracy",)

    again = RunStore(tmp_path / "again")
    again.write_record(record)
    assert json.loads(again.run_file.read_text()) == TODAYS_RUN_JSON  # key for key
    assert again.read_record() == record
    assert RunRecord.from_json(record.to_json()) == record


def test_a_running_record_writes_no_finished_key(tmp_path):
    store = RunStore(tmp_path)
    running = RunRecord.from_json({**TODAYS_RUN_JSON, "finished": None})
    store.write_record(running)
    assert "finished" not in json.loads(store.run_file.read_text())
    assert store.read_record().finished is None


def test_run_json_of_every_earlier_shape_reads_with_defaults(tmp_path):
    first = RunStore(write_run_json(tmp_path / "v1", first_run_json())).read_record()
    assert (first.version, first.task_info, first.task_order) == (1, {}, ())
    assert (first.world_size, first.finished) == (1, None)
    assert first.models["tiny-diff"].architecture == "DiffLlamaForCausalLM"
    assert first.started == "2026-12-07T21:58:29+0000"

    # Version 2 before task_order and world_size were recorded, stopped before any model loaded.
    early = {k: v for k, v in TODAYS_RUN_JSON.items() if k not in ("task_order", "world_size")}
    early = {**early, "models": {}, "git_revision": None}
    record = RunStore(write_run_json(tmp_path / "v2", early)).read_record()
    assert (record.task_order, record.world_size, record.models) == ((), 1, {})
    assert record.git_revision is None and "zeroshot" in record.task_info
    # The dict accessor for readers not yet typed gives today's keys.
    assert RunStore(tmp_path / "v2").read_run()["config"]["models"][0]["label"] == "tiny-diff"


def test_a_run_json_from_a_newer_diffbench_is_refused_in_one_line(tmp_path, capsys):
    run_dir = write_run_json(tmp_path / "x", {**TODAYS_RUN_JSON, "diffbench_run": 3})
    expected = (
        f"{run_dir / 'run.json'} was written by a newer diffbench (run record version 3; "
        "this one reads up to 2): upgrade diffbench"
    )
    with pytest.raises(DiffbenchError) as err:
        RunStore(run_dir).read_record()
    assert str(err.value) == expected

    assert cli_main("report", str(run_dir)) == 2
    captured = capsys.readouterr()
    assert captured.err == f"diffbench: error: {expected}\n"
    assert not (run_dir / "report.md").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"diffbench_run": 2, "config": {', "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"config": {}}', "no 'diffbench_run' version"),
        ({**TODAYS_RUN_JSON, "diffbench_run": "2"}, "'diffbench_run' is str"),
        ({**TODAYS_RUN_JSON, "diffbench_run": 0}, "version 0"),
        ({k: v for k, v in TODAYS_RUN_JSON.items() if k != "config"}, "no 'config'"),
        ({**TODAYS_RUN_JSON, "models": {"tiny-diff": {"spec": "x"}}}, "lacks label, backend"),
        ({**TODAYS_RUN_JSON, "world_size": "1"}, "'world_size' is str"),
        ({**TODAYS_RUN_JSON, "task_order": "zeroshot"}, "'task_order' is str"),
    ],
)
def test_a_malformed_run_json_is_refused_in_one_line(tmp_path, capsys, content, fragment):
    run_dir = write_run_json(tmp_path / "x", content)
    with pytest.raises(DiffbenchError) as err:
        RunStore(run_dir).read_record()
    message = str(err.value)
    assert "\n" not in message and str(run_dir / "run.json") in message
    assert fragment in message, message

    assert cli_main("report", str(run_dir)) == 2
    err_lines = capsys.readouterr().err.splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("diffbench: error: "), err_lines
    assert fragment in err_lines[0]
