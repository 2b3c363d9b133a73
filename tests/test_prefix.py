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
