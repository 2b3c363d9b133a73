"""The probe tasks: outliers (Table 5) and zeroshot (Figure 8's task); throughput (Table 7) has
test_throughput.py."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import scipy.stats
import torch
from diffbench.api import HIST_BINS_PER_OCTAVE, ZERO_BIN, ActivationRequest, ActivationSummary
from diffbench.backends.hf import HFBackend
from diffbench.models import ModelSpec
from diffbench.tasks import outliers, zeroshot
from diffbench.tasks.outliers import OutliersConfig
from diffbench.tasks.zeroshot import ZeroshotConfig

SHIPPED = Path(outliers.__file__).resolve().parents[1] / "bench" / "models"


def summary_of(x: torch.Tensor, layer: int = 0, top_k: int = 100) -> ActivationSummary:
    """An ActivationSummary of `x` built here from its definition in bench/api.py."""
    v = x.double().flatten()
    a = v.abs()
    nz = a[a > 0]
    bins = torch.floor(torch.log2(nz) * HIST_BINS_PER_OCTAVE).long()
    ids, counts = torch.unique(bins, return_counts=True)
    hist = [(int(b), int(c)) for b, c in zip(ids, counts, strict=True)]
    zeros = int((a == 0).sum())
    return ActivationSummary(
        "hidden_states", layer, "", v.numel(),
        tuple(float((v**p).sum()) for p in (1, 2, 3, 4)),
        tuple(torch.topk(a, min(top_k, a.numel())).values.tolist()),
        tuple(([(ZERO_BIN, zeros)] if zeros else []) + hist),
    )  # fmt: skip


def records_of(x: torch.Tensor, parts: int, layer: int = 0) -> list[dict]:
    return [outliers.summary_record(summary_of(p, layer)) for p in x.chunk(parts)]


@pytest.fixture(scope="module")
def heavy() -> torch.Tensor:
    """Heavy-tailed values with exact zeros, an odd and an even count apart."""
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((20_001,)) * 2
    x[torch.randperm(x.numel(), generator=g)[:500]] = 0
    return x


def test_merged_median_is_within_the_stated_bound_of_torch_median(heavy):
    for x in (heavy, heavy[:-1]):  # odd and even counts: torch.median is the lower median
        merged = outliers.merge_records(records_of(x, 7))[("hidden_states", "all", "all")]
        got = outliers.summary_values(merged)["median"]
        exact = float(torch.median(x.abs()))
        assert abs(got / exact - 1) <= outliers.median_relative_error() < 0.0055


def test_merged_top_k_over_parts_and_layers_equals_torch_topk_of_everything(heavy):
    a, b = heavy[:12_000], heavy[12_000:]
    recs = records_of(a, 5, layer=0) + records_of(b, 3, layer=1)
    merged = outliers.merge_records(recs)
    values = outliers.summary_values(merged[("hidden_states", "all", "all")])
    top = torch.topk(heavy.abs(), 100).values.double()
    for k in outliers.TOP_KS:
        assert values[f"top{k}"] == pytest.approx(float(top[k - 1]), rel=1e-6)
    assert values["inf_norm"] == values["top1"]
    layer1 = outliers.summary_values(merged[("hidden_states", "1", "all")])
    assert layer1["top1"] == pytest.approx(float(b.abs().max()), rel=1e-6)


def test_kurtosis_from_merged_moments_equals_scipy(heavy):
    merged = outliers.merge_records(records_of(heavy, 4))[("hidden_states", "all", "all")]
    expected = scipy.stats.kurtosis(heavy.double().numpy(), fisher=False)
    assert outliers.summary_values(merged)["kurtosis"] == pytest.approx(expected, rel=1e-6)


def test_sequences_have_the_asked_length_and_cover_the_budget(tiny_pair, tmp_path):
    backend = HFBackend.load(ModelSpec("b", str(tiny_pair["tiny-base"])))
    view = backend.tokenizer_view()
    cfg = OutliersConfig(tokens=1000, length=128)
    texts = list(outliers.sequences(cfg, view, 0))
    assert len(texts) == math.ceil(1000 / 128)
    assert all(126 <= view.prompt_tokens(t) <= 128 for t in texts)
    assert texts == list(outliers.sequences(cfg, view, 0))  # deterministic
    short = tmp_path / "short.txt"
    short.write_text("A short file. " * 20)
    from_file = list(outliers.sequences(OutliersConfig(text=str(short), length=32), view, 0))
    assert 1 <= len(from_file) < 4096 / 32  # a short file is used whole, not repeated
    assert "".join(from_file) == short.read_text()[: len("".join(from_file))]


def test_hidden_state_statistics_match_torch_on_the_layer_outputs(tiny_pair):
    """The task's numbers for one layer, from the backend's probe, against torch on the layer's
    own output captured with a forward hook."""
    backend = HFBackend.load(ModelSpec("b", str(tiny_pair["tiny-base"])))
    text = next(
        outliers.sequences(OutliersConfig(tokens=96, length=96), backend.tokenizer_view(), 0)
    )
    (stats,) = backend.activation_stats([ActivationRequest(text, ("hidden_states",), 100)])
    captured: list[torch.Tensor] = []
    layer = backend.model.model.layers[1]
    handle = layer.register_forward_hook(
        lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o).detach())
    )
    ids = backend.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        backend.model(ids)
    handle.remove()
    x = captured[0]
    recs = [outliers.summary_record(s) for s in stats.summaries]
    values = outliers.summary_values(outliers.merge_records(recs)[("hidden_states", "1", "all")])
    assert values["top1"] == pytest.approx(float(x.abs().max()), rel=1e-5)
    assert values["top10"] == pytest.approx(
        float(torch.topk(x.abs().flatten(), 10).values[-1]), rel=1e-5
    )
    median = float(torch.median(x.abs()))
    assert abs(values["median"] / median - 1) <= outliers.median_relative_error() + 1e-6


def test_outliers_run_writes_table_5_rows_per_layer_and_map(cli, tiny_pair, tmp_path):
    res = cli(
        "run", "--tasks", "outliers", "--models",
        f"base={tiny_pair['tiny-base']},diff={tiny_pair['tiny-diff']}",
        "--set", "outliers.tokens=200", "--set", "outliers.length=100", "--output", "run",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    m = pd.read_csv(tmp_path / "run" / "metrics.csv", dtype={"layer": str, "map": str})
    m["map"] = m["map"].fillna("")
    assert set(m["metric"]) == set(outliers.METRICS)
    assert set(m["layer"]) == {"0", "1", "all"}
    maps = m.groupby("model")["map"].agg(lambda s: sorted(set(s)))
    assert maps["base"] == ["all"] and maps["diff"] == ["1", "2", "all"]
    for (_, _, _, _), g in m.groupby(["model", "activation", "layer", "map"]):
        v = g.set_index("metric")["value"]
        assert v["top1"] == v["inf_norm"] >= v["top2"] >= v["top3"] >= v["top10"] >= v["top100"]
        assert 0 < v["median"] < v["top100"]
    # n counts the sequences behind a row (200 tokens / 100 per sequence), not the values.
    for model in ("base", "diff"):
        samples = pd.read_json(
            tmp_path / "run" / "samples" / "outliers" / f"{model}.jsonl", lines=True
        )
        assert len(samples) == 2
        assert set(m.loc[m["model"] == model, "n"]) == {2}
    assert (tmp_path / "run" / "figures" / "outliers_top1_per_layer.png").is_file()
    assert (
        "Summary rows: top1 averaged over layer and map"
        in (tmp_path / "run" / "report.md").read_text()
    )


def test_zeroshot_choices_are_the_passages_values_then_absent_ones():
    cfg = ZeroshotConfig(facts=(1, 2, 4, 6))
    for fmt, facts, i in itertools.product(zeroshot.FORMATS, cfg.facts, range(10)):
        text, prefix, choices = zeroshot.example(cfg, fmt, facts, 7, i)
        assert (text, prefix, choices) == zeroshot.example(cfg, fmt, facts, 7, i)
        assert len(set(choices)) == cfg.choices
        # As many wrong choices come from the passage as it can give; the rest are absent from it.
        in_passage = [c in text for c in choices]
        assert in_passage == [True] * min(facts, cfg.choices) + [False] * (cfg.choices - facts)
        # The asked key's fact holds the true value, and the prefix names the asked key.
        key = prefix.split(" for ")[-1].removesuffix(" is:").removesuffix(" is").rstrip(":")
        fact = zeroshot.FORMATS[fmt][0].format(key=key, value=choices[0])
        assert fact in text
        assert text.count(fact.split(key)[0]) == facts  # one fact per key in the passage


def test_shipped_diff_model_is_well_above_chance_on_zeroshot(cli, tmp_path):
    res = cli(
        "run", "--tasks", "zeroshot", "--models", "tiny-diff", "--no-report",
        "--set", "zeroshot.samples=8", "--set", "zeroshot.formats=needle", "--output", "run",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    m = pd.read_csv(tmp_path / "run" / "metrics.csv")
    acc = m[m["format"] == "all"].set_index("facts")["value"]
    assert list(acc.index) == [1, 2, 4]  # a row per fact count, never pooled
    assert (acc >= 0.75).all()  # chance is 0.25


def test_generated_corpus_depends_on_its_seed_alone():
    rng_texts = {outliers.generated_document(s, 400) for s in range(5)}
    assert len(rng_texts) == 5
    random.seed(1)  # the corpus draws from its own seeded generator, never the global one
    again = outliers.generated_document(3, 400)
    random.seed(2)
    assert outliers.generated_document(3, 400) == again


def test_niah_attention_mode_writes_table_3_rows_and_llama_masses_are_probabilities(
    cli, tiny_pair, tmp_path
):
    res = cli(
        "run", "--tasks", "niah", "--models",
        f"base={tiny_pair['tiny-base']},diff={tiny_pair['tiny-diff']}",
        "--set", "niah.mode=attention", "--set", "niah.lengths=200", "--set", "niah.samples=2",
        "--set", "niah.depths=0,100", "--output", "run",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    m = pd.read_csv(tmp_path / "run" / "metrics.csv", dtype={"depth": str})
    assert set(m["metric"]) == {"attention_answer", "attention_noise", "attention_negative"}
    assert set(m["depth"]) == {"0", "100", "all"}
    samples = pd.read_json(tmp_path / "run" / "samples" / "niah" / "base.jsonl", lines=True)
    for _, s in samples.iterrows():
        for a, n in zip(s["answer_per_layer"], s["noise_per_layer"], strict=True):
            assert 0 <= a <= 1 and 0 <= n <= 1 and a + n <= 1 + 1e-6
        assert s["negative_per_layer"] == [0, 0] and s["attention_negative"] == 0
        assert s["warnings"] == []
    # A DIFF model's masses are positive parts: none below 0, whatever its map over-subtracts.
    samples = pd.read_json(tmp_path / "run" / "samples" / "niah" / "diff.jsonl", lines=True)
    for _, s in samples.iterrows():
        assert min(s["answer_per_layer"]) >= 0 and min(s["negative_per_layer"]) >= 0
        assert s["attention_noise"] >= 0 and s["attention_negative"] >= 0
    assert (tmp_path / "run" / "figures" / "niah_attention_L200_n1r1.png").is_file()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "attention_answer" in report and "attention_noise" in report
