"""NIAH requests, scoring and aggregation, with a real tiny tokenizer."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from diffbench.api import (
    CLUSTER_KEY,
    AttentionMass,
    AttentionRequest,
    ChoiceRequest,
    ChoiceScores,
    GenerateRequest,
    Generation,
    Item,
)
from diffbench.backends.hf import HFBackend, HFOptions, HFTokenizerView, LoadTarget
from diffbench.config import build_config
from diffbench.errors import DiffbenchError
from diffbench.tasks import haystack
from diffbench.tasks.niah import PRESETS, TASK, NiahConfig
from tokenizers import Tokenizer, models, trainers
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="module")
def view(tiny_pair):
    path = tiny_pair["tiny-base"]
    return HFBackend("m", str(path), LoadTarget(str(path)), HFOptions()).tokenizer_view()


def test_prompts_fill_each_length_and_hold_every_needle_between_sentences(view):
    cfg = NiahConfig(lengths=(256, 768), needles=("1/1", "4/2"), samples=2, mode="generate")
    items = TASK.items(cfg, view, seed=3)
    assert len(items) == 2 * 5 * 2 * 2
    for it in items:
        assert isinstance(it.request, GenerateRequest)
        used = it.meta["n_prompt_tokens"] + it.meta["answer_room"]
        length = it.setting["length"]
        assert length - 30 <= used <= length  # whole sentences: within one sentence of full
        text = it.request.prompt
        for city, number, _ in it.meta["needle_list"]:
            needle = haystack.NEEDLE.format(city=city, number=number)
            assert text.count(needle) == 1
            before = text[: text.index(needle)]
            assert before == "" or before.endswith(". ")  # at a sentence boundary
        assert len(it.meta["needle_list"]) == it.setting["needles"]


def test_answer_needle_depth_is_respected(view):
    cfg = NiahConfig(lengths=(512,), depths=(0.0, 100.0), samples=1, mode="generate")
    by_depth = {it.setting["depth"]: it for it in TASK.items(cfg, view, seed=0)}
    first, last = by_depth[0.0], by_depth[100.0]
    ((city, number, _),) = first.meta["needle_list"]
    assert first.request.prompt.startswith(haystack.NEEDLE.format(city=city, number=number))
    ((city, number, _),) = last.meta["needle_list"]
    needle = haystack.NEEDLE.format(city=city, number=number)
    assert last.request.prompt.split("\n\n")[0].endswith(needle)


def test_needles_depend_on_the_seed_not_on_the_length_budget(view):
    a = TASK.items(NiahConfig(lengths=(256,), samples=1, mode="score"), view, seed=1)
    b = TASK.items(NiahConfig(lengths=(256,), samples=1, mode="score"), view, seed=1)
    c = TASK.items(NiahConfig(lengths=(256,), samples=1, mode="score"), view, seed=2)
    assert [i.meta["needle_list"] for i in a] == [i.meta["needle_list"] for i in b]
    assert [i.meta["needle_list"] for i in a] != [i.meta["needle_list"] for i in c]


def test_score_mode_ranks_the_true_number_against_same_shape_distractors(view):
    cfg = NiahConfig(lengths=(512,), needles=("3/2",), samples=1, mode="score", distractors=9)
    items = TASK.items(cfg, view, seed=0)
    assert len(items) == 5 * 2  # one item per queried needle
    for it in items:
        req = it.request
        assert isinstance(req, ChoiceRequest)
        assert len(req.choices) == 10
        assert all(len(c.strip()) == 7 and c.strip().isdigit() for c in req.choices)
        assert req.choices[it.meta["target_index"]].strip() == it.meta["target"]
        others = {n for _, n, _ in it.meta["needle_list"]} - {it.meta["target"]}
        assert others <= {c.strip() for c in req.choices}  # in-context numbers are distractors
    # Both queried needles of one sample share the haystack prefix (one KV cache).
    assert items[0].request.prefix == items[1].request.prefix


NEEDLE_RE = re.compile(r"The special magic (\w+) number is: (\d{7})\.")


def _mixed_haystack_file(path: Path) -> Path:
    """A file whose sentences run from two words to forty, in an irregular pattern."""
    long = (
        "The old bridge waits beside the town hall, and the quiet river drifts past the fish "
        "market, while the morning train turns away from the northern hills and the library "
        "rests under the evening fog as it always has."
    )
    short = ("It rains.", "Time moves slowly here.", "Nobody seems to mind.")
    pattern = "LSSLLSSSLSLLLSSSSLS"
    parts = [long if c == "L" else short[k % 3] for k, c in enumerate(pattern * 12)]
    path.write_text(" ".join(parts), encoding="utf-8")
    return path


def _haystack_and_inserts(prompt: str) -> tuple[list[str], list[bool]]:
    """The prompt's haystack as sentences, and which of them are needles or decoys."""
    hay = prompt.split("\n\n")[0]
    sentences = re.split(r"(?<=[.!?]) ", hay)
    return sentences, [NEEDLE_RE.fullmatch(s) is not None for s in sentences]


@pytest.fixture(scope="module")
def joining_view():
    """A real BPE without pre-tokenization: its tokens run across sentence joins ('. The ')."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    corpus = [haystack.procedural_text(i, 3000) for i in range(20)]
    corpus += [haystack.NEEDLE.format(city=c, number="1234567") for c in haystack.CITIES]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"], show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    view = HFTokenizerView(
        PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>"), 1024, False
    )
    assert view.count("hall. The") < view.count("hall.") + view.count(" The")
    return view


@pytest.mark.parametrize(
    ("source", "tokenizer"),
    [("procedural", "tiny"), ("file", "tiny"), ("procedural", "joining")],
)
def test_needle_lands_at_the_sentence_boundary_nearest_its_token_depth(
    request, source, tokenizer, tmp_path
):
    tok = request.getfixturevalue("view" if tokenizer == "tiny" else "joining_view")
    hay = "procedural" if source == "procedural" else str(_mixed_haystack_file(tmp_path / "h.txt"))
    cfg = NiahConfig(
        lengths=(512,),
        depths=(10.0, 25.0, 50.0, 75.0, 90.0),
        needles=("1/1", "3/2"),
        samples=2,
        haystack=hay,
        chat=False,
    )
    contexts = {}  # the queried needles of one score sample share one context
    for it in TASK.items(cfg, tok, seed=5):
        prompt = it.request.prefix if isinstance(it.request, ChoiceRequest) else it.request.prompt
        # Two depths of one sample may land at the same boundary of its shared haystack.
        contexts[it.id.split("-q")[0]] = (prompt, it)
    off, recorded = [], []
    for prompt, it in contexts.values():
        sentences, inserted = _haystack_and_inserts(prompt)
        city, number, _ = it.meta["needle_list"][0]
        at = sentences.index(haystack.NEEDLE.format(city=city, number=number))
        plain = [s for s, ins in zip(sentences, inserted, strict=True) if not ins]
        k = sum(not ins for ins in inserted[:at])  # haystack sentences before the needle
        # Tokens before every sentence boundary of the haystack alone, as the model counts them.
        before = [tok.count(" ".join(plain[:i])) for i in range(len(plain) + 1)]
        asked = it.setting["depth"] / 100 * before[-1]
        if abs(before[k] - asked) > min(abs(b - asked) for b in before):
            off.append((it.id, round(100 * before[k] / before[-1], 1)))
        recorded.append((it.meta.get("token_depth"), round(100 * before[k] / before[-1], 2)))
    assert off == []  # the old sentence-index placement put 10% at 19.5%, 50% at 60.2%
    assert all(got == realised for got, realised in recorded)
    assert len(contexts) == 5 * 2 * 2 * 2  # score mode's context (with decoys) is its own


def test_score_mode_puts_every_choice_in_the_context_keyed_by_its_own_city(view):
    cfg = NiahConfig(lengths=(512,), needles=("1/1", "3/2", "8/1"), samples=2, distractors=5)
    items = TASK.items(cfg, view, seed=4)
    scored = [it for it in items if isinstance(it.request, ChoiceRequest)]
    assert len(scored) == 5 * 2 * (1 + 2 + 1)
    for it in scored:
        req = it.request
        keyed = NEEDLE_RE.findall(req.prefix)
        by_city = dict(keyed)
        by_number = {number: city for city, number in keyed}
        assert len(by_city) == len(by_number) == len(keyed)  # one number per city, and back
        assert {c.strip() for c in req.choices} <= set(by_number)  # every choice is in context
        city = by_number[it.meta["target"]]
        assert req.query == haystack.ANSWER_PREFIX.format(city=city)
        assert req.prefix.count(f"magic {city} number") == 1
        assert req.prefix.count(haystack.NEEDLE.format(city=city, number=it.meta["target"])) == 1
        assert len(keyed) == max(it.setting["needles"], len(req.choices))
    # One haystack draw, read at 5 depths and by its R queries, is one unit: 2 draws of each N/R,
    # each holding 5 depths x R samples (the old code clustered only one prompt's R queries).
    clusters = Counter(it.meta[CLUSTER_KEY] for it in scored)
    assert len(clusters) == 3 * 2
    assert sorted(clusters.values()) == sorted([5 * 1] * 2 + [5 * 2] * 2 + [5 * 1] * 2)
    assert all(c.startswith("L512-n") for c in clusters)
    # Generate mode keeps the protocol's context: the N needles and nothing else.
    for it in items:
        if isinstance(it.request, GenerateRequest):
            assert len(NEEDLE_RE.findall(it.request.prompt)) == it.setting["needles"]


def test_generate_scoring_is_per_needle_substring_match():
    cfg = NiahConfig()
    it = Item("x", GenerateRequest("p", 8), {}, {"target": ["1234567", "7654321"]})
    rec = TASK.score(cfg, it, Generation("The numbers are 1234567 and 1111111.", 5, 12))
    assert rec["found"] == [True, False]
    assert rec["score"] == 0.5
    it = Item("y", ChoiceRequest("p", "", (" 1", " 2")), {}, {"target": "2", "target_index": 1})
    assert TASK.score(cfg, it, ChoiceScores((-3.0, -1.0), (1, 1), chosen=1))["score"] == 1.0


def test_aggregate_gives_cells_and_a_mean_over_depths():
    samples = pd.DataFrame(
        {
            "model": ["a"] * 4,
            "mode": ["score"] * 4,
            "length": [256] * 4,
            "needles": [1] * 4,
            "queries": [1] * 4,
            "depth": [0.0, 0.0, 100.0, 100.0],
            "score": [1.0, 0.0, 1.0, 1.0],
        }
    )
    rows = TASK.aggregate(NiahConfig(), samples)
    by_depth = dict(zip(rows["depth"], rows["value"], strict=True))
    assert by_depth == {"0": 0.5, "100": 1.0, "all": 0.75}
    assert set(rows["n"]) == {2, 4}


def test_presets_and_overrides_resolve_with_types():
    cfg = build_config("niah", NiahConfig, PRESETS, {"preset": "paper-4k", "samples": "5"})
    assert cfg.needles == ("1/1", "2/2", "4/2", "6/2")
    assert cfg.lengths == (4096,)
    assert cfg.samples == 5
    cfg = build_config("niah", NiahConfig, PRESETS, {"lengths": "1024, 2048"})
    assert cfg.lengths == (1024, 2048)
    with pytest.raises(DiffbenchError, match="N/R"):
        build_config("niah", NiahConfig, PRESETS, {"needles": "4-2"})
    with pytest.raises(DiffbenchError, match="R <= N"):
        build_config("niah", NiahConfig, PRESETS, {"needles": "2/3"})
    with pytest.raises(DiffbenchError, match="distractors must be < 40"):
        build_config("niah", NiahConfig, PRESETS, {"distractors": "40"})


def test_one_haystack_per_sample_across_depths_only_the_needle_moves(view):
    cfg = NiahConfig(lengths=(512,), needles=("1/1", "3/2"), samples=2, mode="both")
    items = TASK.items(cfg, view, seed=5)
    groups: dict[tuple, list] = {}
    for it in items:
        sample = it.id.split("-s")[1].split("-")[0]
        key = (it.setting["mode"], it.setting["needles"], sample)
        groups.setdefault(key, []).append(it)
    for (mode, _, _), members in groups.items():
        assert len(members) >= 5
        texts = set()
        for it in members:
            r = it.request
            text = r.prompt if mode == "generate" else r.prefix
            city, number, _ = it.meta["needle_list"][0]
            needle = haystack.NEEDLE.format(city=city, number=number)
            texts.add(text.replace(needle + " ", "").replace(" " + needle, ""))
            assert [n[:2] for n in it.meta["needle_list"]] == [
                n[:2] for n in members[0].meta["needle_list"]
            ]
        assert len(texts) == 1, "the haystack (and every other insert) must not change with depth"
    # Deepest first within each (sample, mode): consecutive prompts share up to the shallower one.
    gen = [it for it in items if it.setting["mode"] == "generate"][:5]
    assert [it.setting["depth"] for it in gen] == [100.0, 75.0, 50.0, 25.0, 0.0]


def test_one_haystack_per_length_serves_every_sample_and_depth(view):
    cfg = NiahConfig(lengths=(512,), samples=3, mode="generate", haystack_per="length")
    items = TASK.items(cfg, view, seed=5)
    texts = set()
    for it in items:
        city, number, _ = it.meta["needle_list"][0]
        needle = haystack.NEEDLE.format(city=city, number=number)
        plain = it.request.prompt.replace(needle + " ", "").replace(" " + needle, "")
        texts.add(plain.split("\n\n")[0])  # the haystack, without the question
    assert len(texts) == 1
    # Every sample of a depth together, deepest first: neighbours share the longest prefixes.
    assert [it.setting["depth"] for it in items[:4]] == [100.0, 100.0, 100.0, 75.0]
    per_sample = TASK.items(NiahConfig(lengths=(512,), samples=3, mode="generate"), view, seed=5)
    assert len({it.request.prompt.split("\n\n")[0][:200] for it in per_sample}) > 1


def test_an_r2_attention_item_has_a_span_per_queried_needle_and_the_haystack(view):
    cfg = NiahConfig(lengths=(512,), depths=(50.0,), needles=("3/2",), samples=1, mode="attention")
    (it,) = TASK.items(cfg, view, seed=4)
    assert isinstance(it.request, AttentionRequest)
    prompt, spans = it.request.prompt, it.request.spans
    assert len(spans) == 3
    needles = it.meta["needle_list"]
    for (a, b), (city, number, _) in zip(spans[:2], needles[:2], strict=False):
        assert prompt[a:b] == haystack.NEEDLE.format(city=city, number=number)
    h0, h1 = spans[2]
    assert all(h0 <= a < b <= h1 for a, b in spans[:2])
    unqueried = haystack.NEEDLE.format(city=needles[2][0], number=needles[2][1])
    assert unqueried in prompt[h0:h1] and all(unqueried != prompt[a:b] for a, b in spans[:2])
    assert it.meta["target"] == [needles[0][1], needles[1][1]]


def test_r2_answer_mass_is_the_sum_of_both_needles_spans(tiny_pair, view):
    cfg = NiahConfig(lengths=(512,), depths=(25.0,), needles=("2/2",), samples=1, mode="attention")
    (it,) = TASK.items(cfg, view, seed=6)
    path = tiny_pair["tiny-diff"]
    (mass,) = HFBackend("d", str(path), LoadTarget(str(path)), HFOptions()).attention_mass(
        [it.request]
    )
    s = TASK.score(cfg, it, mass)
    answer = [m[0] + m[1] for m in mass.masses]
    assert s["answer_per_layer"] == pytest.approx(answer, abs=1e-6)
    assert s["attention_answer"] == pytest.approx(sum(answer) / len(answer))
    noise = [m[2] - a for m, a in zip(mass.masses, answer, strict=True)]
    assert s["attention_noise"] == pytest.approx(sum(noise) / len(noise))
    negative = [m[2] for m in mass.negative]
    assert s["attention_negative"] == pytest.approx(sum(negative) / len(negative))
    assert s["attention_negative"] >= 0 and s["warnings"] == []


def test_attention_scores_split_positive_and_negative_mass_and_keep_warnings():
    it = Item("x", AttentionRequest("p" * 30, ((0, 5), (0, 30))), {}, {"target": ["1"]})
    mass = AttentionMass(
        masses=((0.5, 1.25), (0.25, 0.75)),
        n_prompt_tokens=12,
        negative=((0.0, 0.5), (0.1, 0.25)),
        warnings=("layer 1: lambda = 1.2 >= 1",),
    )
    s = TASK.score(NiahConfig(), it, mass)
    assert s["attention_answer"] == pytest.approx(0.375)
    assert s["attention_noise"] == pytest.approx(0.625)
    assert s["attention_negative"] == pytest.approx(0.375)  # the whole haystack's
    assert s["warnings"] == ["layer 1: lambda = 1.2 >= 1"]


def attention_samples(warnings: list[list[str]]) -> pd.DataFrame:
    n = len(warnings)
    return pd.DataFrame(
        {
            "model": ["diff"] * n,
            "mode": ["attention"] * n,
            "length": [512] * n,
            "needles": [1] * n,
            "queries": [1] * n,
            "depth": [0.0] * (n // 2) + [100.0] * (n - n // 2),
            "attention_answer": [0.3] * n,
            "attention_noise": [0.5] * n,
            "attention_negative": [0.25] * n,
            "warnings": warnings,
        }
    )


def test_attention_rows_hold_the_negative_mass_and_log_warned_samples_per_model(caplog):
    warning = "layer 0: lambda = 7.6 >= 1, so its differential map is not divided"
    samples = attention_samples([[], [], [warning], []])
    with caplog.at_level(logging.WARNING, logger="diffbench"):
        rows = TASK.aggregate(NiahConfig(), samples)
    assert set(rows["metric"]) == {"attention_answer", "attention_noise", "attention_negative"}
    negative = rows[rows["metric"] == "attention_negative"].set_index("depth")["value"]
    assert negative.to_dict() == {"0": 0.25, "100": 0.25, "all": 0.25}
    (record,) = [r for r in caplog.records if "lambda >= 1" in r.getMessage()]
    message = record.getMessage()
    assert "niah/diff: 1 of 4 attention samples" in message and "L512 n1r1 d100" in message
    assert "d0" not in message and "mix normalisations" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffbench"):
        TASK.aggregate(NiahConfig(), attention_samples([[], []]))
    assert not caplog.records


def test_table_3_paper_refs_match_single_needle_rows_only():
    refs = [r for r in TASK.paper if r.source == "Table 3"]
    assert len(refs) == 2
    assert all(r.where["needles"] == "1" and r.where["queries"] == "1" for r in refs)
    metrics = {m.name: m for m in TASK.metrics}
    negative = metrics["attention_negative"]
    assert (negative.better, negative.kind, negative.key) == ("lower", "mean", "attention_negative")
    assert "(a1 - lambda a2) / (1 - lambda)" in negative.note
