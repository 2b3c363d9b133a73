"""Benchmark (issue #5): many-shot ICL label scoring, diffbench against per-pair scoring.

One run, one model, one dataset, one fixed demonstration prompt, scored these ways:

- `diffbench`: the icl task's requests (method `best`) through HFBackend's defaults: the
  demonstrations are encoded once as a KV cache, each query extends it, and the labels are
  searched as a token trie.
- `naive`: the same requests with method `full` through HFBackend(prefix_cache=False): one full
  forward pass per (prompt, label).
- `lmeval`: lm-eval 0.4's HFLM on a multiple-choice task YAML written here, with the same
  demonstrations in the same order (`first_n` sampler) and the same prompt format.
- `lower_bound`: one bare forward pass over every distinct token: the demonstration prefix once
  (kept as a KV cache), then each test query once on top of it (one pass per query, as diffbench
  runs them), logits at its last position only. No label token is ever computed.
- `packed_bound`: the same tokens, but all test queries in one pass (block-diagonal mask): what
  is left when per-pass overhead is gone too.

The icl task's prefix ends in "\n\n", which encodes alone as one token but as two before
"utterance" (as in every demonstration, and in lm-eval's whole-prompt encoding). diffbench encodes
each context with its choices as one text (lm-eval's split) and shares the cache only over the
tokens the contexts really have in common, so it scores the tokens lm-eval scores (issue #10;
before that, a `sep_in_query` variant here measured the 1.1-nat gap the separate encoding cost).

Each method runs in its own subprocess (peak RSS from wait4); wall time covers building the
requests and scoring them, not imports or model loading. A second table varies the number of
labels at fixed shots. Timings belong here, never in tests.

    .venv/bin/python scripts/bench_icl.py --json results/bench_icl.json
    .venv/bin/python scripts/bench_icl.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from _bench import PassCounter, spawn, write_text

DOMAINS: dict[str, tuple[str, ...]] = {
    "flight": ("flight", "plane ticket"),
    "hotel": ("hotel room", "hotel stay"),
    "taxi": ("taxi", "cab"),
    "train": ("train ticket", "rail pass"),
    "table": ("dinner table", "restaurant booking"),
    "concert": ("concert ticket", "gig"),
    "doctor": ("doctor visit", "checkup"),
    "haircut": ("haircut", "barber slot"),
    "car": ("rental car", "hire car"),
    "gym": ("gym class", "yoga session"),
    "delivery": ("food delivery", "takeaway"),
}
# Label pattern ({d}: the domain) -> utterance templates ({n}: a noun for the domain, {t}: a time).
ACTIONS: dict[str, tuple[str, ...]] = {
    "book {d}": ("book a {n} for {t}", "I need a {n} {t}", "get me a {n} please"),
    "cancel {d}": ("cancel my {n}", "call off the {n} for {t}", "I no longer need the {n}"),
    "{d} status": ("is my {n} still on for {t}", "what is the status of my {n}",
                   "any news on my {n}"),
    "change {d}": ("move my {n} to {t}", "can I change the {n}", "switch my {n} to {t}"),
    "pay for {d}": ("pay for the {n}", "charge my card for the {n}", "how do I pay for my {n}"),
    "{d} complaint": ("the {n} was terrible", "I want to complain about the {n}",
                      "my {n} was a mess"),
    "{d} refund": ("refund my {n}", "I want my money back for the {n}",
                   "give me a refund on the {n}"),
}  # fmt: skip
TIMES = ("friday", "tonight", "monday", "noon", "next week", "tomorrow")
# The headline's methods, in run order.
METHODS = ("diffbench", "lower_bound", "packed_bound", "naive", "lmeval")


# ---- data -------------------------------------------------------------------------------------


def all_labels() -> list[str]:
    """The 77 labels: every action pattern for every domain."""
    return [pattern.format(d=d) for d in DOMAINS for pattern in ACTIONS]


def label_subset(n: int, seed: int) -> list[str]:
    """The first `n` labels of one seeded order, so smaller label sets nest in larger ones."""
    labels = all_labels()
    random.Random(f"bench-icl-labels|{seed}").shuffle(labels)
    return sorted(labels[:n])


def generate_rows(labels: list[str], per_class: int, seed: int) -> list[dict[str, Any]]:
    """Up to `per_class` seeded, distinct utterances for each label, as JSONL rows (id, text,
    label).

    Drawn without replacement from every utterance the label's templates make (6 to 26 of them),
    so no text repeats: the icl task drops repeated texts, and a test text is never a
    demonstration."""
    rng = random.Random(f"bench-icl-data|{seed}")
    by_label = {pattern.format(d=d): (pattern, d) for d in DOMAINS for pattern in ACTIONS}
    rows = []
    for label in labels:
        pattern, domain = by_label[label]
        texts = sorted(
            {
                template.replace("{n}", noun).replace("{t}", when)
                for template in ACTIONS[pattern]
                for noun in DOMAINS[domain]
                for when in TIMES
            }
        )
        rows += [{"text": t, "label": label} for t in rng.sample(texts, min(per_class, len(texts)))]
    rng.shuffle(rows)
    return [{"id": i, **row} for i, row in enumerate(rows)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write JSON Lines atomically."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---- the plan: one dataset, one prompt, the test queries -------------------------------------


@dataclass(frozen=True)
class Plan:
    """What every method of one label count scores: files, prompt, test examples, labels."""

    n_labels: int
    dataset: str  # the JSONL the icl task reads
    shots: int
    test_size: int
    seed: int
    prefix: str  # the demonstrations, joined and followed by the separator
    demos: list[dict[str, Any]]
    tests: list[dict[str, Any]]  # text, label, gold (index into labels), in the task's order
    labels: list[str]
    queries: list[str]
    n_prefix_tokens: int
    n_query_tokens: int  # summed over the test queries
    n_label_tokens: list[int]
    boundary_mismatches: int  # queries whose tokens differ from tokenizing prefix + query whole
    # (request, label) pairs whose tokens from tokens.encode_choices (the context's tail encoded
    # with each label) differ from lm-eval's split (context + label encoded whole): must be 0
    split_mismatches: int = 0


def icl_config(dataset: str, shots: int, test_size: int) -> Any:
    """The icl task config of this benchmark: one fixed demonstration set in one random order."""
    from diffbench.tasks.icl import IclConfig

    return IclConfig(
        dataset=dataset, shots=(shots,), draws=1, orders=1, arrangements=("random",),
        test_size=test_size, answer="likelihood",
    )  # fmt: skip


def build_plan(n_labels: int, data_dir: Path, args: argparse.Namespace, tokenizer: Any) -> Plan:
    """Write the dataset for `n_labels` labels and read the prompt back from the icl task."""
    from diffbench.backends.hf import HFTokenizerView, encode_prompt
    from diffbench.tasks.icl import TASK

    labels = label_subset(n_labels, args.seed)
    data = data_dir / f"intents_{n_labels}.jsonl"
    write_jsonl(data, generate_rows(labels, args.per_class, args.seed))
    view = HFTokenizerView(tokenizer, max_context=8192, chat=False)
    items = TASK.items(icl_config(str(data), args.shots, args.test_size), view, args.seed)
    requests = [it.request for it in items]
    prefix = requests[0].prefix
    if any(r.prefix != prefix for r in requests):
        raise SystemExit("bench_icl: the icl task built more than one prompt")
    if any(c != " " + lab for c, lab in zip(requests[0].choices, labels, strict=True)):
        raise SystemExit("bench_icl: a label is a prefix of another; choices would differ")
    demos = []
    for block in prefix.split("\n\n")[:-1]:
        text, label = block.removeprefix("utterance: ").split("\nintent: ")
        demos.append({"id": len(demos), "text": text, "label": label})
    if (
        len(demos) != args.shots
        or "".join(f"utterance: {d['text']}\nintent: {d['label']}\n\n" for d in demos) != prefix
    ):
        raise SystemExit("bench_icl: cannot read the demonstrations back from the prompt")
    tests = [
        {"id": 10_000 + i, "text": it.meta["text"], "label": it.meta["target"],
         "gold": it.meta["target_index"]}
        for i, it in enumerate(items)
    ]  # fmt: skip
    prefix_ids = encode_prompt(tokenizer, prefix)
    query_ids = [tokenizer(r.query, add_special_tokens=False)["input_ids"] for r in requests]
    mismatches = sum(
        prefix_ids + q != encode_prompt(tokenizer, prefix + r.query)
        for q, r in zip(query_ids, requests, strict=True)
    )
    split = sum(lmeval_split_mismatches(tokenizer, r) for r in requests)
    if split:
        raise SystemExit(f"bench_icl: {split} (query, label) pairs split unlike lm-eval")
    return Plan(
        n_labels=n_labels, dataset=str(data), shots=args.shots, test_size=len(tests),
        seed=args.seed, prefix=prefix, demos=demos, tests=tests, labels=labels,
        queries=[r.query for r in requests], n_prefix_tokens=len(prefix_ids),
        n_query_tokens=sum(len(q) for q in query_ids),
        n_label_tokens=[len(tokenizer(c, add_special_tokens=False)["input_ids"])
                        for c in requests[0].choices],
        boundary_mismatches=int(mismatches), split_mismatches=split,
    )  # fmt: skip


def lmeval_split_mismatches(tokenizer: Any, r: Any) -> int:
    """Choices whose (context, continuation) tokens from diffbench differ from lm-eval's
    `_encode_pair`: trailing whitespace moved to the choice, context + choice encoded whole,
    the continuation what follows the context's own token count."""
    from diffbench.backends.hf import encode_choices, encode_prompt

    got = encode_choices(tokenizer, r)
    context = r.prefix + r.query
    stripped = context.rstrip()
    moved = context[len(stripped) :]
    ctx = encode_prompt(tokenizer, stripped)
    if got.context != ctx:
        return len(r.choices)
    return sum(
        encode_prompt(tokenizer, stripped + moved + c)[len(ctx) :] != cont
        for c, cont in zip(r.choices, got.choices, strict=True)
    )


def write_lmeval_task(plan: Plan, out_dir: Path) -> str:
    """A multiple-choice task YAML over the plan's demonstrations and tests; returns its name."""
    import yaml

    name = f"bench_icl_{plan.n_labels}"
    out_dir.mkdir(parents=True, exist_ok=True)
    fewshot, test = out_dir / f"{name}_fewshot.jsonl", out_dir / f"{name}_test.jsonl"
    labels = plan.labels
    write_jsonl(fewshot, [{**d, "gold": labels.index(d["label"])} for d in plan.demos])
    write_jsonl(test, plan.tests)
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"fewshot": str(fewshot), "test": str(test)}},
        "test_split": "test",
        "fewshot_split": "fewshot",
        "num_fewshot": plan.shots,
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "doc_to_text": "utterance: {{text}}\nintent:",
        "doc_to_target": "gold",
        "doc_to_choice": labels,
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    write_text(out_dir / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
    return name


# ---- the model --------------------------------------------------------------------------------


def model_folder(spec: str, cache_root: Path) -> Path:
    """A safetensors folder for `spec`; a GGUF checkpoint is converted once and cached, so
    diffbench and lm-eval load the very same float32 weights."""
    from diffbench.models import ModelSpec, resolve_target

    target = resolve_target(ModelSpec("bench", spec))
    if not target.gguf_file:
        return Path(target.path)
    gguf = Path(target.path) / target.gguf_file
    folder = cache_root / f"{gguf.stem}-{gguf.stat().st_size}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors in {folder} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(target.path, gguf_file=target.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(
        target.path, gguf_file=target.gguf_file, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):  # a GGUF-quantized model refuses to serialise
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=cache_root))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


# ---- workers: one method, one process ---------------------------------------------------------


@dataclass(frozen=True)
class Job:
    method: str
    model: str
    plan: str  # path of the plan JSON
    limit: int  # score only the first `limit` test examples (0: all)
    lmeval_dir: str = ""
    lmeval_task: str = ""
    lmeval_batch_size: int = 1
    threads: int = 0  # torch threads (0: torch's default)


def run_worker(job: Job) -> dict[str, Any]:
    """Run one method on one plan; wall time excludes imports and model loading."""
    plan = Plan(**json.loads(Path(job.plan).read_text()))
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    if job.method == "lmeval":
        return _worker_lmeval(job, plan)
    from diffbench.backends.hf import HFBackend, HFOptions, LoadTarget
    from diffbench.tasks.icl import TASK

    options = HFOptions(prefix_cache=job.method != "naive")
    backend = HFBackend("bench", job.model, LoadTarget(job.model), options)
    counter = PassCounter(backend.model)
    cfg = icl_config(plan.dataset, plan.shots, plan.test_size)
    if job.method in ("lower_bound", "packed_bound"):
        packed = job.method == "packed_bound"
        return _worker_lower_bound(backend, counter, plan, cfg, job.limit, packed)
    start = time.perf_counter()
    items = TASK.items(cfg, backend.tokenizer_view(), plan.seed)
    items = items[: job.limit or len(items)]
    method = "full" if job.method == "naive" else "best"
    requests = [replace(it.request, method=method) for it in items]
    scores = backend.score_choices(requests)
    samples = [TASK.score(cfg, it, s) for it, s in zip(items, scores, strict=True)]
    seconds = time.perf_counter() - start
    if [r.prefix + r.query for r in requests] != [plan.prefix + q for q in plan.queries][
        : len(items)
    ]:
        raise SystemExit(f"bench_icl: {job.method} saw other prompts than the plan's")
    return {
        "seconds": seconds,
        "n_examples": len(items),
        "accuracy": sum(s["score"] for s in samples) / len(samples),
        "predictions": [s["output"] for s in samples],
        "logprobs": [list(s.logprobs) for s in scores],
        "passes": counter.passes,
        "tokens": counter.tokens,
    }


def _worker_lower_bound(
    backend: Any, counter: PassCounter, plan: Plan, cfg: Any, limit: int, packed: bool
) -> dict[str, Any]:
    import torch
    from diffbench.backends.hf import encode_prompt
    from diffbench.tasks.icl import TASK

    items = TASK.items(cfg, backend.tokenizer_view(), plan.seed)[: limit or None]
    tok, model = backend.tokenizer, backend.model
    prefix = encode_prompt(tok, plan.prefix)
    queries = [tok(it.request.query, add_special_tokens=False)["input_ids"] for it in items]
    start = time.perf_counter()
    with torch.inference_mode():
        cache = model(torch.tensor([prefix]), use_cache=True, logits_to_keep=1).past_key_values
        if packed:
            _packed_pass(model, cache, len(prefix), queries)
        else:
            for q in queries:
                model(torch.tensor([q]), past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache.crop(len(prefix) - cache.get_seq_length())
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "n_examples": len(items),
        "accuracy": None,
        "predictions": [],
        "logprobs": [],
        "passes": counter.passes,
        "tokens": counter.tokens,
    }


def _packed_pass(model: Any, cache: Any, n_prefix: int, queries: list[list[int]]) -> None:
    """Every query in one pass over the cached prefix; a block-diagonal causal mask keeps each
    query to the prefix and its own earlier tokens, and positions restart after the prefix."""
    import torch

    n = sum(len(q) for q in queries)
    mask = torch.full((n, n_prefix + n), torch.finfo(model.dtype).min, dtype=model.dtype)
    mask[:, :n_prefix] = 0
    positions, last, at = [], [], 0
    for q in queries:
        block = torch.ones(len(q), len(q), dtype=torch.bool).tril()
        cols = mask[at : at + len(q), n_prefix + at : n_prefix + at + len(q)]
        cols.masked_fill_(block, 0)
        positions += range(n_prefix, n_prefix + len(q))
        at += len(q)
        last.append(at - 1)
    model(
        torch.tensor([[t for q in queries for t in q]]),
        past_key_values=cache,
        attention_mask=mask[None, None],
        position_ids=torch.tensor([positions]),
        use_cache=True,
        logits_to_keep=torch.tensor(last),
    )
    cache.crop(n_prefix - cache.get_seq_length())


def _worker_lmeval(job: Job, plan: Plan) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=job.model, device="cpu", dtype="float32", batch_size=job.lmeval_batch_size)
    counter = PassCounter(lm.model)
    manager = TaskManager(include_path=job.lmeval_dir)  # indexes every lm-eval task: not timed
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm, tasks=[job.lmeval_task], task_manager=manager, limit=job.limit or None,
        bootstrap_iters=0, log_samples=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert out is not None
    samples = sorted(out["samples"][job.lmeval_task], key=lambda s: s["doc_id"])
    predictions, logprobs, correct, same_prompts = [], [], 0, True
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        logprobs.append(lls)
        best = max(range(len(lls)), key=lambda i: (lls[i], -i))
        predictions.append(plan.labels[best])
        correct += best == s["doc"]["gold"]
        expected = plan.prefix + plan.queries[s["doc_id"]]
        same_prompts &= [tuple(a) for a in s["arguments"]] == [
            (expected, " " + lab) for lab in plan.labels
        ]
    return {
        "seconds": seconds,
        "n_examples": len(samples),
        "accuracy": correct / len(samples),
        "accuracy_reported": out["results"][job.lmeval_task]["acc,none"],
        "predictions": predictions,
        "logprobs": logprobs,
        "passes": counter.passes,
        "tokens": counter.tokens,
        "prompts_identical": same_prompts,
    }


# ---- the run ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="built-in name, folder, .gguf or hub id")
    p.add_argument("--shots", type=int, default=32)
    p.add_argument("--labels", type=int, default=18, help="labels of the headline table")
    p.add_argument("--sweep-labels", default="6,18,77", help="label counts of the second table")
    p.add_argument("--sweep-methods", default="diffbench,naive", help="methods of the sweep")
    p.add_argument("--test-size", type=int, default=20, help="fixed test examples")
    p.add_argument(
        "--naive-test-size", type=int, default=4,
        help="the first N test examples for naive in the headline (0: all); ratios are per example",
    )  # fmt: skip
    p.add_argument(
        "--sweep-slow-test-size", type=int, default=1,
        help="test examples for naive and lm-eval in the label sweep (0: all)",
    )  # fmt: skip
    p.add_argument("--per-class", type=int, default=12, help="generated examples per label")
    p.add_argument("--lmeval-batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: 8 shots, 4 tests")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--workdir", type=Path, help="keep data, task YAMLs and worker logs here")
    p.add_argument(
        "--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "diffbench-bench-icl",
        help="where a GGUF checkpoint is converted to safetensors (reused across runs)",
    )  # fmt: skip
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.shots, args.test_size, args.naive_test_size, args.sweep_slow_test_size = 8, 4, 2, 1
    sweep = [int(x) for x in args.sweep_labels.split(",") if x.strip()]
    methods = [m.strip() for m in args.sweep_methods.split(",") if m.strip()]
    n_max = len(all_labels())
    if not all(2 <= n <= n_max for n in [args.labels, *sweep]):
        p.error(f"label counts must lie between 2 and {n_max}")
    if set(methods) - {"diffbench", "naive", "lmeval"} or "diffbench" not in methods:
        p.error("--sweep-methods: diffbench plus any of naive, lmeval")
    if args.shots < 1 or args.test_size < 1 or args.per_class < 2:
        p.error("--shots and --test-size must be >= 1, --per-class >= 2")
    pool = min(args.labels, *sweep) * args.per_class  # rows of the smallest dataset
    if pool // 2 < args.test_size or pool - args.test_size < args.shots:
        p.error("too few generated examples for these shots and tests: raise --per-class")
    args.sweep = sweep
    args.methods = methods
    return args


def per_example(r: dict[str, Any]) -> float:
    """Seconds per test example."""
    return float(r["seconds"]) / int(r["n_examples"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(Job(**json.loads(args.worker.read_text())))
        write_text(args.worker_out, json.dumps(result))
        return 0
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-icl-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        args.model_cache.mkdir(parents=True, exist_ok=True)
        folder = model_folder(args.model, args.model_cache)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        counts = sorted({args.labels, *args.sweep})
        plans = {n: build_plan(n, work, args, tokenizer) for n in counts}
        plan_files = {}
        for n, plan in plans.items():
            plan_files[n] = work / f"plan_{n}.json"
            write_text(plan_files[n], json.dumps(asdict(plan)))

        def run(method: str, n: int, limit: int = 0) -> dict[str, Any]:
            job = Job(method, str(folder), str(plan_files[n]), limit, str(work / "lmeval"),
                      lmeval_batch_size=args.lmeval_batch_size, threads=args.threads)  # fmt: skip
            if method == "lmeval":
                job = replace(job, lmeval_task=write_lmeval_task(plans[n], work / "lmeval"))
            print(f"running {method} on {n} labels ...", file=sys.stderr, flush=True)
            stem = f"{job.method}_{Path(job.plan).stem}"
            result = spawn(__file__, asdict(job), work, stem, job.threads)
            print(f"  {result['seconds']:.1f} s", file=sys.stderr, flush=True)
            return result

        head = {m: run(m, args.labels, args.naive_test_size if m == "naive" else 0)
                for m in METHODS}  # fmt: skip
        sweep: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
        for n in args.sweep:
            for m in args.methods:
                if (
                    n == args.labels
                    and m in head
                    and head[m]["n_examples"]
                    >= (args.sweep_slow_test_size if m != "diffbench" else args.test_size)
                ):
                    sweep[m][n] = head[m]
                    continue
                sweep[m][n] = run(m, n, 0 if m == "diffbench" else args.sweep_slow_test_size)
    report = summarise(args, plans, head, sweep)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def summarise(
    args: argparse.Namespace,
    plans: dict[int, Plan],
    head: dict[str, dict[str, Any]],
    sweep: dict[str, dict[int, dict[str, Any]]],
) -> dict[str, Any]:
    """All figures of the run, as the JSON file holds them."""
    plan = plans[args.labels]
    d, naive, lm, lb = (head[m] for m in ("diffbench", "naive", "lmeval", "lower_bound"))
    t_d = per_example(d)

    def agreement(r: dict[str, Any], ref: dict[str, Any] = d) -> float:
        pairs = list(zip(ref["predictions"], r["predictions"], strict=False))
        return sum(a == b for a, b in pairs) / len(pairs)

    def logprob_gap(r: dict[str, Any], ref: dict[str, Any] = d) -> float:
        """Largest |difference| between two methods' log-likelihoods of the same label."""
        gaps = [
            abs(x - y)
            for row_a, row_b in zip(ref["logprobs"], r["logprobs"], strict=False)
            for x, y in zip(row_a, row_b, strict=True)
            if x is not None and y is not None
        ]
        return max(gaps, default=float("nan"))

    figures = {
        "speedup_vs_lmeval": per_example(lm) / t_d,
        "speedup_vs_naive": per_example(naive) / t_d,
        "ratio_to_lower_bound": d["seconds"] / lb["seconds"],
        "ratio_to_packed_bound": d["seconds"] / head["packed_bound"]["seconds"],
        "memory_ratio_lmeval_to_diffbench": lm["peak_rss_mib"] / d["peak_rss_mib"],
        "accuracy_diffbench": d["accuracy"],
        "accuracy_naive": naive["accuracy"],
        "accuracy_lmeval": lm["accuracy"],
        "agreement_naive": agreement(naive),
        "agreement_lmeval": agreement(lm),
        "lmeval_prompts_identical": lm["prompts_identical"],
        "max_logprob_gap_naive": logprob_gap(naive),
        "max_logprob_gap_lmeval": logprob_gap(lm),
    }
    growth = {}
    for m, rows in sweep.items():
        lo, hi = min(rows), max(rows)
        growth[m] = per_example(rows[hi]) / per_example(rows[lo])
    if min(args.sweep) == 6 and max(args.sweep) == 77:
        figures["label_growth_6_to_77"] = growth["diffbench"]
    return {
        **figures,
        "label_growth": growth,
        "setting": {
            "model": args.model, "shots": args.shots, "labels": args.labels,
            "test_size": plan.test_size, "seed": args.seed, "quick": args.quick,
            "prefix_tokens": plan.n_prefix_tokens,
            "query_tokens": plan.n_query_tokens,
            "label_tokens": plan.n_label_tokens,
            "lower_bound_tokens": plan.n_prefix_tokens + plan.n_query_tokens,
            "queries_tokenized_unlike_whole_prompt": plan.boundary_mismatches,
            "labels_split_unlike_lmeval": sum(p.split_mismatches for p in plans.values()),
            "lmeval_batch_size": args.lmeval_batch_size, "cpu_count": os.cpu_count(),
            "torch_threads": args.threads or _torch_threads(),
        },
        "methods": {m: {k: v for k, v in r.items() if k not in HEAVY} | {
            "seconds_per_example": per_example(r)} for m, r in head.items()},
        "label_sweep": {m: {str(n): {k: v for k, v in r.items() if k not in HEAVY} | {
            "seconds_per_example": per_example(r)} for n, r in rows.items()}
            for m, rows in sweep.items()},
    }  # fmt: skip


HEAVY = ("predictions", "logprobs")  # per-example lists, left out of the JSON


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def print_report(rep: dict[str, Any]) -> None:
    """The two tables and the ratios, as plain text."""
    s = rep["setting"]
    print(
        f"\nICL label scoring: {s['model']}, {s['shots']} shots, {s['labels']} labels, "
        f"{s['test_size']} test examples; prompt {s['prefix_tokens']} tokens, "
        f"{s['cpu_count']} CPUs"
    )
    head = f"{'method':<12}{'n':>4}{'wall s':>9}{'s/example':>11}{'process s':>11}"
    print(head + f"{'peak MiB':>10}{'accuracy':>10}{'passes':>8}{'tokens':>9}")
    for m, r in rep["methods"].items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(
            f"{m:<12}{r['n_examples']:>4}{r['seconds']:>9.2f}{r['seconds_per_example']:>11.3f}"
            f"{r['process_seconds']:>11.1f}{r['peak_rss_mib']:>10.0f}{acc:>10}"
            f"{r['passes']:>8}{r['tokens']:>9}"
        )
    print(
        f"speedup vs lm-eval {rep['speedup_vs_lmeval']:.1f}x, vs naive "
        f"{rep['speedup_vs_naive']:.1f}x (per test example); diffbench / lower bound "
        f"{rep['ratio_to_lower_bound']:.2f}x (packed bound {rep['ratio_to_packed_bound']:.2f}x); "
        "lm-eval / diffbench peak memory "
        f"{rep['memory_ratio_lmeval_to_diffbench']:.2f}x"
    )
    print(
        f"predictions agree with naive {rep['agreement_naive']:.3f}, with lm-eval "
        f"{rep['agreement_lmeval']:.3f}; lm-eval prompts identical: "
        f"{rep['lmeval_prompts_identical']}"
    )
    print(
        f"largest |log-likelihood gap| of diffbench to naive {rep['max_logprob_gap_naive']:.2e}, "
        f"to lm-eval {rep['max_logprob_gap_lmeval']:.2e}"
    )
    print(f"\nLabel sweep ({s['shots']} shots): seconds per test example (n examples)")
    sweep = rep["label_sweep"]
    counts = sorted({int(n) for rows in sweep.values() for n in rows})
    print(f"{'method':<12}" + "".join(f"{f'{n} labels':>18}" for n in counts) + f"{'growth':>9}")
    for m, rows in sweep.items():
        cells = "".join(
            f"{rows[str(n)]['seconds_per_example']:>11.3f} ({rows[str(n)]['n_examples']:>3})"
            for n in counts
        )
        print(f"{m:<12}{cells:>{18 * len(counts)}}{rep['label_growth'][m]:>8.2f}x")


if __name__ == "__main__":
    sys.exit(main())
