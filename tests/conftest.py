"""Shared fixtures: a real tiny Llama / DiffLlama pair and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
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
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(
            [sys.executable, "-m", "diffbench.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def models_arg(pair: dict[str, Path]) -> str:
    """--models value running both tiny checkpoints."""
    return f"diff={pair['tiny-diff']},base={pair['tiny-base']}"
