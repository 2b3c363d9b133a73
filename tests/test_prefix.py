"""One KV cache across requests: each distinct prompt token computed once, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from diffbench.backends.prefix import PrefixCache, common_prefix, end_token_ids, greedy
from diffbench.tasks import haystack as hs
from transformers import AutoModelForCausalLM, AutoTokenizer


def _depth_sweep(tok, depths=(0, 25, 50, 75, 100)) -> list[list[int]]:
    """One haystack, the needle moved through it: the NIAH protocol's prompts of one sample."""
    hay = hs.procedural_text(7, 1500)
    needle = " " + hs.NEEDLE.format(city="Geneva", number="4417021") + " "
    city = "Geneva"
    question = f"\n{hs.QUESTION.format(city=city)}\n{hs.ANSWER_PREFIX.format(city=city)}"
    out = []
    for d in depths:
        cut = hay.rfind(" ", 0, len(hay) * d // 100 + 1) if d else 0
        text = hay[:cut] + needle + hay[cut:] + question
        out.append(tok(text)["input_ids"])
    return out


def _trie_size(seqs: list[list[int]]) -> int:
    """Distinct prefixes of a set of token sequences: the tokens a perfect cache computes."""
    return len({tuple(s[:i]) for s in seqs for i in range(1, len(s) + 1)})


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff"])
def test_shared_cache_greedy_equals_unshared_generate(tiny_pair, arch):
    tok = AutoTokenizer.from_pretrained(tiny_pair[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[arch], dtype=torch.float32).eval()
    prompts = _depth_sweep(tok)
    ends = end_token_ids(model, tok)
    cache = PrefixCache(model)
    shared = {}
    for i in sorted(range(len(prompts)), key=lambda i: prompts[i]):
        shared[i], _ = greedy(cache, tok, prompts[i], 12, (), ends)
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0
            )
        assert shared[i] == out[0, len(ids) :].tolist(), f"prompt {i} differs"
    # Prompts in sorted order cost one forward per trie node, plus the decode steps (the last
    # step of each prompt is never fed back).
    decode = sum(len(s) - 1 for s in shared.values())
    assert cache.computed == _trie_size(prompts) + decode
    assert cache.computed < sum(len(p) for p in prompts)


def test_a_prompt_the_cache_already_holds_recomputes_only_its_last_token(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["tiny-base"]).eval()
    cache = PrefixCache(model)
    ids = list(range(5, 60))
    _, first = cache.extend(ids)
    before = cache.computed
    _, again = cache.extend(ids)
    assert cache.computed - before == 1
    torch.testing.assert_close(first, again, rtol=1e-5, atol=1e-5)


def test_common_prefix_of_token_sequences():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[1], [2]]) == 0
    assert common_prefix([]) == 0


def test_choice_requests_without_a_prefix_are_batched_like_any_other():
    from diffbench.api import ChoiceRequest, Item
    from diffbench.runner import _chunks

    items = [Item(str(i), ChoiceRequest("", f"q{i}", (" a", " b")), {}) for i in range(10)]
    assert [len(c) for c in _chunks(items, 4)] == [4, 4, 2]
    shared = [Item(str(i), ChoiceRequest("P", f"q{i}", (" a",)), {}) for i in range(10)]
    assert [len(c) for c in _chunks(shared, 4)] == [10]


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff"])
def test_backend_generation_from_the_shared_cache_equals_unshared_and_batched(tiny_pair, arch):
    from diffbench.api import ChoiceRequest, GenerateRequest
    from diffbench.models import ModelSpec, load_backend

    def backend(**options: str):
        return load_backend(ModelSpec(arch, str(tiny_pair[arch]), options))

    tok = AutoTokenizer.from_pretrained(tiny_pair[arch])
    prompts = [tok.decode(ids) for ids in _depth_sweep(tok, (100, 50, 0, 75, 25))]
    reqs = [GenerateRequest(p, 10, ("magic",)) for p in prompts]
    shared = backend()  # CPU: batch_size auto is one request at a time from the shared cache
    got = shared.generate(reqs)
    computed = shared._prefix.computed
    assert got == backend(prefix_cache="false").generate(reqs)
    assert got == backend(batch_size="8").generate(reqs)
    assert computed < sum(g.n_prompt_tokens for g in got)
    # The score prompts of the same texts reuse what generation left in the cache.
    shared.generate(reqs[:1])
    scores = [ChoiceRequest(prompts[0], "", (" 4417021", " 1234567"))]
    before = shared._prefix.computed
    a, b = shared.score_choices(scores)[0], backend(prefix_cache="false").score_choices(scores)[0]
    assert a.chosen == b.chosen
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert shared._prefix.computed - before <= 1
