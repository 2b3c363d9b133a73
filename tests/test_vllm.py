"""The vLLM backend against the HF backend on the shipped tiny-base (Llama) and tiny-diff
(DiffLlama, through the out-of-tree model), on a random-init DIFF V2 (diffbench's own
transformers model against the out-of-tree vLLM one) and on the shipped tiny-diff2 when its folder
exists: the same greedy continuations, the same choices and log-likelihoods within LOGPROB_TOL.
Runs only where vLLM is installed (`make test-vllm`); the default environment skips the whole
module. One engine per model for the module: a vLLM engine takes tens of seconds to start on a
CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import diffbench
import pytest
from conftest import tokenizer_corpus
from diffbench.api import (
    ActivationRequest,
    AttentionRequest,
    ChoiceRequest,
    GenerateRequest,
    RollingRequest,
    ThroughputRequest,
    answers,
)
from diffbench.errors import DiffbenchError
from diffbench.models import ModelSpec
from diffbench.tasks import haystack
from diffbench.tiny import save_random_pair

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` builds .venv-vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from diffbench.backends.hf import HFBackend, encode_choices
from diffbench.backends.vllm.backend import VLLMBackend

SHIPPED = Path(diffbench.__file__).parent / "models"
# float32 on both sides; measured: per-token differences up to ~3e-5 nats at ~1K tokens (vLLM's
# CPU attention kernel against torch's SDPA), so a few-token choice sum stays well inside this.
LOGPROB_TOL = 2e-4


def _random_diff2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init DIFF V2 checkpoint, as conftest's tiny_pair builds its models, with heads of
    32 (vLLM's CPU attention runs head sizes from 32; DiffLlama's call runs 2 x 16)."""
    folder = tmp_path_factory.mktemp("tiny-v2")
    paths = save_random_pair(folder, tokenizer_corpus(), max_context=1024, head_dim=32)
    return str(paths["tiny-diff2"])


def _shipped_diff2() -> str:
    """The shipped tiny-diff2's folder; skips while it is absent or not yet complete."""
    folder = SHIPPED / "tiny-diff2"
    if not (folder / "config.json").exists() or not list(folder.glob("*.safetensors")):
        pytest.skip(f"{folder} is absent (scripts/train_pair.py trains it)")
    return str(folder)


@pytest.fixture(scope="module", params=["tiny-base", "tiny-diff", "random-diff2", "tiny-diff2"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HFBackend, VLLMBackend]]:
    """The same checkpoint on the HF backend and on the vLLM backend (float32): the shipped
    tiny-base and tiny-diff (built-ins), a random-init DIFF V2, the shipped tiny-diff2."""
    name = request.param
    if name == "random-diff2":
        location = _random_diff2(tmp_path_factory)
    elif name == "tiny-diff2":
        location = _shipped_diff2()
    else:
        location = name
    hf = HFBackend.load(ModelSpec(name, location, {"dtype": "float32"}))
    vl = VLLMBackend.load(
        ModelSpec(name, f"vllm:{location}", {"dtype": "float32", "enforce_eager": "true"})
    )
    yield hf, vl
    vl.close()
    hf.close()


def choice_requests() -> list[ChoiceRequest]:
    haystack_text = haystack.procedural_text(7, 2500)
    numbers = (" 1234567.", " 1234568.", " 7654321.", " 12.")
    return [
        ChoiceRequest(haystack_text, "\n" + haystack.ANSWER_PREFIX.format(city=c), numbers, m)
        for c, m in (("Kyoto", "full"), ("Prague", "best"), ("Toronto", "greedy"))
    ] + [
        ChoiceRequest(
            haystack.procedural_text(3, 400), " And then", (" it rained.", " 42"), "full"
        ),
        ChoiceRequest("", "The special magic", (" Kyoto", " Prague number"), "full"),
    ]


def test_greedy_continuations_equal_the_hf_backends(pair):
    hf, vl = pair
    reqs = [
        GenerateRequest(haystack.procedural_text(i, 150 + 60 * i), 32, stop=stop)
        for i in range(6)
        for stop in ([("Toronto", "Prague")] if i % 2 else [(" is:",), ()])
    ]
    assert vl.generate(reqs) == hf.generate(reqs)


def test_choice_loglikelihoods_match_the_hf_backend_within_tolerance(pair):
    hf, vl = pair
    reqs = choice_requests()
    want, got = hf.score_choices(reqs), vl.score_choices(reqs)
    for w, g in zip(want, got, strict=True):
        assert g.chosen == w.chosen
        assert g.n_tokens == w.n_tokens
        for a, b in zip(w.logprobs, g.logprobs, strict=True):
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert abs(a - b) < LOGPROB_TOL


def test_prefix_cached_trie_scoring_equals_prompt_logprob_scoring(pair):
    _, vl = pair
    reqs = [r for r in choice_requests() if r.method == "full"]
    naive = vl._score_naive([encode_choices(vl.tokenizer, r) for r in reqs], ["full"] * len(reqs))
    for a, b in zip(vl.score_choices(reqs), naive, strict=True):
        assert a.chosen == b.chosen
        assert all(
            abs(x - y) < LOGPROB_TOL for x, y in zip(a.logprobs, b.logprobs, strict=True) if x and y
        )


@pytest.mark.parametrize("stride", [0, 300])
def test_rolling_logprobs_match_the_hf_backend_across_windows(pair, stride):
    hf, vl = pair
    # Longer than the models' 1024-token context: several windows.
    reqs = [RollingRequest(haystack.procedural_text(11, 7000), stride), RollingRequest("Hello.")]
    for w, g in zip(hf.rolling_logprobs(reqs), vl.rolling_logprobs(reqs), strict=True):
        assert g.tokens == w.tokens
        assert len(g.logprobs) == len(w.logprobs) == len(w.tokens)
        assert max(abs(a - b) for a, b in zip(w.logprobs, g.logprobs, strict=True)) < LOGPROB_TOL


def test_model_info_names_the_backend_and_the_checkpoint(pair):
    hf, vl = pair
    assert vl.info.backend == "vllm"
    assert vl.info.architecture == hf.info.architecture
    assert vl.info.n_parameters == hf.info.n_parameters
    assert vl.info.fingerprint == hf.info.fingerprint
    assert vl.info.max_context == hf.info.max_context == 1024


def test_prompt_beyond_max_context_is_a_clear_error(pair):
    _, vl = pair
    with pytest.raises(DiffbenchError, match="maximum context of 1024"):
        vl.generate([GenerateRequest(haystack.procedural_text(1, 9000), 8)])


def test_probes_that_need_attention_internals_are_not_answered():
    for kind in (ActivationRequest, AttentionRequest, ThroughputRequest):
        assert not answers(VLLMBackend, kind)
    for kind in (GenerateRequest, ChoiceRequest, RollingRequest):
        assert answers(VLLMBackend, kind)


def test_bad_options_are_refused_before_loading():
    with pytest.raises(DiffbenchError, match="unknown model option 'batch_size'"):
        VLLMBackend.check(ModelSpec("m", "vllm:tiny-base", {"batch_size": "8"}))
    with pytest.raises(DiffbenchError, match="tensor_parallel_size"):
        VLLMBackend.check(ModelSpec("m", "vllm:tiny-base", {"tensor_parallel_size": "x"}))


def test_plugin_registers_both_diff_architectures_and_the_v2_config():
    from diffbench.backends.vllm import plugin
    from transformers import AutoConfig
    from vllm import ModelRegistry

    plugin.register()
    plugin.register()  # vLLM calls it in every process, possibly more than once
    archs = ModelRegistry.get_supported_archs()
    assert {"DiffLlamaForCausalLM", "DiffV2ForCausalLM"} <= set(archs)
    assert type(AutoConfig.for_model("diff_v2")).__name__ == "DiffV2Config"


FRESH_LOAD = """
import sys
from diffbench.backends.vllm.backend import VLLMBackend
from diffbench.models import ModelSpec
options = {"dtype": "float32", "enforce_eager": "true"}
VLLMBackend.load(ModelSpec("v2", "vllm:" + sys.argv[1], options)).close()
print("loaded")
"""


def test_a_v2_checkpoint_loads_on_vllm_in_a_fresh_process(tmp_path_factory):
    # The backend reads config.json through AutoConfig before vLLM (and its plugin) start: the
    # fresh process must know diff_v2 from importing the backend alone.
    res = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, _random_diff2(tmp_path_factory)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "loaded"
