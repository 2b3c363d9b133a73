"""Choice-scoring cost on vLLM (prefix-cached trie vs prompt log-probs) and HF, and parity.

Run in the vLLM environment: `.venv-vllm/bin/python scripts/bench_vllm.py tiny-base tiny-diff`."""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    from diffbench.api import ChoiceRequest, RollingRequest
    from diffbench.backends.hf import HFBackend, encode_choices
    from diffbench.backends.vllm.backend import VLLMBackend
    from diffbench.models import ModelSpec
    from diffbench.tasks import haystack

    out = {}
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", help="built-in names or checkpoint folders")
    parser.add_argument("--json", default="docs/bench_vllm.json", help="where to write results")
    args = parser.parse_args()
    for name in args.models:
        t = time.perf_counter()
        vl = VLLMBackend.load(
            ModelSpec(name, f"vllm:{name}", {"dtype": "float32", "enforce_eager": "true"})
        )
        start = time.perf_counter() - t
        hf = HFBackend.load(ModelSpec(name, name, {"dtype": "float32"}))
        hay = haystack.procedural_text(5, 3000)
        cities = haystack.CITIES
        numbers = (" 1234567.", " 7654321.", " 2345678.", " 8765432.")
        reqs = [
            ChoiceRequest(hay, "\n" + haystack.ANSWER_PREFIX.format(city=c), numbers, "full")
            for c in cities[:16]
        ]
        n_ctx = len(encode_choices(hf.tokenizer, reqs[0]).context)
        enc = [encode_choices(vl.tokenizer, r) for r in reqs]
        vl.score_choices(reqs[:1])
        vl._score_naive(enc[:1], ["full"])  # warm
        res = {
            "engine_start_s": round(start, 1),
            "n_requests": len(reqs),
            "n_choices": 4,
            "context_tokens": n_ctx,
        }
        for label, fn in (
            ("vllm_trie_prefix_cache", lambda vl=vl, reqs=reqs: vl.score_choices(reqs)),
            (
                "vllm_prompt_logprobs",
                lambda vl=vl, enc=enc: vl._score_naive(enc, ["full"] * len(enc)),
            ),
            ("hf_shared_prefix", lambda hf=hf, reqs=reqs: hf.score_choices(reqs)),
        ):
            t = time.perf_counter()
            got = fn()
            res[label + "_s"] = round(time.perf_counter() - t, 3)
            res.setdefault("scores", {})[label] = [g.logprobs for g in got]
        s = res.pop("scores")
        ref = s["hf_shared_prefix"]
        for label in ("vllm_trie_prefix_cache", "vllm_prompt_logprobs"):
            res[label + "_max_abs_vs_hf"] = max(
                abs(a - b)
                for x, y in zip(s[label], ref, strict=True)
                for a, b in zip(x, y, strict=True)
            )
        roll = [RollingRequest(haystack.procedural_text(11, 7000), 300)]
        a, b = hf.rolling_logprobs(roll)[0], vl.rolling_logprobs(roll)[0]
        res["rolling_tokens"] = len(a.tokens)
        res["rolling_max_abs_vs_hf"] = max(
            abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)
        )
        res["rolling_sum_abs_vs_hf"] = abs(sum(a.logprobs) - sum(b.logprobs))
        out[name] = res
        print(name, json.dumps(res), flush=True)
        vl.close()
        hf.close()
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
