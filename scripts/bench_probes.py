"""Benchmark (issue #12): the attention-logit probe's memory and time against a plain forward.

One text of `--tokens` tokens (16K by default) through a tiny checkpoint, measured two ways, each
in its own subprocess so that neither inherits the other's heap:

- `forward`: HFBackend's model as it runs by default (SDPA), one forward pass, logits at the
  last position only.
- `logits`: `HFBackend.activation_stats` asking for `attention_logits`: the same forward through
  diffbench's registered attention function, which computes eager attention in query blocks and
  reduces each block to statistics (streaming top-k, moment sums, |x| histogram).

Memory is the peak resident set during the measured call (VmHWM, reset after the model is loaded
and the input built) minus the resident set at that moment: what the call itself added.
`peak_ratio_logits_vs_forward` divides the two additions (the issue's target: within 2x), and
`peak_ratio_process` the two whole-process peaks. Timings belong here, never in tests.

    .venv/bin/python scripts/bench_probes.py --json docs/bench_probes.json
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


def child(mode: str, model: str, n_tokens: int) -> dict[str, Any]:
    """One measurement in this process: seconds and memory of the call, as JSON-ready values."""
    import torch
    from diffbench.api import ActivationRequest
    from diffbench.backends.hf import HFBackend, HFOptions, LoadTarget, PeakMemory, encode_prompt

    torch.set_num_threads(1)  # the ratio, not the speed: no thread contention in either
    backend = HFBackend(
        "m", model, LoadTarget(model), HFOptions(max_length=max(n_tokens + 8, 2048))
    )
    text = build_text(backend.tokenizer_view(), n_tokens)
    ids = torch.tensor([encode_prompt(backend.tokenizer, text)])
    request = ActivationRequest(text, ("attention_logits",), top_k=100)
    with PeakMemory(backend.device) as peak, torch.inference_mode():
        t0 = time.perf_counter()
        if mode == "forward":
            backend.model(ids, logits_to_keep=1)
        else:
            (stats,) = backend.activation_stats([request])
        seconds = time.perf_counter() - t0
    out = {
        "mode": mode,
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


def measure(mode: str, model: str, n_tokens: int) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--model", model, "--tokens", str(n_tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--model", default=str(ROOT / "bench" / "models" / "tiny-base"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--child", choices=("forward", "logits"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.tokens)))
        return
    forward = measure("forward", args.model, args.tokens)
    logits = measure("logits", args.model, args.tokens)
    model = Path(args.model).resolve()
    result = {
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "n_tokens": forward["n_tokens"],
        "peak_ratio_logits_vs_forward": logits["added_bytes"] / max(1, forward["added_bytes"]),
        "peak_ratio_process": logits["peak_bytes"] / forward["peak_bytes"],
        "time_ratio_logits_vs_forward": logits["seconds"] / forward["seconds"],
        "forward": forward,
        "logits": logits,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
