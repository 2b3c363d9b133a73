"""Plumbing shared by the benchmark scripts (bench_icl, bench_lmeval, bench_niah): each side of a
comparison runs in its own interpreter, so its peak memory and import state are its own.

A script runs `spawn(...)` in the parent; the child is the same script started with
`--worker JOB --worker-out OUT`, which reads the job, runs it and writes its result with
`write_text`. Not a benchmark itself: `scripts/` is on sys.path when a script runs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> None:
    """Write a file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class PassCounter:
    """Counts a model's forward passes and the token positions fed to them (padding too)."""

    def __init__(self, model: Any) -> None:
        self.passes = 0
        self.tokens = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        self.passes += 1
        self.tokens += int(ids.numel()) if ids is not None else 0


def spawn(script: str, job: dict[str, Any], work: Path, stem: str, threads: int = 0) -> dict:
    """Run `script` as a worker on `job` in a fresh, offline interpreter (`threads` torch threads,
    0: torch's default); its result with the process's wall time and peak RSS added. A failed
    worker ends the benchmark with the tail of its log."""
    job_file, out_file, log_file = (work / f"{stem}.{ext}" for ext in ("job", "out", "log"))
    write_text(job_file, json.dumps(job))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf_datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, script, "--worker", str(job_file), "--worker-out", str(out_file)]
    start = time.perf_counter()
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if code != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{Path(script).stem}: {stem} failed (exit {code}):\n{tail}")
    result: dict[str, Any] = json.loads(out_file.read_text())
    result["process_seconds"] = wall
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result
