"""`diffbench run --sweep KEY=V1,V2,...`: models expanded into labelled variants, and the figure
of a metric against the swept value."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from diffbench.config import expand_sweep, parse_sweep, split_variant
from diffbench.errors import DiffbenchError
from diffbench.figures import sweep_figures
from diffbench.models import ModelSpec


def test_sweep_expands_each_model_into_labelled_variants_carrying_the_option():
    models = [ModelSpec("base", "tiny-base", {"dtype": "float32"}), ModelSpec("diff", "tiny-diff")]
    variants = expand_sweep(models, parse_sweep("logit_bits=16,8,4"))
    assert [v.label for v in variants] == [
        "base@logit_bits=16", "base@logit_bits=8", "base@logit_bits=4",
        "diff@logit_bits=16", "diff@logit_bits=8", "diff@logit_bits=4",
    ]  # fmt: skip
    assert variants[1].spec == "tiny-base"
    assert variants[1].options == {"dtype": "float32", "logit_bits": "8"}
    assert variants[4].options == {"logit_bits": "8"}


def test_sweep_from_yaml_mapping_equals_the_command_line_form():
    assert parse_sweep({"logit_bits": [16, 8]}) == parse_sweep("logit_bits=16,8")
    assert parse_sweep({"chat_template": [True, False]}).values == ("true", "false")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("logit_bits", "expected KEY=V1,V2"),
        ("logit_bits=", "every value must be non-empty"),
        ("logit_bits=8,,4", "every value must be non-empty"),
        ("=8,4", "KEY must be a backend option name"),
        ("logit_bits=8,8", "a value is repeated"),
        (["logit_bits"], "expected KEY=V1,V2"),
    ],
)
def test_malformed_sweeps_are_refused(text, fragment):
    with pytest.raises(DiffbenchError, match=fragment):
        parse_sweep(text)


def test_sweep_refuses_an_option_also_set_for_a_model():
    with pytest.raises(DiffbenchError, match="give it in one place"):
        expand_sweep(
            [ModelSpec("a", "tiny-base", {"logit_bits": "8"})], parse_sweep("logit_bits=4")
        )


def test_variant_labels_split_back_into_base_key_and_value_even_after_a_merge_suffix():
    assert split_variant("base@logit_bits=8") == ("base", "logit_bits", "8")
    assert split_variant("base@logit_bits=8@run2") == ("base@run2", "logit_bits", "8")
    assert split_variant("base") is None
    assert split_variant("base@run2") is None


def test_sweep_figure_draws_one_line_per_base_model_for_any_task(tmp_path):
    rows = [
        {"task": "t", "metric": "accuracy", "model": f"{m}@logit_bits={b}", "value": v,
         "n": 10, "stderr": 0.1, "format": f}
        for m, base in (("base", 0.5), ("diff", 0.7))
        for b, drop in ((16, 0.0), (8, 0.05), (4, 0.3))
        for f, v in (("x", base - drop), ("all", base - drop))
    ]  # fmt: skip
    paths = sweep_figures("t", pd.DataFrame(rows), tmp_path)
    assert sorted(p.name for p in paths) == [
        "t_sweep_logit_bits_accuracy.pdf",
        "t_sweep_logit_bits_accuracy.png",
    ]
    # A run without a sweep draws none.
    plain = pd.DataFrame(rows).assign(model=lambda f: f["model"].str.split("@").str[0])
    assert sweep_figures("t", plain, tmp_path / "plain") == []


def test_sweep_run_end_to_end_records_variants_and_draws_metric_vs_value(cli, tiny_pair, tmp_path):
    res = cli(
        "run", "--tasks", "zeroshot", "--models", f"base={tiny_pair['tiny-base']}",
        "--sweep", "batch_size=1,4", "--set", "zeroshot.samples=3",
        "--set", "zeroshot.formats=needle", "--output", "run",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    res_dir = tmp_path / "run"  # the cli's working directory is tmp_path
    record = json.loads((res_dir / "run.json").read_text())
    assert [(m["label"], m["options"]) for m in record["config"]["models"]] == [
        ("base@batch_size=1", {"batch_size": "1"}),
        ("base@batch_size=4", {"batch_size": "4"}),
    ]
    metrics = pd.read_csv(res_dir / "metrics.csv")
    assert set(metrics["model"]) == {"base@batch_size=1", "base@batch_size=4"}
    # Batching does not change a likelihood choice: the two variants agree.
    acc = metrics[metrics["format"] == "all"].set_index(["model", "facts"])["value"]
    one, four = acc["base@batch_size=1"], acc["base@batch_size=4"]
    assert list(one.index) == [1, 2, 4] and one.equals(four)
    assert (res_dir / "figures" / "zeroshot_sweep_batch_size_accuracy.png").is_file()
    assert "zeroshot_sweep_batch_size_accuracy.png" in (res_dir / "report.md").read_text()


def test_default_run_names_collapse_sweep_variants_and_stay_portable_and_short():
    from diffbench.plan import default_output as default_run_dir
    from diffbench.runner import RunConfig

    labels = [f"a-very-long-model-label-{i}@logit_bits={b}" for i in range(6) for b in (16, 8, 4)]
    cfg = RunConfig(("lm-eval:arc_easy", "niah"), tuple(ModelSpec(x, "tiny-base") for x in labels))
    name = default_run_dir(cfg, {"x": 1}).name
    models = "+".join(f"a-very-long-model-label-{i}" for i in range(3))
    assert name.startswith(f"lm-eval_arc_easy+niah__{models}+3more__"), name
    assert len(name.encode()) < 255 and ":" not in name and "@" not in name
    assert default_run_dir(cfg, {"x": 2}).name != name  # the identity's hash tells them apart
