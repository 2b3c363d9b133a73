"""Benchmark (issue #17): NIAH generation, diffbench against lm-eval's RULER and the lower bound.

One run, one model (default: the built-in `smollm2`, SmolLM2-135M-Instruct from its GGUF file, in
float32), greedy generation with the model's chat template, at each length (default 1024 and
2048 tokens), N prompts per length:

- `ruler`: lm-eval 0.4.13's RULER `niah_single_1` through lm-eval's own `hf` model
  (`HFLM(pretrained=DIR, gguf_file=NAME, dtype=float32, batch_size=1)`, lm-eval's default batch
  size), `simple_evaluate(..., limit=N, apply_chat_template=True)`. The length goes in through
  `TaskManager(metadata={"max_seq_lengths": [L], "tokenizer": DIR})`, DIR a tokenizer folder
  saved from the model's own tokenizer (the task sizes its haystacks with it).
- `diffbench`: diffbench's niah task, `mode=generate`, `lengths=L`, the default five depths and
  N/5 samples (so N prompts), chat template, through the real runner
  (`diffbench.runner.run(RunConfig(...))`, in process) with the backend's default options
  (`batch_size=auto`) unless `--diffbench-batch-size` says otherwise.
- `lower_bound`: one plain forward pass over each distinct token of diffbench's own prompt set
  at that length (the prompts in sorted token order, each from the KV cache of the one before,
  cropped to the prefix they share: the size of their token trie), plus the decode steps
  diffbench ran (the sum over prompts of new tokens - 1: the first new token comes from the
  prompt's pass) times one decode step's time, measured on the same model over a cache of the
  longest prompt of that length.

Timing. Each method runs in its own subprocess per length (peak RSS from wait4, so peaks do not
mix; the lower bound runs both lengths in one). The headline `s/sample` is the time spent inside
the harness's generation verb (lm-eval's `HFLM.generate_until`, diffbench's
`HFBackend.generate`), wrapped in the worker: tokenization, prefill, decoding and stop checks,
not model loading nor the building of the prompts. `e2e` is the harness's whole evaluation call
(`simple_evaluate`, which for RULER also draws its 500 synthetic documents per length; the
runner's `run` less its model loading, which also writes the store and the metrics). Timings
belong here, never in tests; the machine is shared, so read the ratios, measured in one run.
Workers run one torch thread by default (`--threads`): on this project's two shared cores, torch's
default of two threads collapses whenever another process runs (a 1024-token SmolLM2 prefill took
8-13 s with two threads beside one other job, 4.0-4.3 s with one; a decode step 170-680 ms
against 82 ms), which would make the ratios depend on the neighbours' load.

    .venv/bin/python scripts/bench_niah.py --json docs/bench_niah.json
    .venv/bin/python scripts/bench_niah.py --lengths 256 --n 5     # smoke run
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

RULER_TASK = "niah_single_1"
METHODS = ("ruler", "diffbench", "lower_bound")
DECODE_PROBE_STEPS = 16  # decode steps timed per repetition for the per-step time
DECODE_PROBE_REPS = 3


# ---- workers: one method, one process ---------------------------------------------------------


@dataclass(frozen=True)
class Job:
    method: str
    model: str  # the diffbench model spec (built-in name, folder, .gguf)
    model_dir: str  # the folder lm-eval loads (`pretrained`)
    gguf_file: str  # the GGUF file inside it, "" for a safetensors folder
    tokenizer_dir: str  # a saved tokenizer folder for RULER's sizing
    lengths: list[int]
    n: int  # prompts per length
    seed: int
    batch_size: str  # diffbench's HF batch_size option
    out_dir: str  # the diffbench run directory
    decode_steps: dict[str, int]  # lower bound: decode steps diffbench ran per length
    digests: dict[str, list[str]]  # lower bound: diffbench's request digests per length
    threads: int = 1  # torch threads (0: torch's default)
    profile: bool = False
    haystack_per: str = "sample"  # diffbench's niah.haystack_per (length: RULER's one haystack)


class VerbTimer:
    """Wraps a method of a class or object; sums the seconds spent in it and counts calls."""

    def __init__(self, owner: Any, name: str, profile: bool = False) -> None:
        self.seconds, self.calls = 0.0, 0
        self.profiler: Any = None
        if profile:
            import cProfile

            self.profiler = cProfile.Profile()
        inner = getattr(owner, name)
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            if timer.profiler is not None:
                timer.profiler.enable()
            try:
                return inner(*args, **kwargs)
            finally:
                if timer.profiler is not None:
                    timer.profiler.disable()
                timer.seconds += time.perf_counter() - start
                timer.calls += 1

        setattr(owner, name, timed)

    def report(self, top: int = 30) -> str:
        """The profile's `top` functions by cumulative time, as pstats prints them."""
        import io
        import pstats

        if self.profiler is None:
            return ""
        out = io.StringIO()
        pstats.Stats(self.profiler, stream=out).sort_stats("cumulative").print_stats(top)
        return out.getvalue()


def niah_options(length: int, n: int, haystack_per: str = "sample") -> dict[str, Any]:
    """The niah task options of this benchmark at one length: N prompts over the five depths."""
    return {
        "lengths": (length,),
        "samples": n // 5,
        "mode": "generate",
        "needles": ("1/1",),
        "haystack_per": haystack_per,
    }


def run_config(job: Job, length: int) -> Any:
    from diffbench.models import ModelSpec
    from diffbench.plan import RunConfig

    options = {"dtype": "float32", "batch_size": job.batch_size}
    return RunConfig(
        tasks=("niah",),
        models=(ModelSpec("bench", job.model, options),),
        task_options={"niah": niah_options(length, job.n, job.haystack_per)},
        seed=job.seed,
        output=Path(job.out_dir),
    )


def run_worker(job: Job) -> dict[str, Any]:
    """Run one method; its timings exclude imports and model loading."""
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    if job.method == "ruler":
        return _worker_ruler(job)
    if job.method == "diffbench":
        return _worker_diffbench(job)
    return _worker_lower_bound(job)


def _worker_ruler(job: Job) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

    (length,) = job.lengths
    start = time.perf_counter()
    lm = HFLM(
        pretrained=job.model_dir, gguf_file=job.gguf_file or None, device="cpu",
        dtype="float32", batch_size=1,
    )  # fmt: skip
    load = time.perf_counter() - start
    counter = PassCounter(lm.model)
    timer = VerbTimer(lm, "generate_until", job.profile)
    rss_loaded = peak_rss_mib()
    manager = TaskManager(metadata={"max_seq_lengths": [length], "tokenizer": job.tokenizer_dir})
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm, tasks=[RULER_TASK], task_manager=manager, limit=job.n,
        apply_chat_template=True, bootstrap_iters=0, log_samples=True,
    )  # fmt: skip
    e2e = time.perf_counter() - start
    assert out is not None
    samples = sorted(out["samples"][RULER_TASK], key=lambda s: s["doc_id"])
    tok = lm.tokenizer
    scores, prompt_tokens, new_tokens = [], [], []
    for s in samples:
        text = s["filtered_resps"][0]
        scores.append(string_match_all(postprocess_pred([text]), [s["doc"]["outputs"]]))
        prompt_tokens.append(len(tok(s["arguments"][0][0], add_special_tokens=False).input_ids))
        new_tokens.append(len(tok(s["resps"][0][0], add_special_tokens=False).input_ids))
    return {
        "n": len(samples),
        "seconds": timer.seconds,
        "e2e_seconds": e2e,
        "load_seconds": load,
        "accuracy": sum(scores) / len(scores),
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "mean_new_tokens": sum(new_tokens) / len(new_tokens),
        "passes": counter.passes,
        "tokens_fed": counter.tokens,
        "rss_after_load_mib": rss_loaded,
        "example_output": samples[0]["resps"][0][0] if samples else "",
        "profile": timer.report(),
    }


def _worker_diffbench(job: Job) -> dict[str, Any]:
    from diffbench import plan, runner
    from diffbench.backends.hf import HFBackend
    from diffbench.runner import input_digest
    from diffbench.store import RunStore

    (length,) = job.lengths
    cfg = run_config(job, length)
    loading = VerbTimer(HFBackend, "__init__")
    timer = VerbTimer(HFBackend, "generate", job.profile)
    counters: list[PassCounter] = []
    backends: list[Any] = []
    original_init = HFBackend.__init__

    def init_and_count(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        counters.append(PassCounter(self.model))
        backends.append(self)

    HFBackend.__init__ = init_and_count  # type: ignore[method-assign]
    start = time.perf_counter()
    root = runner.run(cfg)
    e2e = time.perf_counter() - start - loading.seconds
    frame = RunStore(root).samples("niah")
    prepared = plan.prepare_tasks(cfg)["niah"]
    backend = backends[0]
    del backends[:]
    items = {
        it.id: it for it in prepared.task.items(prepared.config, backend.tokenizer_view(), job.seed)
    }
    digests = sorted(input_digest(items[i].request) for i in frame["id"])
    return {
        "n": len(frame),
        "seconds": timer.seconds,
        "e2e_seconds": e2e,
        "load_seconds": loading.seconds,
        "generate_calls": timer.calls,
        "accuracy": float(frame["score"].mean()),
        "accuracy_by_depth": {
            f"{d:g}": float(v) for d, v in frame.groupby("depth")["score"].mean().items()
        },
        "mean_prompt_tokens": float(frame["n_prompt_tokens"].mean()),
        "mean_new_tokens": float(frame["n_new_tokens"].mean()),
        "decode_steps": int((frame["n_new_tokens"] - 1).clip(lower=0).sum()),
        "passes": counters[0].passes,
        "tokens_fed": counters[0].tokens,
        "batch_size": job.batch_size,
        "digests": digests,
        "example_output": str(frame["output"].iloc[0]),
        "profile": timer.report(),
    }


def _worker_lower_bound(job: Job) -> dict[str, Any]:
    import torch
    from diffbench import plan
    from diffbench.backends.hf import HFBackend, encode_prompts
    from diffbench.backends.prefix import common_prefix
    from diffbench.models import ModelSpec
    from diffbench.runner import input_digest
    from transformers import DynamicCache

    backend = HFBackend.load(ModelSpec("bench", job.model, {"dtype": "float32"}))
    model, tok = backend.model, backend.tokenizer
    per_length = {}
    with torch.inference_mode():
        model(input_ids=torch.tensor([[tok.eos_token_id] * 32]), use_cache=True)  # warm-up
        for length in job.lengths:
            prepared = plan.prepare_tasks(run_config(job, length))["niah"]
            items = prepared.task.items(prepared.config, backend.tokenizer_view(), job.seed)
            requests = [it.request for it in items]
            same = sorted(input_digest(r) for r in requests) == job.digests[str(length)]
            encoded = sorted(encode_prompts(tok, [r.prompt for r in requests]))
            trie = 0
            prev: list[int] = []
            cache: Any = None
            start = time.perf_counter()
            for ids in encoded:
                keep = min(common_prefix([prev, ids]), len(ids) - 1) if prev else 0
                if keep == 0:
                    cache = DynamicCache(config=model.config)
                else:
                    cache.crop(keep - cache.get_seq_length())
                model(
                    input_ids=torch.tensor([ids[keep:]]), past_key_values=cache, use_cache=True,
                    logits_to_keep=1,
                )  # fmt: skip
                trie += len(ids) - keep
                prev = ids
            prefill = time.perf_counter() - start
            step = _decode_step_seconds(model, max(encoded, key=len))
            steps = job.decode_steps[str(length)]
            per_length[str(length)] = {
                "n": len(encoded),
                "prompts_identical": same,
                "prompt_tokens": sum(len(e) for e in encoded),
                "trie_tokens": trie,
                "prefill_seconds": prefill,
                "decode_steps": steps,
                "decode_step_seconds": step,
                "decode_seconds": steps * step,
                "seconds": prefill + steps * step,
            }
    return {"lengths": per_length}


def _decode_step_seconds(model: Any, ids: list[int]) -> float:
    """Seconds of one greedy decode step over a KV cache of `ids` (the fastest of a few runs of
    DECODE_PROBE_STEPS steps, each step's argmax fed back)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1
    ).logits[0, -1]
    best = float("inf")
    for _ in range(DECODE_PROBE_REPS):
        token = int(torch.argmax(logits))
        start = time.perf_counter()
        for _ in range(DECODE_PROBE_STEPS):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            token = int(torch.argmax(out.logits[0, -1]))
        best = min(best, (time.perf_counter() - start) / DECODE_PROBE_STEPS)
        cache.crop(len(ids) - cache.get_seq_length())
    return best


# ---- the run ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="built-in name, folder or .gguf")
    p.add_argument("--lengths", default="1024,2048", help="context lengths in tokens")
    p.add_argument("--n", type=int, default=20, help="prompts per length (a multiple of 5)")
    p.add_argument("--seed", type=int, default=1234, help="the diffbench run's seed")
    p.add_argument(
        "--diffbench-batch-size", default="auto",
        help="diffbench's HF batch_size option (auto: the backend's default choice)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per worker (0: torch's default; see the module docstring)",
    )  # fmt: skip
    p.add_argument(
        "--profile", action="store_true",
        help="cProfile both harnesses' generation verbs; the top functions go to the JSON",
    )  # fmt: skip
    p.add_argument(
        "--haystack-per", choices=("sample", "length"), default="sample",
        help="diffbench's niah.haystack_per (length: one haystack per length, as RULER has)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--workdir", type=Path, help="keep the tokenizer, run dirs and worker logs here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.length_list = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not args.length_list or any(n < 128 for n in args.length_list):
        p.error("--lengths: token counts of at least 128")
    if args.n < 5 or args.n % 5:
        p.error("--n: a multiple of 5 (niah's five default depths x samples)")
    return args


def tokenizer_folder(model_dir: str, gguf_file: str, dest: Path) -> str:
    """A folder RULER can load the model's tokenizer from (a GGUF file's is saved out once)."""
    if not gguf_file:
        return model_dir
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file).save_pretrained(dest)
    return str(dest)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(Job(**json.loads(args.worker.read_text())))
        write_text(args.worker_out, json.dumps(result))
        return 0
    from diffbench.models import ModelSpec, resolve_target

    target = resolve_target(ModelSpec("bench", args.model))
    with tempfile.TemporaryDirectory(prefix="bench-niah-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        gguf = target.gguf_file or ""
        tok_dir = tokenizer_folder(target.path, gguf, work / "tokenizer")
        base = Job(
            method="", model=args.model, model_dir=target.path, gguf_file=gguf,
            tokenizer_dir=tok_dir, lengths=[], n=args.n, seed=args.seed,
            batch_size=args.diffbench_batch_size, out_dir="", decode_steps={}, digests={},
            threads=args.threads, profile=args.profile, haystack_per=args.haystack_per,
        )  # fmt: skip
        results: dict[str, dict[str, Any]] = {"ruler": {}, "diffbench": {}}
        for length in args.length_list:
            for method in ("ruler", "diffbench"):
                job = Job(**{**asdict(base), "method": method, "lengths": [length],
                             "out_dir": str(work / f"run_{length}")})  # fmt: skip
                print(f"running {method} at {length} tokens ...", file=sys.stderr, flush=True)
                r = spawn(__file__, asdict(job), work, f"{method}_{length}", job.threads)
                print(f"  {r['seconds']:.1f} s, accuracy {r['accuracy']:.2f}", file=sys.stderr)
                results[method][str(length)] = r
        d = results["diffbench"]
        job = Job(**{**asdict(base), "method": "lower_bound", "lengths": args.length_list,
                     "decode_steps": {k: v["decode_steps"] for k, v in d.items()},
                     "digests": {k: v.pop("digests") for k, v in d.items()}})  # fmt: skip
        print("running lower_bound ...", file=sys.stderr, flush=True)
        bound = spawn(__file__, asdict(job), work, "lower_bound", job.threads)
    report = summarise(args, results, bound)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def summarise(
    args: argparse.Namespace, results: dict[str, dict[str, dict[str, Any]]], bound: dict[str, Any]
) -> dict[str, Any]:
    """All figures of the run, as the JSON file holds them."""
    import torch

    lengths: dict[str, Any] = {}
    for key in map(str, args.length_list):
        ruler, diff = results["ruler"][key], results["diffbench"][key]
        lb = bound["lengths"][key]
        for r in (ruler, diff):
            r["seconds_per_sample"] = r["seconds"] / r["n"]
            r["e2e_seconds_per_sample"] = r["e2e_seconds"] / r["n"]
        lb["seconds_per_sample"] = lb["seconds"] / lb["n"]
        lengths[key] = {
            "speedup_vs_ruler": ruler["seconds_per_sample"] / diff["seconds_per_sample"],
            "e2e_speedup_vs_ruler": ruler["e2e_seconds_per_sample"]
            / diff["e2e_seconds_per_sample"],
            "ratio_to_lower_bound": diff["seconds"] / lb["seconds"],
            "memory_ratio_ruler_to_diffbench": ruler["peak_rss_mib"] / diff["peak_rss_mib"],
            "ruler": ruler,
            "diffbench": diff,
            "lower_bound": lb,
        }
    top = str(max(args.length_list))
    return {
        "speedup_vs_ruler": {k: v["speedup_vs_ruler"] for k, v in lengths.items()},
        "ratio_to_lower_bound": {k: v["ratio_to_lower_bound"] for k, v in lengths.items()},
        "targets": {
            "length": int(top),
            "speedup_vs_ruler_at_least_2": lengths[top]["speedup_vs_ruler"] >= 2,
            "ratio_to_lower_bound_at_most_1.5": lengths[top]["ratio_to_lower_bound"] <= 1.5,
        },
        "lengths": lengths,
        "setting": {
            "model": args.model, "n_per_length": args.n, "niah_samples": args.n // 5,
            "seed": args.seed, "diffbench_batch_size": args.diffbench_batch_size,
            "niah_haystack_per": args.haystack_per,
            "ruler_task": RULER_TASK, "ruler_batch_size": 1, "chat_template": True,
            "dtype": "float32", "cpu_count": os.cpu_count(),
            "torch_threads": args.threads or torch.get_num_threads(),
        },
    }  # fmt: skip


def print_report(rep: dict[str, Any]) -> None:
    """The table and the ratios, as plain text."""
    s = rep["setting"]
    print(
        f"\nNIAH generation: {s['model']} ({s['dtype']}), chat template, {s['n_per_length']} "
        f"prompts per length, {s['cpu_count']} CPUs, {s['torch_threads']} torch threads"
    )
    cols = f"{'length':>7} {'method':<12}{'s/sample':>10}{'e2e s/smp':>11}{'accuracy':>10}"
    print(cols + f"{'peak MiB':>10}{'prompt tok':>12}{'new tok':>9}{'tokens fed':>12}")
    for key, row in rep["lengths"].items():
        for m in ("ruler", "diffbench"):
            r = row[m]
            print(
                f"{key:>7} {m:<12}{r['seconds_per_sample']:>10.3f}"
                f"{r['e2e_seconds_per_sample']:>11.3f}{r['accuracy']:>10.2f}"
                f"{r['peak_rss_mib']:>10.0f}{r['mean_prompt_tokens']:>12.0f}"
                f"{r['mean_new_tokens']:>9.1f}{r['tokens_fed']:>12}"
            )
        lb = row["lower_bound"]
        print(
            f"{key:>7} {'lower_bound':<12}{lb['seconds_per_sample']:>10.3f}{'-':>11}{'-':>10}"
            f"{'-':>10}{'-':>12}{'-':>9}{lb['trie_tokens'] + lb['decode_steps']:>12}"
        )
    print()
    for key, row in rep["lengths"].items():
        lb = row["lower_bound"]
        print(
            f"{key}: speedup vs RULER {row['speedup_vs_ruler']:.2f}x (e2e "
            f"{row['e2e_speedup_vs_ruler']:.2f}x); diffbench / lower bound "
            f"{row['ratio_to_lower_bound']:.2f}x (bound: {lb['trie_tokens']} distinct prompt "
            f"tokens of {lb['prompt_tokens']} in {lb['prefill_seconds']:.2f} s + "
            f"{lb['decode_steps']} decode steps x {1000 * lb['decode_step_seconds']:.1f} ms); "
            f"RULER / diffbench peak memory {row['memory_ratio_ruler_to_diffbench']:.2f}x; "
            f"same prompts: {lb['prompts_identical']}"
        )
    t = rep["targets"]
    print(
        f"targets at {t['length']}: >= 2x faster than RULER: {t['speedup_vs_ruler_at_least_2']}; "
        f"within 1.5x of the lower bound: {t['ratio_to_lower_bound_at_most_1.5']}"
    )


if __name__ == "__main__":
    sys.exit(main())
