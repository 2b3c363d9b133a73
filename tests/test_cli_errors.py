"""Bad input: one clear line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest
from conftest import models_arg


def assert_one_line_error(res, *fragments: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("diffbench: error:")]
    assert len(errors) == 1, res.stderr
    assert all(line.startswith("diffbench: ") for line in lines), res.stderr  # no library noise
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--tasks", "nope"], ["unknown task 'nope'", "niah"]),
        (["--models", "=x"], ["malformed --models"]),
        (["--models", "a=./does/not/exist"], ["not an existing path"]),
        (["--set", "niah.colour=red"], ["unknown option niah.colour"]),
        (["--set", "niah.samples=many"], ["niah.samples expects int"]),
        (["--set", "niah.mode=shout"], ["niah.mode must be one of"]),
        (["--set", "niahsamples=3"], ["malformed --set"]),
        (["--set", "niah.preset=paper-1m"], ["unknown niah preset"]),
        (["--bogus"], ["unrecognized arguments: --bogus"]),
    ],
)
def test_bad_run_arguments_fail_with_one_line(cli, args, fragments):
    assert_one_line_error(cli("run", *args), *fragments)


def test_length_beyond_model_context_fails_and_keeps_scored_samples(cli, tiny_pair, tmp_path):
    out = tmp_path / "run"
    # Model a may use 2048 tokens and is scored in full; model b (1024) then fails.
    res = cli(
        "run",
        "--models",
        models_arg(tiny_pair).replace("diff=", "a=").replace("base=", "b="),
        "--model-args",
        "a:max_length=2048",
        "--set",
        "niah.lengths=256,2048",
        "--set",
        "niah.samples=1",
        "--set",
        "niah.mode=score",
        "--output",
        str(out),
    )
    assert_one_line_error(res, "niah length 2048", "maximum context of 1024")
    kept = (out / "samples" / "niah" / "a.jsonl").read_text().splitlines()
    assert len(kept) == 2 * 5


def test_empty_haystack_file_fails(cli, tiny_pair, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    res = cli("run", "--models", models_arg(tiny_pair), "--set", f"niah.haystack={empty}")
    assert_one_line_error(res, "is empty")


def test_missing_config_file_and_unknown_run_directory_fail(cli, tmp_path):
    assert_one_line_error(cli("run", "--config", str(tmp_path / "nope.yaml")), "does not exist")
    assert_one_line_error(cli("report", str(tmp_path)), "not a diffbench run directory")


def test_resume_into_a_directory_of_another_run_is_refused(cli, tiny_pair, tmp_path):
    out = tmp_path / "run"
    base = [
        "run",
        "--models",
        f"d={tiny_pair['tiny-diff']}",
        "--set",
        "niah.lengths=256",
        "--set",
        "niah.samples=1",
        "--set",
        "niah.mode=score",
        "--output",
        str(out),
        "--no-report",
    ]
    assert cli(*base).returncode == 0
    assert_one_line_error(cli(*base, "--seed", "7"), "different configuration")
