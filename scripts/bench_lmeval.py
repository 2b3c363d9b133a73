"""Benchmark (issue #13): lm-eval 0.4.13's own `hf` model against diffbench's lm-eval adapter.

One run, one model, one lm-eval task (the shipped offline `diffbench_magic_mc`, include_path
tasks/lm_eval_local, 5-shot `first_n` demonstrations, four seven-digit choices per document),
the same `--limit N` documents, both driven by lm-eval's own evaluator (`simple_evaluate`):

- `lmeval`: lm-eval's `HFLM(pretrained=DIR, gguf_file=NAME, dtype=float32, batch_size=1)`
  (lm-eval's default batch size): one forward pass per (context, continuation) pair.
- `diffbench`: `diffbench.lm_eval.DiffbenchLM(model=SPEC, dtype=float32)` passed to the same
  `simple_evaluate` (the `--model diffbench` path of `diffbench lm-eval`; `diffbench run --tasks
  lm-eval:NAME` feeds the same adapter functions through the runner): the choices of one document
  become one choice request, the demonstrations every document shares are encoded once per block
  of 64 documents as a KV cache, and the choices are scored as a token trie.

Each side runs in its own subprocess (peak RSS from wait4, so peaks do not mix). Wall time is
`simple_evaluate` alone (building the requests, scoring, lm-eval's metrics); model loading and
lm-eval's task indexing are timed apart. Predictions are lm-eval's `acc` argmax over each
document's choice log-likelihoods; the largest log-likelihood gap is over every (document,
choice). Timings belong here, never in tests.

    .venv/bin/python scripts/bench_lmeval.py --json docs/bench_lmeval.json
    .venv/bin/python scripts/bench_lmeval.py --limit 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _bench import PassCounter, peak_rss_mib, spawn, write_text

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "tasks" / "lm_eval_local"
TASK = "diffbench_magic_mc"
SIDES = ("lmeval", "diffbench")


@dataclass(frozen=True)
class Job:
    """One side of the comparison, as a worker subprocess reads it."""

    side: str
    model: str
    task: str
    include_path: str
    limit: int
    shots: int
    lmeval_batch_size: int
    diffbench_batch_size: int
    threads: int


# ---- one side, in a worker subprocess -----------------------------------------------------------


def load_lm(job: Job) -> tuple[Any, Any]:
    """The side's lm-eval `LM` and its torch model."""
    if job.side == "lmeval":
        from diffbench.models import ModelSpec, resolve_target
        from lm_eval.models.huggingface import HFLM

        target = resolve_target(ModelSpec("lmeval", job.model))
        lm = HFLM(
            pretrained=target.path, gguf_file=target.gguf_file, device="cpu", dtype="float32",
            batch_size=job.lmeval_batch_size,
        )  # fmt: skip
        return lm, lm.model
    from diffbench.lm_eval import DiffbenchLM

    lm = DiffbenchLM(
        model=job.model, label="diffbench", dtype="float32",
        batch_size=str(job.diffbench_batch_size),
    )  # fmt: skip
    return lm, lm.backend.model


def run_worker(job: Job) -> dict[str, Any]:
    """Run one side on the task; wall time excludes imports, model loading and task indexing."""
    import torch

    if job.threads:
        torch.set_num_threads(job.threads)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    lm, model = load_lm(job)
    load_seconds = time.perf_counter() - start
    rss_after_load = peak_rss_mib()
    counter = PassCounter(model)
    start = time.perf_counter()
    manager = TaskManager(include_path=job.include_path, include_defaults=False)
    index_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm, tasks=[job.task], task_manager=manager, limit=job.limit, num_fewshot=job.shots,
        bootstrap_iters=0, log_samples=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert out is not None
    samples = sorted(out["samples"][job.task], key=lambda s: s["doc_id"])
    logprobs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    results = out["results"][job.task]
    return {
        "seconds": seconds,
        "load_seconds": load_seconds,
        # the process's peak so far once the model is loaded (GGUF de-quantization included):
        # the evaluation raised the peak only where peak_rss_mib is larger
        "peak_rss_after_load_mib": rss_after_load,
        "index_seconds": index_seconds,
        "n_documents": len(samples),
        "accuracy": results["acc,none"],
        "accuracy_norm": results["acc_norm,none"],
        # lm-eval's acc: the first choice of largest log-likelihood (numpy argmax)
        "predictions": [max(range(len(ll)), key=lambda k: (ll[k], -k)) for ll in logprobs],
        "logprobs": logprobs,
        "contexts": [s["arguments"][0][0] for s in samples],
        "passes": counter.passes,
        "tokens": counter.tokens,
        "torch_threads": torch.get_num_threads(),
    }


# ---- the run ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="smollm2", help="diffbench model spec (built-in, folder, .gguf)"
    )
    p.add_argument("--task", default=TASK, help="lm-eval multiple-choice task name")
    p.add_argument("--include-path", type=Path, default=TASK_DIR, help="folder of task YAMLs")
    p.add_argument(
        "--limit", type=int, default=20,
        help="documents (the first N); lm-eval's side costs about 4 full passes per document",
    )  # fmt: skip
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--lmeval-batch-size", type=int, default=1, help="HFLM's (lm-eval default 1)")
    p.add_argument("--diffbench-batch-size", type=int, default=8, help="HFBackend's (default 8)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per side (0: torch's default; 1 is steadier on a shared machine)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--workdir", type=Path, help="keep job files and worker logs here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.limit < 1 or args.shots < 0:
        p.error("--limit must be >= 1 and --shots >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(Job(**json.loads(args.worker.read_text())))
        write_text(args.worker_out, json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-lmeval-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        sides = {}
        for side in SIDES:
            job = Job(side, args.model, args.task, str(args.include_path), args.limit,
                      args.shots, args.lmeval_batch_size, args.diffbench_batch_size,
                      args.threads)  # fmt: skip
            print(f"running {side} ...", file=sys.stderr, flush=True)
            sides[side] = spawn(__file__, asdict(job), work, job.side)
            print(f"  {sides[side]['seconds']:.1f} s", file=sys.stderr, flush=True)
    report = summarise(args, sides)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the checkout when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def summarise(args: argparse.Namespace, sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """All figures of the run, as the JSON file holds them."""
    lm, d = sides["lmeval"], sides["diffbench"]
    same = sum(a == b for a, b in zip(lm["predictions"], d["predictions"], strict=True))
    gaps = [
        abs(x - y)
        for row_a, row_b in zip(lm["logprobs"], d["logprobs"], strict=True)
        for x, y in zip(row_a, row_b, strict=True)
    ]
    keep = ("logprobs", "predictions", "contexts")
    return {
        "speedup_vs_lmeval": lm["seconds"] / d["seconds"],
        "memory_ratio_lmeval_to_diffbench": lm["peak_rss_mib"] / d["peak_rss_mib"],
        "accuracy_lmeval": lm["accuracy"],
        "accuracy_diffbench": d["accuracy"],
        "predictions_identical": same == len(lm["predictions"]),
        "n_predictions_identical": same,
        "n_documents": len(lm["predictions"]),
        "contexts_identical": lm["contexts"] == d["contexts"],
        "max_logprob_gap": max(gaps),
        "setting": {
            "model": args.model, "task": args.task, "include_path": shown(args.include_path),
            "shots": args.shots, "limit": args.limit,
            "lmeval_batch_size": args.lmeval_batch_size,
            "diffbench_batch_size": args.diffbench_batch_size, "dtype": "float32",
            "cpu_count": os.cpu_count(), "torch_threads": d["torch_threads"],
            "load_average_1min": os.getloadavg()[0],
        },
        "sides": {s: {k: v for k, v in r.items() if k not in keep} for s, r in sides.items()},
    }  # fmt: skip


def print_report(rep: dict[str, Any]) -> None:
    """The table and the ratios, as plain text."""
    s = rep["setting"]
    print(
        f"\nlm-eval task {s['task']}: {s['model']}, {s['shots']}-shot, {rep['n_documents']} "
        f"documents, float32, {s['cpu_count']} CPUs (load {s['load_average_1min']:.1f})"
    )
    print(
        f"{'side':<11}{'eval s':>8}{'load s':>8}{'process s':>11}{'peak MiB':>10}{'at load':>9}"
        f"{'acc':>7}{'acc_norm':>10}{'passes':>8}{'tokens':>9}"
    )
    for name, r in rep["sides"].items():
        print(
            f"{name:<11}{r['seconds']:>8.1f}{r['load_seconds']:>8.1f}{r['process_seconds']:>11.1f}"
            f"{r['peak_rss_mib']:>10.0f}{r['peak_rss_after_load_mib']:>9.0f}{r['accuracy']:>7.3f}{r['accuracy_norm']:>10.3f}"
            f"{r['passes']:>8}{r['tokens']:>9}"
        )
    print(
        f"speedup vs lm-eval {rep['speedup_vs_lmeval']:.1f}x; lm-eval / diffbench peak memory "
        f"{rep['memory_ratio_lmeval_to_diffbench']:.2f}x"
    )
    print(
        f"predictions identical {rep['n_predictions_identical']}/{rep['n_documents']}; contexts "
        f"identical: {rep['contexts_identical']}; largest |log-likelihood gap| "
        f"{rep['max_logprob_gap']:.2e}"
    )


if __name__ == "__main__":
    sys.exit(main())
