"""Shared fixtures: a real tiny Llama / DiffLlama pair and a way to run the real CLI."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

# In-process CLI runs see this process's environment: offline, as the subprocess runs were
# (huggingface_hub reads it on import).
os.environ["HF_HUB_OFFLINE"] = "1"

from diffbench.tasks import haystack
from diffbench.tiny import save_random_pair


def tokenizer_corpus() -> list[str]:
    """Text in the shape of the tasks' prompts, to train the tiny tokenizer on."""
    needles = [
        haystack.NEEDLE.format(city=c, number=str(1_000_000 + 7919 * i))
        for i, c in enumerate(haystack.CITIES)
    ]
    questions = [haystack.QUESTION.format(city=c) for c in haystack.CITIES]
    answers = [haystack.ANSWER_PREFIX.format(city=c) for c in haystack.CITIES]
    return [haystack.procedural_text(i, 3000) for i in range(40)] + needles + questions + answers


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-init tiny-base (Llama) and tiny-diff (DiffLlama) checkpoints in HF format."""
    return save_random_pair(tmp_path_factory.mktemp("tiny"), tokenizer_corpus(), max_context=1024)


CliResult = subprocess.CompletedProcess[str]


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., CliResult]:
    """Run `diffbench ARGS` in a scratch working directory (in process; `subprocess_=True`: a real
    subprocess)."""

    def run(*args: str, timeout: float = 600, subprocess_: bool = False) -> CliResult:
        return run_cli(tmp_path, *args, timeout=timeout, subprocess_=subprocess_)

    return run


def run_cli(cwd: Path, *args: str, timeout: float = 600, subprocess_: bool = False) -> CliResult:
    """`diffbench ARGS` in `cwd`, offline: in this process through `cli.main(argv)` (stdout,
    stderr and the exit status captured as a subprocess would give them), or as a real
    `python -m diffbench.cli` subprocess with `subprocess_=True` (what needs a process of its own:
    signals, kills, a fresh interpreter)."""
    if subprocess_:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(
            [sys.executable, "-m", "diffbench.cli", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return _in_process(cwd, list(args))


def _in_process(cwd: Path, argv: list[str]) -> CliResult:
    """`cli.main(argv)` with cwd, stdout and stderr as a subprocess would have them; an unexpected
    exception becomes a traceback on stderr and status 1, as Python's own would."""
    from diffbench import cli

    out, err = io.StringIO(), io.StringIO()
    before = Path.cwd()
    logger = logging.getLogger("diffbench")
    handlers = list(logger.handlers)
    try:
        os.chdir(cwd)
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("default")
            warnings.showwarning = _warning_to(err)
            try:
                code = cli.main(argv)
            except SystemExit as stop:  # argparse's usage errors and --help
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=err)
            except Exception:
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(before)
        for extra in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(extra)
    return subprocess.CompletedProcess(["diffbench", *argv], code, out.getvalue(), err.getvalue())


def _warning_to(stream: io.StringIO) -> Callable[..., None]:
    """A `warnings.showwarning` writing to `stream`, as the interpreter writes to stderr."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))

    return show


def kill_when(args: list[str], cwd: Path, watched: Path, min_lines: int) -> int:
    """Start the CLI, SIGKILL it once `watched` holds `min_lines` lines; return the lines left."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffbench.cli", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if watched.exists() and len(watched.read_text().splitlines()) >= min_lines:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(watched.read_text().splitlines())


def models_arg(pair: dict[str, Path]) -> str:
    """--models value running both tiny checkpoints."""
    return f"diff={pair['tiny-diff']},base={pair['tiny-base']}"


def rename_tasks(run: Path, names: dict[str, str]) -> None:
    """Rename tasks wherever a run names them: run.json (task_info, task_order, the config's
    tasks), metrics.csv's task column, and the samples' folders and rows."""
    record = json.loads((run / "run.json").read_text())
    if "task_info" in record:  # a run from before run.json described its tasks has none
        record["task_info"] = {
            names.get(t, t): {**info, "name": names.get(t, t)}
            for t, info in record["task_info"].items()
        }
    if "task_order" in record:
        record["task_order"] = [names.get(t, t) for t in record["task_order"]]
    record["config"]["tasks"] = {names.get(t, t): v for t, v in record["config"]["tasks"].items()}
    (run / "run.json").write_text(json.dumps(record, indent=2))
    for old, new in names.items():
        assert f'"{old}"' not in (run / "run.json").read_text()
        folder = run / "samples" / new
        (run / "samples" / old).rename(folder)
        for path in folder.glob("*.jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text("".join(json.dumps({**r, "task": new}) + "\n" for r in rows))
    metrics = pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)
    metrics.assign(task=metrics["task"].replace(names)).to_csv(run / "metrics.csv", index=False)
