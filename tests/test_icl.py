"""The many-shot ICL task: arrangements, prompts, shared-prefix scoring, local data, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from conftest import kill_when, models_arg
from diffbench.api import CLUSTER_KEY
from diffbench.backends.hf import HFBackend, HFOptions, LoadTarget
from diffbench.errors import DiffbenchError
from diffbench.tasks import haystack, icl_datasets
from diffbench.tasks.icl import TASK, IclConfig, arrange, label_choices
from diffbench.tasks.icl_datasets import Example
from test_cli_errors import assert_one_line_error


def demos() -> list[Example]:
    labels = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"]
    return [Example(f"text {i}", lab) for i, lab in enumerate(labels)]


@pytest.mark.parametrize("arrangement", ["random", "alternating", "grouped"])
def test_arrangements_are_permutations_of_the_same_demonstrations(arrangement):
    out = arrange(demos(), arrangement, random.Random(0))
    assert sorted(out, key=lambda e: e.text) == sorted(demos(), key=lambda e: e.text)
    assert out != arrange(demos(), arrangement, random.Random(1)) or arrangement == "grouped"


def test_grouped_arrangement_keeps_each_class_contiguous():
    out = [e.label for e in arrange(demos(), "grouped", random.Random(3))]
    runs = [lab for i, lab in enumerate(out) if i == 0 or out[i - 1] != lab]
    assert sorted(runs) == ["a", "b", "c", "d"]


def test_alternating_arrangement_cycles_through_classes_round_robin():
    out = [e.label for e in arrange(demos(), "alternating", random.Random(5))]
    first_round = out[:4]
    assert sorted(first_round) == ["a", "b", "c", "d"]
    cycle = [lab for lab in first_round]
    # Later rounds follow the same class order, skipping exhausted classes.
    pos, expected = 4, []
    remaining = Counter(e.label for e in demos()) - Counter(first_round)
    while remaining:
        for lab in cycle:
            if remaining[lab]:
                expected.append(lab)
                remaining[lab] -= 1
        remaining = +remaining
    assert out[pos:] == expected


@pytest.fixture(scope="module")
def views(tiny_pair):
    return {name: HFBackend(name, str(p), LoadTarget(str(p)), HFOptions())
            for name, p in tiny_pair.items()}  # fmt: skip


def test_labels_are_plain_continuations_and_end_at_the_separator(views):
    # A label that prefixes another ("pay" / "pay bill") is told apart by the request's end
    # text, the separator that follows every label in the prompt, not by an altered label.
    assert label_choices(("pay", "pay bill", "rent")) == (" pay", " pay bill", " rent")
    cfg = IclConfig(shots=(2,), draws=1, test_size=3, answer="constrained", separator="\n###\n")
    items = TASK.items(cfg, views["tiny-base"].tokenizer_view(), seed=0)
    assert {(it.request.method, it.request.end) for it in items} == {("greedy", "\n###\n")}


def test_prompts_share_one_prefix_per_draw_and_order_and_fit_the_context(views):
    cfg = IclConfig(shots=(2, 4), draws=2, orders=2, arrangements=("random", "grouped"),
                    test_size=5)  # fmt: skip
    items = TASK.items(cfg, views["tiny-base"].tokenizer_view(), seed=0)
    assert len(items) == 2 * 2 * 2 * 2 * 5
    prefixes: dict[tuple, set[str]] = {}
    for it in items:
        key = (it.setting["shots"], it.setting["draw"], it.setting["arrangement"],
               it.setting["order"])  # fmt: skip
        prefixes.setdefault(key, set()).add(it.request.prefix)
        assert it.request.choices[it.meta["target_index"]].strip() == it.meta["target"]
    assert all(len(p) == 1 for p in prefixes.values())
    # The same draw's demonstrations in every arrangement and order: same lines, other order.
    lines = {k: sorted(next(iter(p)).split("\n\n")) for k, p in prefixes.items()}
    assert lines[(4, 0, "random", 0)] == lines[(4, 0, "grouped", 1)]
    assert lines[(4, 0, "random", 0)] != lines[(4, 1, "random", 0)]


def test_automatic_shot_sweep_stops_at_the_context_limit(tiny_pair):
    path = tiny_pair["tiny-base"]
    small = HFBackend("m", str(path), LoadTarget(str(path)), HFOptions(max_length=256))
    items = TASK.items(IclConfig(max_shots=64, draws=1, test_size=3), small.tokenizer_view(), 0)
    shots = sorted({it.setting["shots"] for it in items})
    assert shots[0] == 1 and shots[-1] < 64
    assert shots == [2**i for i in range(len(shots))]


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff"])
def test_prefix_shared_scoring_equals_naive_scoring_on_icl_prompts(tiny_pair, views, arch):
    cfg = IclConfig(shots=(8,), draws=1, test_size=4, classes=6)
    items = TASK.items(cfg, views[arch].tokenizer_view(), seed=0)
    full = [dataclasses.replace(it.request, method="full") for it in items]
    path = tiny_pair[arch]
    naive = HFBackend("n", str(path), LoadTarget(str(path)), HFOptions(prefix_cache=False))
    reference = naive.score_choices(full)
    shared = views[arch].score_choices(full)
    best = views[arch].score_choices([it.request for it in items])  # the task's own method
    for r, s, b in zip(reference, shared, best, strict=True):
        assert r.chosen == s.chosen == b.chosen
        assert all(abs(x - y) < 1e-4 for x, y in zip(r.logprobs, s.logprobs, strict=True))
        assert abs(b.logprobs[b.chosen] - r.logprobs[r.chosen]) < 1e-4


def test_constrained_decoding_and_likelihood_agree_on_a_prefix_free_label_set(views, tmp_path):
    view = views["tiny-base"].tokenizer_view()
    vocabulary = " ".join(haystack.SUBJECTS + haystack.OBJECTS).lower().split()
    words = sorted({w for w in vocabulary if w.isalpha() and len(w) > 3})
    labels = [w for w in words if view.count(" " + w) == 1][:5]
    assert len(labels) >= 3, "the tiny tokenizer should hold these words as single tokens"
    rows = [{"text": f"note {i} about the {labels[i % len(labels)]}", "label": labels[i % len(
        labels)]} for i in range(60)]  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {}
    for answer in ("likelihood", "constrained"):
        cfg = IclConfig(dataset=str(data), shots=(4,), draws=2, test_size=10, answer=answer)
        items = TASK.items(cfg, view, seed=0)
        answers[answer] = [s.chosen for s in views["tiny-base"].score_choices(
            [it.request for it in items])]  # fmt: skip
    assert answers["likelihood"] == answers["constrained"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_dataset_runs_end_to_end(cli, tiny_pair, tmp_path):
    rows = [{"utt": f"please {verb} the thing number {i}", "intent": verb}
            for i, verb in enumerate(["open", "close", "move", "paint"] * 10)]  # fmt: skip
    data = write_jsonl(tmp_path / "train.jsonl", rows + rows[:3])
    out = tmp_path / "run"
    res = cli("run", "--tasks", "icl", "--models", models_arg(tiny_pair), "--set",
              f"icl.dataset={data}", "--set", "icl.text_field=utt", "--set",
              "icl.label_field=intent", "--set", "icl.shots=1,4", "--set", "icl.test_size=6",
              "--output", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = [line for line in (out / "metrics.csv").read_text().splitlines()
               if ",accuracy," in line and ",all,all" in line]  # fmt: skip
    assert len(summary) == 2 * 2  # two models x two shot counts
    samples = (out / "samples" / "icl" / "diff.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2 * 6  # shot counts x draws x test examples
    first = json.loads(samples[0])
    assert first["dataset"] == "train.jsonl"
    assert first["dropped_duplicates"] == 3 and first[CLUSTER_KEY] == "k1-t0"
    assert "dropped 3 rows repeating an earlier row's text" in res.stderr
    assert (out / "figures" / "icl_shots_train_random.png").exists()


@pytest.mark.parametrize(
    ("rows", "sets", "fragment"),
    [
        ([{"text": "a", "label": "x"}, {"text": "b"}], [], "row 2 has no 'label'"),
        ([{"txt": "a", "label": "x"}], [], "has no field 'text'"),
        ([{"text": f"t{i}", "label": "same"} for i in range(9)], [], "at least two labels"),
        (
            [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)],
            ["--set", "icl.shots=64"],
            "64 shots asked for",
        ),
    ],
)
def test_bad_local_datasets_fail_with_one_line(cli, tiny_pair, tmp_path, rows, sets, fragment):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    res = cli("run", "--tasks", "icl", "--models", f"m={tiny_pair['tiny-base']}", "--set",
              f"icl.dataset={data}", *sets)  # fmt: skip
    assert_one_line_error(res, fragment)


def test_an_uncached_hub_dataset_offline_is_refused_before_any_model_loads(
    cli, tiny_pair, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    res = cli("run", "--tasks", "icl", "--models", f"m={tiny_pair['tiny-base']}", "--set",
              "icl.dataset=banking77")  # fmt: skip
    assert_one_line_error(
        res, "dataset banking77 is not in the hub cache", "prefetch it: hf download"
    )
    assert "loaded" not in res.stderr and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_icl_run_killed_mid_sweep_resumes_to_identical_metrics(cli, tiny_pair, tmp_path):
    args = ["run", "--tasks", "icl", "--models", models_arg(tiny_pair), "--set",
            "icl.max_shots=16", "--set", "icl.test_size=12", "--no-report"]  # fmt: skip
    killed = tmp_path / "killed"
    target = killed / "samples" / "icl" / "diff.jsonl"
    kill_when([*args, "--output", str(killed)], tmp_path, target, 30)
    assert cli(*args, "--output", str(killed)).returncode == 0
    assert cli(*args, "--output", str(tmp_path / "clean")).returncode == 0
    assert (killed / "metrics.csv").read_bytes() == (
        tmp_path / "clean" / "metrics.csv"
    ).read_bytes()
    ids = [json.loads(x)["id"] for x in target.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 5 * 2 * 12


# ---- no test example among the demonstrations; clusters; an honest stderr ----------------------


def leaked(items) -> list[tuple[str, str]]:
    """(item id, test text) for every test text that is a demonstration in some item's prefix."""
    texts = {it.meta["text"] for it in items}
    prefixes = {it.request.prefix for it in items}
    return [
        (it.id, text)
        for it in items
        for text in texts
        if it.request.prefix in prefixes
        and f"\n\nutterance: {text}\n" in "\n\n" + it.request.prefix
    ]


def test_no_test_example_is_a_demonstration_in_the_default_config(views):
    items = TASK.items(IclConfig(), views["tiny-base"].tokenizer_view(), seed=0)
    assert len({it.meta["text"] for it in items}) == IclConfig().test_size
    assert leaked(items) == []


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_synthetic_texts_are_distinct_and_demonstrations_never_hold_a_test_text(seed):
    ds = icl_datasets.synthetic(test_size=24, seed=seed)
    texts = [e.text for e in ds.train + ds.test]
    assert len(texts) == len(set(texts)) == 30 * len(icl_datasets.INTENTS)
    assert ds.dropped.total == 0
    assert Counter(e.label for e in ds.train + ds.test) == Counter(
        {label: 30 for label in icl_datasets.INTENTS}
    )


def duplicated_rows() -> list[dict[str, str]]:
    """24 distinct texts, each written three times, and one text given two labels."""
    rows = [{"text": f"please {verb} box {i}", "label": verb}
            for i, verb in enumerate(["open", "close", "move", "paint"] * 6)]  # fmt: skip
    conflict = [
        {"text": "do the usual", "label": "open"},
        {"text": "do the usual", "label": "move"},
    ]
    return rows + conflict + rows + rows


def test_a_local_file_with_duplicates_never_shows_a_test_text_and_reports_the_drops(
    views, tmp_path, caplog
):
    data = write_jsonl(tmp_path / "dup.jsonl", duplicated_rows())
    cfg = IclConfig(dataset=str(data), shots=(1, 4, 8), draws=3, test_size=8)
    with caplog.at_level(logging.INFO, logger="diffbench"):
        items = TASK.items(cfg, views["tiny-base"].tokenizer_view(), seed=0)
    assert leaked(items) == []
    # 48 repeated rows and the conflicting second "do the usual" row.
    assert {(it.meta["dropped_duplicates"], it.meta["dropped_conflicting"],
             it.meta["dropped_test_overlap"]) for it in items} == {(49, 1, 0)}  # fmt: skip
    assert "dropped 49 rows repeating an earlier row's text (1 with another label" in caplog.text
    ds = icl_datasets.load(str(data), "", "text", "label", 8, 0)
    usual = [e.label for e in ds.train + ds.test if e.text == "do the usual"]
    assert usual == ["open"]  # the first row's label is kept
    assert len(ds.train) + len(ds.test) == 25


def test_a_separate_test_file_removes_its_texts_from_the_demonstrations(views, tmp_path):
    rows = duplicated_rows()[:26]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(
        tmp_path / "test.jsonl", [rows[1], rows[2], {**rows[5], "text": " please  close box 5 "}]
    )
    cfg = IclConfig(dataset=str(train), test_file=str(test), shots=(4, 16), draws=2)
    items = TASK.items(cfg, views["tiny-base"].tokenizer_view(), seed=0)
    assert leaked(items) == []
    assert items[0].meta["dropped_test_overlap"] == 3
    assert items[0].meta["dropped_conflicting"] == 1


def test_every_sample_of_one_test_example_at_one_shot_count_shares_a_cluster(views):
    cfg = IclConfig(shots=(2, 4), draws=2, orders=2, arrangements=("random", "grouped"),
                    test_size=5)  # fmt: skip
    items = TASK.items(cfg, views["tiny-base"].tokenizer_view(), seed=0)
    clusters: dict[str, list] = {}
    for it in items:
        clusters.setdefault(it.meta[CLUSTER_KEY], []).append(it)
    assert len(clusters) == 2 * 5
    for members in clusters.values():
        assert len(members) == 2 * 2 * 2  # draws x orders x arrangements
        assert len({(it.setting["shots"], it.meta["text"]) for it in members}) == 1


def test_accuracy_stderr_is_not_zero_when_draws_agree():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    samples = pd.DataFrame(
        [{"model": "m", "dataset": "d", "arrangement": "random", "shots": 4, "draw": d,
          "order": 0, "test_index": t, CLUSTER_KEY: f"k4-t{t}", "score": s}
         for d in range(2) for t, s in enumerate(scores)]
    )  # fmt: skip
    metrics = TASK.aggregate(IclConfig(), samples)
    row = metrics[(metrics["draw"] == "all") & (metrics["metric"] == "accuracy")].iloc[0]
    assert row["value"] == 0.5
    # Draws agree, so the stderr is that of 10 test examples, not of 2 identical draws.
    assert row["stderr"] == pytest.approx(np.std(scores, ddof=1) / np.sqrt(len(scores)))
    spread = metrics[(metrics["draw"] == "all") & (metrics["metric"] == "accuracy_std")]
    assert spread["value"].iloc[0] == 0.0


def test_a_class_subset_keeps_only_its_classes_and_is_drawn_by_the_seed(tmp_path):
    ds = icl_datasets.load("synthetic", "", "text", "label", 40, seed=7, classes=6)
    assert len(ds.labels) == 6 and set(ds.labels) < set(icl_datasets.INTENTS)
    assert {e.label for e in ds.train + ds.test} == set(ds.labels)
    assert len(ds.test) == 40  # the test split is drawn from the subset, not cut from all 32
    again = icl_datasets.load("synthetic", "", "text", "label", 40, seed=7, classes=6)
    assert again.labels == ds.labels
    other = icl_datasets.load("synthetic", "", "text", "label", 40, seed=8, classes=6)
    assert other.labels != ds.labels
    rows = [{"text": f"t{i} {lab}", "label": lab} for i in range(20) for lab in "abcd"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = icl_datasets.load(str(path), "", "text", "label", 8, seed=1, classes=2)
    assert len(local.labels) == 2 and {e.label for e in local.train + local.test} == set(
        local.labels
    )
    with pytest.raises(DiffbenchError, match=r"d\.jsonl has only 4 classes"):
        icl_datasets.load(str(path), "", "text", "label", 8, seed=1, classes=5)
