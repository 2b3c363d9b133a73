"""Throughput on the HF backend: timed prefill and greedy decode over synthetic tokens, and the
peak memory of the timed work."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffbench.api import Throughput, ThroughputRequest
from diffbench.backends.hf_load import HFModel
from diffbench.backends.tokens import check_fits
from diffbench.errors import DiffbenchError


@torch.inference_mode()
def throughput(m: HFModel, requests: Sequence[ThroughputRequest]) -> list[Throughput]:
    """Prefill and greedy-decode rates over a synthetic token sequence, `repeats` timed runs
    each (after `warmup` untimed ones the first time this backend times that shape), with
    the peak memory of the timed runs: this model's weights and buffers plus what the timed
    runs added to the memory in use when they began (PeakMemory), so that other models
    loaded beside this one (an interleaved run) do not count."""
    out = []
    vocab = int(m.model.config.vocab_size)
    tensors = (*m.model.parameters(), *m.model.buffers())
    own_bytes = sum(t.numel() * t.element_size() for t in tensors)
    for r in requests:
        if r.n_tokens < 1 or r.new_tokens < 0 or r.repeats < 1 or r.warmup < 0:
            raise DiffbenchError(
                "a throughput request needs n_tokens >= 1, new_tokens >= 0, repeats >= 1 and "
                f"warmup >= 0, got {r}"
            )
        check_fits(m.info, r.n_tokens + r.new_tokens, "a throughput request")
        gen = torch.Generator().manual_seed(r.n_tokens)
        ids = torch.randint(min(4, vocab - 1), vocab, (1, r.n_tokens), generator=gen)
        ids = ids.to(m.device)
        # One warm-up per shape and loaded model: an interleaved run asks for one repeat at a
        # time, and a resumed one starts cold at whatever repeat is next.
        if (r.n_tokens, r.new_tokens) not in m.warm_shapes:
            for _ in range(r.warmup):
                _timed_pass(m, ids, r.new_tokens)
            m.warm_shapes.add((r.n_tokens, r.new_tokens))
        prefill, decode = [], []
        timed_at = time.time()
        with PeakMemory(m.device) as peak:
            for _ in range(r.repeats):
                t_prefill, t_decode = _timed_pass(m, ids, r.new_tokens)
                prefill.append(r.n_tokens / t_prefill)
                if r.new_tokens:
                    decode.append(r.new_tokens / t_decode)
        out.append(
            Throughput(
                prefill_tokens_per_s=tuple(prefill),
                decode_tokens_per_s=tuple(decode),
                peak_memory_bytes=own_bytes + max(0, peak.peak - peak.base),
                device=peak.describe(),
                timed_at=timed_at,
            )
        )
    return out


def _timed_pass(m: HFModel, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of one prefill of `ids` and of `new_tokens` greedy decode steps after it."""
    sync = torch.cuda.synchronize if m.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step = m.model(ids, use_cache=True, logits_to_keep=1)
    sync()
    t1 = time.perf_counter()
    cache = step.past_key_values
    for _ in range(new_tokens):
        nxt = step.logits[:, -1].argmax(-1, keepdim=True)
        step = m.model(nxt, past_key_values=cache, use_cache=True)
    sync()
    return t1 - t0, time.perf_counter() - t1


class PeakMemory:
    """Peak memory while the block runs. CUDA: torch's peak of allocated bytes on the device
    (`max_memory_allocated`, reset on entry). CPU: the process's peak resident set size, VmHWM
    of /proc/self/status, reset on entry through /proc/self/clear_refs (Linux); where that reset
    is not possible, the process's lifetime peak (getrusage's ru_maxrss). Either way it counts
    the weights and everything else resident; `base` is the same measure on entry."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.peak = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = int(torch.cuda.memory_allocated(self.device))
            self.method = "cuda max_memory_allocated"
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"
        self.base = self._cpu_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = self._cpu_peak()

    def _cpu_peak(self) -> int:
        if self.method == "VmHWM":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def describe(self) -> str:
        """The device and how its peak was measured."""
        return f"{self.device} ({self.method})"
