"""The CI gate: `diffbench compare` on real run directories with planted regressions."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from diffbench import variants
from diffbench.api import INPUT_KEY, setting_text
from diffbench.errors import DiffbenchError
from diffbench.gate import compare_models, compare_runs, parse_tolerance
from diffbench.render.gate import render_json, render_junit
from test_cli_errors import assert_one_line_error
from test_report import sweep_suite_run
from test_stats import shared_run

HEADLINE = {"model": "diff", "depth": "all"}

# A task whose metric is lower-is-better and that run.json does not describe (rows added by hand,
# as in a run written before run.json described its tasks): its installed plugin, registered
# through a real entry point, stands in.
PLUGIN = """
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class LossConfig:
    pass


class LossTask:
    name = "loss"
    description = "a task whose metric is lower-is-better"
    config_type = LossConfig
    metrics = ("perplexity",)
    setting_keys = ("length",)
    lower_is_better = frozenset({"perplexity"})
    sample_mean_metrics = frozenset()
    headline = ()
    presets = {}
    request_kinds = ()

    def items(self, config, tokenizer, seed):
        return []

    def score(self, config, item, response):
        return {}

    def aggregate(self, config, samples):
        return pd.DataFrame()

    def figures(self, metrics, samples, out_dir):
        return []


TASK = LossTask()
"""


@pytest.fixture(scope="module")
def run_dir(tiny_pair, tmp_path_factory) -> Path:
    """The shared real run of diff, base and twin (score mode, 20 samples each); never edited."""
    return shared_run(tiny_pair, tmp_path_factory.getbasetemp())


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def read_metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)


def edit_metrics(run: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    edit(read_metrics(run)).to_csv(run / "metrics.csv", index=False)


def shift_value(run: Path, where: dict[str, str], by: float) -> None:
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        mask = (frame[list(where)] == pd.Series(where)).all(axis=1)
        assert mask.sum() == 1
        frame.loc[mask, "value"] = [f"{float(v) + by:.10g}" for v in frame.loc[mask, "value"]]
        return frame

    edit_metrics(run, edit)


def set_scores(run: Path, model: str, score: float) -> None:
    """Every sample of `model` scored `score`, and its metric rows (means) to match."""
    path = run / "samples" / "niah" / f"{model}.jsonl"
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**s, "score": score}) + "\n" for s in samples))

    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[frame["model"] == model, ["value", "stderr"]] = [f"{score:g}", "0"]
        return frame

    edit_metrics(run, edit)


def gate(baseline: Path, candidate: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(baseline.parent, "compare", str(baseline), str(candidate), *args)


def statuses(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    counts: dict[str, int] = json.loads(result.stdout)["counts"]
    return counts


def test_regression_beyond_tolerance_fails_the_gate(run_dir, tmp_path):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    shift_value(cand, HEADLINE, -0.10)
    res = gate(base, cand, "--fail-on", "regression", "--tolerance", "0.05")
    assert res.returncode == 1, res.stdout + res.stderr
    regressions = [line for line in res.stdout.splitlines() if line.startswith("regression")]
    assert len(regressions) == 1
    assert "depth=all" in regressions[0] and " diff " in regressions[0]
    assert "FAIL" in res.stdout


def test_change_within_tolerance_passes_the_gate(run_dir, tmp_path):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    shift_value(cand, HEADLINE, -0.03)
    result = compare_runs(base, cand, {}, tolerance=parse_tolerance("0.05"), fail_on=["regression"])
    assert not result.failed
    assert result.count("regression") == 0
    assert json.loads(render_json(result))["failed"] is False


def test_per_metric_tolerance_overrides_the_global_one(run_dir, tmp_path):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    shift_value(cand, HEADLINE, -0.10)
    kwargs = {"fail_on": ["regression"]}
    loose = compare_runs(base, cand, {}, tolerance=parse_tolerance("0.01,accuracy=0.2"), **kwargs)
    strict = compare_runs(base, cand, {}, tolerance=parse_tolerance("accuracy=0.05"), **kwargs)
    assert not loose.failed and strict.failed
    assert strict.count("regression") == 1


def test_require_significance_fails_only_on_a_significant_regression(run_dir, tmp_path):
    # Only metrics.csv changed: the paired samples are identical, McNemar's p is 1.
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    shift_value(cand, HEADLINE, -0.10)
    args = {"fail_on": ["regression"], "require_significance": True}
    result = compare_runs(base, cand, {}, **args)
    assert not result.failed
    assert result.count("not significant") == 1
    # Planted in the samples: every diff sample right in the baseline and wrong in the candidate.
    set_scores(base, "diff", 1.0)
    set_scores(cand, "diff", 0.0)
    result = compare_runs(base, cand, {}, **args)
    assert result.failed
    changes = json.loads(render_json(result))["changes"]
    regressed = [c for c in changes if c["status"] == "regression"]
    # 8 haystack draws, every one flipped: p = 2/2^8 at each depth and over depths, and
    # Benjamini-Hochberg over the 18 tested rows (6 of them changed) keeps them below 0.05.
    assert {c["setting"]["depth"] for c in regressed} == {"0", "25", "50", "75", "100", "all"}
    (over_depths,) = [c for c in regressed if c["setting"]["depth"] == "all"]
    assert over_depths["test"] == "cluster sign-flip" and over_depths["n_clusters"] == 8
    assert over_depths["n_pairs"] == 40 and over_depths["p_value"] == pytest.approx(2 / 2**8)
    assert over_depths["p_adjusted"] == pytest.approx(2 / 2**8 * 18 / 6)
    assert over_depths["adjustment"] == "benjamini-hochberg"
    # Holm over the same family is stricter: 18 x 2/2^8 > 0.05, so nothing is significant.
    holm = compare_runs(base, cand, {}, adjustment="holm", **args)
    assert not holm.failed and holm.count("not significant") == 6


@pytest.fixture
def loss_plugin(tmp_path, monkeypatch) -> Path:
    """A `loss` task (perplexity, lower is better) installed through an entry point."""
    site = tmp_path / "plugin"
    dist = site / "losstask-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "losstask.py").write_text(textwrap.dedent(PLUGIN))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: losstask\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[diffbench.tasks]\nloss = losstask:TASK\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def add_loss_row(run: Path, value: float, stderr: str = "0.05") -> None:
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        row = {c: "" for c in frame.columns}
        row.update(task="loss", metric="perplexity", model="diff", value=f"{value:g}")
        row.update(n="100", stderr=stderr, length="256")
        return pd.concat([frame, pd.DataFrame([row])], ignore_index=True)

    edit_metrics(run, edit)


@pytest.mark.parametrize(
    ("candidate", "exit_code", "status"), [(2.5, 1, "regression"), (1.5, 0, "improvement")]
)
def test_direction_is_respected_for_lower_is_better_metrics(
    run_dir, tmp_path, loss_plugin, candidate, exit_code, status
):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    add_loss_row(base, 2.0)
    add_loss_row(cand, candidate)
    result = compare_runs(base, cand, {}, tolerance=parse_tolerance("0.1"), fail_on=["regression"])
    assert result.failed is bool(exit_code)
    (row,) = [c for c in json.loads(render_json(result))["changes"] if c["task"] == "loss"]
    assert row["lower_is_better"] is True
    assert row["status"] == status
    # Not a sample mean: no test, and the row says why (no unpaired normal approximation).
    assert row["test"] == "none" and "statistic" in row["no_test_reason"]


def test_require_significance_refuses_a_metric_it_cannot_test(
    run_dir, tmp_path, loss_plugin, monkeypatch
):
    # A metric without per-sample scores or stderr has no test: the flag used to turn any change
    # of it into "not significant", so the gate could never fail on it.
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    add_loss_row(base, 2.0, stderr="")
    add_loss_row(cand, 2.5, stderr="")
    monkeypatch.setenv("PYTHONPATH", str(loss_plugin))  # the plugin, for the CLI's subprocess
    res = gate(base, cand, "--fail-on", "regression", "--require-significance")
    assert_one_line_error(res, "--require-significance cannot test loss perplexity")
    # Within a tolerance the row needs no test; without the flag it gates on tolerance.
    ok = gate(
        base,
        cand,
        "--fail-on",
        "regression",
        "--require-significance",
        "--tolerance",
        "perplexity=1",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert gate(base, cand, "--fail-on", "regression").returncode == 1


def test_missing_and_new_rows_are_reported(run_dir, tmp_path):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")

    def drop_one_add_one(frame: pd.DataFrame) -> pd.DataFrame:
        gone = (frame["model"] == "base") & (frame["depth"] == "50")
        extra = frame[(frame["model"] == "base") & (frame["depth"] == "all")].assign(length="384")
        return pd.concat([frame[~gone], extra], ignore_index=True)

    edit_metrics(cand, drop_one_add_one)
    res = gate(base, cand)
    assert res.returncode == 0, res.stderr
    missing = [line for line in res.stdout.splitlines() if line.startswith("missing")]
    new = [line for line in res.stdout.splitlines() if line.startswith("new")]
    assert len(missing) == 1 and "depth=50" in missing[0]
    assert len(new) == 1 and "length=384" in new[0]
    # A regression gate cannot pass a row it cannot see; a new row fails nothing.
    assert gate(base, cand, "--fail-on", "regression").returncode == 1
    assert gate(base, cand, "--fail-on", "regression,missing").returncode == 1
    assert gate(base, cand, "--fail-on", "missing").returncode == 1


@pytest.mark.parametrize("value", [None, "nan", ""], ids=["absent", "nan", "empty"])
def test_a_regression_gate_fails_on_a_metric_absent_nan_or_empty_in_the_candidate(
    run_dir, tmp_path, value
):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")

    def blank(frame: pd.DataFrame) -> pd.DataFrame:
        mask = (frame[list(HEADLINE)] == pd.Series(HEADLINE)).all(axis=1)
        assert mask.sum() == 1
        if value is None:
            return frame[~mask]
        frame.loc[mask, "value"] = value
        return frame

    edit_metrics(cand, blank)
    res = gate(base, cand, "--fail-on", "regression")
    assert res.returncode == 1, res.stdout + res.stderr
    missing = [line for line in res.stdout.splitlines() if line.startswith("missing")]
    assert len(missing) == 1 and "depth=all" in missing[0] and " diff " in missing[0]
    assert res.stdout.rstrip().splitlines()[-1].endswith("failed on 1 missing")


def test_a_setting_written_25_0_matches_25(run_dir, tmp_path):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    respelled = {"0": "0.0", "25": "25.0", "100": "100.00"}
    edit_metrics(cand, lambda f: f.assign(depth=f["depth"].replace(respelled)))
    assert set(read_metrics(cand)["depth"]) >= {"25.0", "0.0"}
    res = gate(base, cand, "--fail-on", "regression", "--format", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    counts = statuses(res)
    assert counts["missing"] == counts["new"] == 0
    assert counts["unchanged"] == len(read_metrics(base))


def test_runs_measured_on_different_inputs_say_so_and_get_no_paired_test(run_dir, tmp_path):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    path = cand / "samples" / "niah" / "diff.jsonl"
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    changed = next(s for s in samples if setting_text(s["depth"]) == "25")
    assert changed[INPUT_KEY]  # the runner records every sample's input identity
    changed[INPUT_KEY] = "0" * 16  # another prompt under the same sample id
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    res = gate(base, cand, "--format", "json", "--fail-on", "regression")
    assert res.returncode == 1, res.stdout + res.stderr
    changes = json.loads(res.stdout)["changes"]
    differ = [c for c in changes if c["status"] == "inputs differ"]
    assert {(c["model"], c["setting"]["depth"]) for c in differ} == {
        ("diff", "25"),
        ("diff", "all"),
    }
    assert all(c["inputs_differ"] and c["n_pairs"] == 0 for c in differ)
    assert all(c["test"] not in ("McNemar exact", "sign-flip", "cluster sign-flip") for c in differ)
    assert all(c["status"] == "unchanged" for c in changes if c not in differ)
    text = gate(base, cand, "--fail-on", "regression")
    assert sum(line.startswith("inputs differ") for line in text.stdout.splitlines()) == 2
    assert text.stdout.rstrip().endswith("failed on 2 inputs differ")


def test_junit_output_parses_with_one_failure_per_regression(run_dir, tmp_path):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    shift_value(cand, HEADLINE, -0.10)
    result = compare_runs(base, cand, {}, fail_on=["regression"])
    root = ET.fromstring(render_junit(result))
    cases = root.findall(".//testcase")
    assert len(cases) == len(read_metrics(base))
    failures = [c for c in cases if c.find("failure") is not None]
    assert len(failures) == 1
    assert "depth=all" in failures[0].get("name", "")
    assert root.find("testsuite").get("failures") == "1"  # type: ignore[union-attr]


def test_map_matches_a_renamed_model_label(run_dir, tmp_path):
    base, cand = copy_run(run_dir, tmp_path / "base"), copy_run(run_dir, tmp_path / "cand")
    edit_metrics(cand, lambda f: f.assign(model=f["model"].replace({"diff": "diff-v2"})))
    old = cand / "samples" / "niah" / "diff.jsonl"
    lines = [json.loads(x) for x in old.read_text().splitlines()]
    (old.parent / "diff-v2.jsonl").write_text(
        "".join(json.dumps({**s, "model": "diff-v2"}) + "\n" for s in lines)
    )
    old.unlink()
    per_model = len(read_metrics(base)) // 3
    unmapped = compare_runs(base, cand, {})
    assert unmapped.count("missing") == unmapped.count("new") == per_model
    mapped = gate(base, cand, "--map", "diff=diff-v2", "--format", "json")
    counts = statuses(mapped)
    assert counts["missing"] == counts["new"] == 0
    assert counts["unchanged"] == 3 * per_model


def test_compare_two_models_of_one_run(run_dir):
    res = run_cli(
        run_dir.parent, "compare", str(run_dir), "--models", "diff,base", "--format", "md"
    )
    assert res.returncode == 0, res.stderr
    assert "| status | task | metric |" in res.stdout
    assert "base vs diff" in res.stdout
    with pytest.raises(DiffbenchError, match="'nope' is not a model"):
        compare_models(run_dir, "diff", "nope")


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda run, other: [str(run.parent), str(run)], "not a diffbench run directory"),
        (lambda run, other: [str(run), str(other)], "no rows in common"),
        (lambda run, other: [str(run), str(run), "--tolerance", "recall=0.1"], "unknown metric"),
    ],
)
def test_bad_compare_input_fails_with_one_line(run_dir, tmp_path, make_args, fragment):
    other = copy_run(run_dir, tmp_path / "other")
    edit_metrics(other, lambda f: f.assign(length="4096"))
    res = run_cli(tmp_path, "compare", *make_args(run_dir, other))
    assert_one_line_error(res, fragment)


SWEPT = ["base", "base@logit_bits=16", "base@logit_bits=8"]
SWEPT += ["diff", "diff@logit_bits=16", "diff@logit_bits=8"]


def pairs(models: list[str], reference: str) -> list[tuple[str, str, bool]]:
    return [(p.against, p.model, p.within) for p in variants.pairs(models, reference)]


def test_a_variant_is_compared_with_the_reference_at_its_value_and_with_its_first_value():
    assert pairs(SWEPT, "base") == [
        ("base@logit_bits=16", "base@logit_bits=8", True),
        ("base", "diff", False),
        ("base@logit_bits=16", "diff@logit_bits=16", False),
        ("base@logit_bits=8", "diff@logit_bits=8", False),
        ("diff@logit_bits=16", "diff@logit_bits=8", True),
    ]
    # Named by one of its variants, the reference is still the whole model (compare found none
    # of its variants then, and compared base@logit_bits=16 with the unswept diff only).
    assert pairs(SWEPT, "base@logit_bits=16") == pairs(SWEPT, "base")


def test_a_variant_whose_reference_lacks_its_value_is_compared_with_no_other_value():
    # The edge case that set the report apart from compare: the report compared
    # diff@logit_bits=8 with the unswept base (another value), compare with nothing. Now neither
    # does; the variant keeps the comparison with its own first value.
    models = ["base", "diff", "diff@logit_bits=16", "diff@logit_bits=8"]
    assert pairs(models, "base") == [
        ("base", "diff", False),
        ("diff@logit_bits=16", "diff@logit_bits=8", True),
    ]


def test_variants_of_two_merged_sweeps_pair_within_each_key_and_keep_their_run_suffix():
    # compare paired a model's variants with its first one under the first key only.
    models = ["base@bits=16", "base@bits=8", "base@batch=1", "base@batch=4"]
    assert pairs(models, "base@bits=16") == [
        ("base@bits=16", "base@bits=8", True),
        ("base@batch=1", "base@batch=4", True),
    ]
    # A merged run's suffix follows KEY=VALUE: the report looked for base@first@bits=8, missed,
    # and compared diff@bits=8@first with the reference at 16 bits.
    merged = ["base@bits=16@first", "base@bits=8@first", "diff@bits=16@first", "diff@bits=8@first"]
    assert ("base@bits=8@first", "diff@bits=8@first", False) in pairs(merged, merged[0])
    for against, model, within in pairs(merged, merged[0]):
        assert within or variants.value_of(against) == variants.value_of(model)


def test_compare_models_pairs_sweep_variants_at_the_same_value_as_the_report(tmp_path_factory):
    run = sweep_suite_run(tmp_path_factory.getbasetemp())
    result = compare_models(run, "tiny-base", "tiny-diff")
    assert {(c.task, c.model) for c in result.changes} == {
        ("niah", "tiny-diff vs tiny-base"),
        ("zeroshot", "tiny-diff@logit_bits=16 vs tiny-base@logit_bits=16"),
        ("zeroshot", "tiny-diff@logit_bits=4 vs tiny-base@logit_bits=4"),
        ("zeroshot", "tiny-base@logit_bits=4 vs tiny-base@logit_bits=16"),
        ("zeroshot", "tiny-diff@logit_bits=4 vs tiny-diff@logit_bits=16"),
    }
    one = compare_models(run, "tiny-base@logit_bits=4", "tiny-diff@logit_bits=4")
    assert {c.model for c in one.changes} == {"tiny-diff@logit_bits=4 vs tiny-base@logit_bits=4"}
    with pytest.raises(DiffbenchError, match="share no swept value"):
        compare_models(run, "tiny-base@logit_bits=16", "tiny-diff@logit_bits=4")
