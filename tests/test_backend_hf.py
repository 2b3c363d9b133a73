"""The HF backend on real tiny checkpoints: shared-prefix scoring equals naive scoring, etc."""

from __future__ import annotations

from pathlib import Path

import diffbench
import pytest
import torch
from diffbench.api import ChoiceRequest, GenerateRequest, RollingRequest
from diffbench.backends import hf_score
from diffbench.backends.hf import HFBackend, HFOptions, LoadTarget, encode_choices, encode_prompt
from diffbench.backends.trie import ROOT, ChoiceTrie
from diffbench.errors import DiffbenchError
from diffbench.tasks import haystack


def backend(path, **options) -> HFBackend:
    return HFBackend("m", str(path), LoadTarget(str(path)), HFOptions(**options))


def requests() -> list[ChoiceRequest]:
    demos = haystack.procedural_text(3, 600)
    other = haystack.procedural_text(4, 300)
    labels = (" red", " green apple", " blue sky today", " 1234567")
    return [
        ChoiceRequest(demos, "\nQuestion: what colour?\nAnswer:", labels),
        ChoiceRequest(demos, "\nQuestion: which one?\nAnswer:", labels[:2]),
        ChoiceRequest(demos, "", labels),  # no query: choices follow the prefix directly
        ChoiceRequest(other, " And then", (" it rained.", " 42")),
    ]


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_shared_scoring_equals_naive_full_sequence_scoring(tiny_pair, arch, attn):
    shared = backend(tiny_pair[arch], attn_implementation=attn).score_choices(requests())
    naive = backend(tiny_pair[arch], attn_implementation=attn, prefix_cache=False).score_choices(
        requests()
    )
    assert len(shared) == len(naive) == 4
    for s, n in zip(shared, naive, strict=True):
        assert s.n_tokens == n.n_tokens
        assert s.chosen == n.chosen
        for x, y in zip(s.logprobs, n.logprobs, strict=True):
            assert x is not None and y is not None
            assert abs(x - y) < 1e-4, (x, y)
            assert x < 0


def label_requests(method: str) -> list[ChoiceRequest]:
    demos = "\n\n".join(
        f"utterance: {haystack.procedural_text(i, 80)}\nintent: {lab}"
        for i, lab in enumerate(["pay bill", "pay rent", "play song", "book table"] * 3)
    )
    labels = (" pay bill", " pay rent", " play song", " play video", " book table", " book taxi")
    return [
        ChoiceRequest(
            demos + "\n\n",
            f"utterance: {haystack.procedural_text(50 + i, 60)}\nintent:",
            labels,
            method=method,
        )  # type: ignore[arg-type]
        for i in range(6)
    ]


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff"])
@pytest.mark.parametrize("method", ["best", "greedy"])
def test_pruned_and_greedy_searches_agree_with_naive_scoring(tiny_pair, arch, method):
    shared = backend(tiny_pair[arch]).score_choices(label_requests(method))
    naive = backend(tiny_pair[arch], prefix_cache=False).score_choices(label_requests(method))
    full = backend(tiny_pair[arch], prefix_cache=False).score_choices(label_requests("full"))
    for s, n, f in zip(shared, naive, full, strict=True):
        assert s.chosen == n.chosen
        for x, y in zip(s.logprobs, n.logprobs, strict=True):
            assert (x is None) == (y is None)
            assert x is None or abs(x - y) < 1e-4
        if method == "best":  # exact argmax of the full log-likelihoods
            assert s.chosen == f.chosen
            assert abs(s.logprobs[s.chosen] - f.logprobs[f.chosen]) < 1e-4


@pytest.mark.parametrize("method", ["best", "greedy", "full"])
def test_trie_nodes_in_the_query_pass_save_passes_and_change_nothing(
    tiny_pair, method, monkeypatch
):
    def scored(ahead: bool) -> tuple[list, int]:
        if not ahead:
            monkeypatch.setattr(hf_score, "lookahead", lambda trie, method: [])
        b = backend(tiny_pair["tiny-diff"])
        passes = []
        b.model.register_forward_pre_hook(lambda *_: passes.append(1))
        return b.score_choices(label_requests(method)), len(passes)

    with_, n_with = scored(True)
    without, n_without = scored(False)
    assert [s.chosen for s in with_] == [s.chosen for s in without]
    for w, wo in zip(with_, without, strict=True):
        assert [x is None for x in w.logprobs] == [x is None for x in wo.logprobs]
        pairs = zip(w.logprobs, wo.logprobs, strict=True)
        assert all(x is None or abs(x - y) < 1e-4 for x, y in pairs)
    assert n_with < n_without


def test_the_lookahead_takes_what_each_search_expands_next():
    # Labels of 2-3 tokens under two first tokens, plus one of one token in the second trie.
    two = ChoiceTrie([[5, 1], [5, 2], [6, 1, 3], [6, 1, 4], [7, 2]])
    internal = [i for i in range(1, len(two.nodes)) if two.nodes[i].children]
    first = [i for i in internal if two.nodes[i].parent == ROOT]
    assert hf_score.lookahead(two, "full") == internal
    assert hf_score.lookahead(two, "greedy") == first
    assert hf_score.lookahead(two, "best") == internal  # within LOOKAHEAD_MAX: all of it
    one = ChoiceTrie([[9]] + [[k, j] for k in range(10, 50) for j in (1, 2)])
    # A one-token choice bounds the search: speculation stops at LOOKAHEAD_MAX nodes.
    assert len(hf_score.lookahead(one, "best")) == hf_score.LOOKAHEAD_MAX
    no_single = ChoiceTrie([[k, j] for k in range(10, 50) for j in (1, 2)])
    # Without one, every first-level node is expanded next: all 40 ride along.
    assert len(hf_score.lookahead(no_single, "best")) == 40
    assert hf_score.lookahead(no_single, "greedy") == []


def test_best_first_search_leaves_unpromising_labels_uncomputed(tiny_pair):
    scores = backend(tiny_pair["tiny-base"]).score_choices(label_requests("best"))
    assert any(None in s.logprobs for s in scores)


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff"])
def test_greedy_generation_does_not_depend_on_batch_size(tiny_pair, arch):
    reqs = [
        GenerateRequest(haystack.procedural_text(i, 200 + 150 * i), 12, stop=("\n",))
        for i in range(5)
    ]
    one = backend(tiny_pair[arch], batch_size="1").generate(reqs)
    many = backend(tiny_pair[arch], batch_size="8").generate(reqs)
    assert [g.text for g in one] == [g.text for g in many]
    assert [g.n_prompt_tokens for g in one] == [g.n_prompt_tokens for g in many]
    assert all(0 < g.n_new_tokens <= 12 for g in one)
    assert all("\n" not in g.text for g in one)


def test_model_info_records_identity(tiny_pair):
    b = backend(tiny_pair["tiny-diff"])
    assert b.info.architecture == "DiffLlamaForCausalLM"
    assert b.info.n_parameters > 100_000
    assert b.info.max_context == 1024
    assert b.info.dtype == "float32"
    weights, tokenizer = b.info.fingerprint.split(";")
    assert weights.startswith("sha256:") and len(weights) == len("sha256:") + 64
    assert tokenizer.startswith("tokenizer:") and len(tokenizer) == len("tokenizer:") + 64
    assert not b.info.has_chat_template


def test_prompt_beyond_max_context_is_a_clear_error(tiny_pair):
    b = backend(tiny_pair["tiny-base"], max_length=64)
    long_prompt = haystack.procedural_text(0, 2000)
    with pytest.raises(DiffbenchError, match=r"beyond model 'm'.s maximum context of 64"):
        b.generate([GenerateRequest(long_prompt, 4)])
    with pytest.raises(DiffbenchError, match="maximum context"):
        b.score_choices([ChoiceRequest(long_prompt, "", (" a",))])


def test_tokenizer_view_budgets_in_the_models_own_tokens(tiny_pair):
    view = backend(tiny_pair["tiny-base"]).tokenizer_view()
    text = haystack.procedural_text(1, 1000)
    n = view.count(text)
    cut = view.char_offset(text, n // 2)
    assert 0 < cut < len(text)
    assert abs(view.count(text[:cut]) - n // 2) <= 1
    # BOS is added once, at the start, and never inside the prompt text.
    assert view.prompt_tokens("hello") == view.count("hello") + 1
    assert view.render("question", "Answer:") == "question\nAnswer:"


SHIPPED = Path(diffbench.__file__).parent / "models"


def test_each_generation_request_stops_at_its_own_stop_strings_in_a_mixed_batch():
    # The shipped base model writes "The special magic X number is: N." runs; one request stops
    # at a city name, its batch neighbour at " is:". Batched, neither may stop at the other's.
    reqs = [
        GenerateRequest(haystack.procedural_text(i, 200 + 40 * i), 40, stop=stop)
        for i in range(8)
        for stop in ([("Toronto", "Prague")] if i % 2 else [(" is:",)])
    ]
    one = backend(SHIPPED / "tiny-base", batch_size="1").generate(reqs)
    eight = backend(SHIPPED / "tiny-base", batch_size="8").generate(reqs)
    assert [g.text for g in eight] == [g.text for g in one]
    assert [g.n_new_tokens for g in eight] == [g.n_new_tokens for g in one]
    # The test can tell: some request's own output runs past the other requests' stop string.
    assert any(" is:" in g.text for g in one)
    assert all(not any(s in g.text for s in r.stop) for g, r in zip(one, reqs, strict=True))


def reference_logprob(b: HFBackend, context: str, choice: str) -> float:
    """lm-eval's split: trailing whitespace joins the choice, the whole text is encoded at once,
    and the choice's tokens follow the context's own token count; one plain forward pass."""
    stripped = context.rstrip()
    cont = context[len(stripped) :] + choice
    ctx = encode_prompt(b.tokenizer, stripped)
    whole = encode_prompt(b.tokenizer, stripped + cont)
    ids = ctx + whole[len(ctx) :]
    with torch.inference_mode():
        logits = b.model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return float(sum(lp[k - 1, ids[k]] for k in range(len(ctx), len(ids))))


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_choices_are_scored_on_the_whole_prompts_natural_tokens(tiny_pair, prefix_cache):
    # The same context cut into prefix and query in different places, one cut after a space
    # and one after a blank line: the scores must be those of the natural whole-text encoding.
    b = backend(tiny_pair["tiny-base"], prefix_cache=prefix_cache)
    demos = haystack.procedural_text(7, 400)
    context = demos + "\n\nQuestion: which colour?\nAnswer: "
    choices = ("red", "green apple", "1234567")
    cuts = [len(demos), len(demos) + 1, len(demos) + 2, len(context) - 1, len(context)]
    reqs = [ChoiceRequest(context[:c], context[c:], choices) for c in cuts]
    scored = b.score_choices(reqs)
    want = [reference_logprob(b, context, c) for c in choices]
    for s in scored:
        for got, ref in zip(s.logprobs, want, strict=True):
            assert got is not None and abs(got - ref) < 1e-4, (got, ref)


def test_shared_prefix_spans_only_the_tokens_the_contexts_really_share(tiny_pair):
    # Contexts that share a prefix string but whose tokens part before it ends still equal
    # their own full-sequence scores.
    b = backend(tiny_pair["tiny-diff"])
    head = haystack.procedural_text(2, 300) + "\n"
    reqs = [ChoiceRequest(head, q, (" red", " blue sky")) for q in ("\nA:", "A:", " And", "")]
    for s, r in zip(b.score_choices(reqs), reqs, strict=True):
        for got, c in zip(s.logprobs, r.choices, strict=True):
            assert got is not None and abs(got - reference_logprob(b, r.prefix + r.query, c)) < 1e-4


def test_greedy_search_can_stop_at_a_choice_that_another_continues():
    # Choice 0 = [5], choice 1 = [5, 6, 7]; after token 5 the end token (9) is likelier than 6.
    def expand_with(after_five: dict[int, float]):
        trie = ChoiceTrie([[5], [5, 6, 7]], end_tokens=[9, None])

        def expand(nodes: list[int]) -> None:
            for i in nodes:
                path = [trie.nodes[j].token for j in trie.path(i)]
                table = {(): {5: -0.1}, (5,): after_five, (5, 6): {7: -0.01}}
                trie.expand(i, table[tuple(path)])

        expand([ROOT])
        return trie.search("greedy", expand)

    assert expand_with({9: -0.2, 6: -2.0}) == 0
    assert expand_with({9: -2.0, 6: -0.2}) == 1


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize(("end", "picks_short"), [(" special", True), ("\n", False)])
def test_constrained_greedy_stops_at_the_shorter_choice_when_its_end_is_likelier(
    prefix_cache, end, picks_short
):
    # After " The" the shipped base model rates " special" above " old", and " old" far above
    # a newline: so " The" wins against " The old bridge" exactly when the end is " special".
    b = backend(SHIPPED / "tiny-base", prefix_cache=prefix_cache)
    context = haystack.procedural_text(5, 300) + "\nAnswer:"
    short, long = " The", " The old bridge"
    enc_short = encode_prompt(b.tokenizer, context + short)
    end_token = encode_prompt(b.tokenizer, context + short + end)[len(enc_short)]
    cont = encode_prompt(b.tokenizer, context + long)[len(enc_short)]
    with torch.inference_mode():
        lp = torch.log_softmax(b.model(torch.tensor([enc_short])).logits[0, -1].float(), -1)
    assert bool(lp[end_token] > lp[cont]) == picks_short
    for choices in ((short, long), (long, short)):
        [s] = b.score_choices([ChoiceRequest(context, "", choices, method="greedy", end=end)])
        assert choices[s.chosen] == (short if picks_short else long)


def plain_logprobs(b: HFBackend, ids: list[int]) -> list[float]:
    """Log-probabilities of ids[1:] from one plain forward pass over `ids`."""
    with torch.inference_mode():
        lp = torch.log_softmax(b.model(torch.tensor([ids])).logits[0].float(), -1)
    return [float(lp[k - 1, ids[k]]) for k in range(1, len(ids))]


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff"])
def test_rolling_logprobs_of_a_text_that_fits_equal_one_plain_forward_pass(tiny_pair, arch):
    b = backend(tiny_pair[arch])
    text = haystack.procedural_text(11, 600)
    [got] = b.rolling_logprobs([RollingRequest(text)])
    ids = b.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert list(got.tokens) == ids
    want = plain_logprobs(b, [b.tokenizer.bos_token_id, *ids])
    assert len(got.logprobs) == len(ids)
    assert max(abs(x - y) for x, y in zip(got.logprobs, want, strict=True)) < 1e-4


@pytest.mark.parametrize("stride", [0, 24])
def test_rolling_windows_of_a_long_text_condition_each_token_on_its_window(tiny_pair, stride):
    # A 64-token context over a ~300-token text: stride 0 gives lm-eval's disjoint windows,
    # stride 24 windows that predict 24 new tokens each after 40 tokens of context.
    b = backend(tiny_pair["tiny-base"], max_length=64)
    text = haystack.procedural_text(12, 1200)
    [got] = b.rolling_logprobs([RollingRequest(text, stride=stride)])
    seq = [b.tokenizer.bos_token_id, *b.tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert len(got.logprobs) == len(seq) - 1 > 64
    want, done = [], 0
    while done < len(seq) - 1:
        n_new = min(64 if done == 0 or stride == 0 else stride, len(seq) - 1 - done)
        end = done + n_new
        window = seq[max(0, end - 64) : end + 1]
        want += plain_logprobs(b, window)[-n_new:]
        done = end
    assert max(abs(x - y) for x, y in zip(got.logprobs, want, strict=True)) < 1e-4
    with pytest.raises(DiffbenchError, match=r"stride of 65 tokens is outside 1\.\.64"):
        b.rolling_logprobs([RollingRequest(text, stride=65)])


def test_choice_tokens_equal_lmevals_whole_text_split_token_for_token(tiny_pair):
    # Each choice is encoded with the context's tail only; the tokens must still be those of
    # lm-eval's split of the whole text, whatever the context ends in.
    b = backend(tiny_pair["tiny-base"])
    demos = haystack.procedural_text(3, 300)
    endings = ("\nAnswer:", "\nAnswer: ", "Answer:\n", " 12", "x", "(a) b.", "  two  spaces")
    choices = (" red", "green apple", "1234567", " 42", "\n\nno", "-", " a b c")
    for end in endings:
        r = ChoiceRequest(demos, end, choices)
        got = encode_choices(b.tokenizer, r)
        stripped = (demos + end).rstrip()
        moved = (demos + end)[len(stripped) :]
        ctx = encode_prompt(b.tokenizer, stripped)
        assert got.context == ctx
        for c, cont in zip(choices, got.choices, strict=True):
            assert cont == encode_prompt(b.tokenizer, stripped + moved + c)[len(ctx) :], (end, c)
