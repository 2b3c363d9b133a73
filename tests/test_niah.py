"""NIAH requests, scoring and aggregation, with a real tiny tokenizer."""

from __future__ import annotations

import pandas as pd
import pytest
from diffbench.api import ChoiceRequest, ChoiceScores, GenerateRequest, Generation, Item
from diffbench.backends.hf import HFBackend, HFOptions, LoadTarget
from diffbench.config import build_config
from diffbench.errors import DiffbenchError
from diffbench.tasks import haystack
from diffbench.tasks.niah import PRESETS, TASK, NiahConfig


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
    first, last = TASK.items(cfg, view, seed=0)
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
