"""Benchmark (issues #12, #28): the attention-logit probe and logit quantization against a plain
forward, in time and memory.

Per model (tiny-base at 16K tokens and SmolLM2-135M, realistic head sizes, at 8K by default), one
text of that many tokens measured three ways, each in its own subprocess so that none inherits
another's heap:

- `forward`: HFBackend's model as it runs by default (SDPA), one forward pass, logits at the
  last position only.
- `logits`: `HFBackend.activation_stats` asking for `attention_logits`: the same forward (the
  model's SDPA) with diffbench's registered attention function reading QK^T in blocks beside it
  and reducing each block to statistics (streaming top-k, moment sums, |x| histogram).
- `quant`: the forward of a backend loaded with `logit_bits=8`: eager attention in blocks with
  the logits quantized before the softmax (the scoring path of every `logit_bits` run).

Memory is the peak resident set during the measured call (VmHWM, reset after the model is loaded
and the input built) minus the resident set at that moment: what the call itself added.
`peak_ratio_logits_vs_forward` divides the two additions (the issue's target: within 2x), and
`peak_ratio_process` the two whole-process peaks. Timings belong here, never in tests. Threads:
`--threads` (default 1; ratios within one run are what is asked, and one thread keeps them free
of contention), recorded in the JSON.

    .venv/bin/python scripts/bench_probes.py --json docs/bench_probes.json
    .venv/bin/python scripts/bench_probes.py --model tiny-base --tokens 4096   # one quick run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def build_text(tokenizer: Any, n_tokens: int) -> str:
    """Procedural haystack text cut to `n_tokens` tokens (the BOS comes on top)."""
    from diffbench.tasks import haystack

    chars = 6 * n_tokens
    text = haystack.procedural_text(0, chars)
    while tokenizer.count(text) < n_tokens:
        chars *= 2
        text = haystack.procedural_text(0, chars)
    return text[: tokenizer.char_offset(text, n_tokens)]


# (model spec, tokens) measured by default: the shipped tiny Llama and SmolLM2-135M.
RUNS = (("tiny-base", 16384), ("smollm2", 8192))
MODES = ("forward", "logits", "quant")


def child(mode: str, model: str, n_tokens: int, threads: int) -> dict[str, Any]:
    """One measurement in this process: seconds and memory of the call, as JSON-ready values."""
    import torch
    from diffbench.api import ActivationRequest
    from diffbench.backends.hf import HFBackend, HFOptions, PeakMemory, encode_prompt
    from diffbench.models import ModelSpec, resolve_target

    torch.set_num_threads(threads)
    # The tiny checkpoints were trained on 1024 tokens; their RoPE runs past it unchanged.
    options = HFOptions(max_length=max(n_tokens + 8, 2048), logit_bits=8 if mode == "quant" else 16)
    backend = HFBackend("m", model, resolve_target(ModelSpec("m", model)), options)
    text = build_text(backend.tokenizer_view(), n_tokens)
    ids = torch.tensor([encode_prompt(backend.tokenizer, text)])
    request = ActivationRequest(text, ("attention_logits",), top_k=100)
    with PeakMemory(backend.device) as peak, torch.inference_mode():
        t0 = time.perf_counter()
        if mode != "logits":
            backend.model(ids, logits_to_keep=1)
        else:
            (stats,) = backend.activation_stats([request])
        seconds = time.perf_counter() - t0
    out = {
        "mode": mode,
        "threads": torch.get_num_threads(),
        "n_tokens": int(ids.shape[1]),
        "seconds": seconds,
        "rss_before_bytes": peak.base,
        "peak_bytes": peak.peak,
        "added_bytes": peak.peak - peak.base,
        "memory_measure": peak.describe(),
    }
    if mode == "logits":
        out["top1_per_layer"] = [s.top[0] for s in stats.summaries]
    return out


def measure(mode: str, model: str, n_tokens: int, threads: int) -> dict[str, Any]:
    res = subprocess.run(
        [
            *(sys.executable, __file__, "--child", mode, "--model", model),
            *("--tokens", str(n_tokens), "--threads", str(threads)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def model_name(model: str) -> str:
    """A built-in's name, or a folder relative to the repository where it lies inside."""
    path = Path(model).resolve()
    if not Path(model).exists():
        return model
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def run(model: str, n_tokens: int, threads: int) -> dict[str, Any]:
    """The three measurements of one model and their ratios."""
    m = {mode: measure(mode, model, n_tokens, threads) for mode in MODES}
    forward, logits, quant = m["forward"], m["logits"], m["quant"]
    return {
        "model": model_name(model),
        "n_tokens": forward["n_tokens"],
        "threads": threads,
        "peak_ratio_logits_vs_forward": logits["added_bytes"] / max(1, forward["added_bytes"]),
        "peak_ratio_process": logits["peak_bytes"] / forward["peak_bytes"],
        "time_ratio_logits_vs_forward": logits["seconds"] / forward["seconds"],
        "time_ratio_quant_vs_forward": quant["seconds"] / forward["seconds"],
        "peak_ratio_quant_vs_forward": quant["added_bytes"] / max(1, forward["added_bytes"]),
        "logit_bits": 8,
        **m,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--model", help="one model only (built-in name or folder)")
    ap.add_argument("--tokens", type=int, help="its text's length (default 16384)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.tokens, args.threads)))
        return
    runs = [(args.model, args.tokens or 16384)] if args.model else list(RUNS)
    results = [run(model, n, args.threads) for model, n in runs]
    # The first run's keys at the top (as before #28), every run under "models".
    result = {**results[0], "models": {r["model"]: r for r in results}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
