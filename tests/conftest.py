"""Shared fixtures: a real tiny Llama / DiffLlama pair and a way to run the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
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
    """Run `python -m diffbench.cli ARGS` as a real subprocess in a scratch working directory."""

    def run(*args: str, timeout: float = 600) -> CliResult:
        return run_cli(tmp_path, *args, timeout=timeout)

    return run


def run_cli(cwd: Path, *args: str, timeout: float = 600) -> CliResult:
    """`python -m diffbench.cli ARGS` as a real subprocess in `cwd`, offline."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffbench.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
