"""A run resolved once into a plan, and `run --dry-run`: the plan described from tokenizers
alone, one line per problem, no weights loaded, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from diffbench import plan
from diffbench.models import ModelSpec
from test_cli_errors import assert_one_line_error

SHIPPED = Path(__file__).resolve().parents[1] / "bench" / "models"


@pytest.fixture(scope="module")
def weightless(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped pair with its weights replaced by garbage: tokenizer and config load, the
    model cannot."""
    root = tmp_path_factory.mktemp("weightless")
    out = {}
    for name in ("tiny-diff", "tiny-base"):
        shutil.copytree(SHIPPED / name, root / name)
        (root / name / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
        out[name] = root / name
    return out


def test_dry_run_describes_every_task_and_model_from_tokenizers_alone(cli, tmp_path, weightless):
    models = f"diff={weightless['tiny-diff']},base={weightless['tiny-base']}"
    res = cli("run", "--tasks", "niah,icl,nll", "--models", models, "--limit", "2", "--dry-run")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()[3:]]
    assert {(r[0], r[1]) for r in rows} == {
        (t, m) for t in ("niah", "icl", "nll") for m in ("diff", "base")
    }
    for r in rows:  # requests, tokens, tokens after prefix sharing, longest / context
        tokens, shared = int(r[3].replace(",", "")), int(r[4].replace(",", ""))
        assert 0 < shared <= tokens and r[-1] == "1,024"
    icl = next(r for r in rows if r[0] == "icl")
    assert int(icl[4].replace(",", "")) < int(icl[3].replace(",", ""))  # demonstrations shared
    assert not (tmp_path / "results").exists()
    # The same run for real cannot load those weights: the dry run never read them.
    real = cli("run", "--tasks", "nll", "--models", models, "--limit", "1", "--no-report")
    assert_one_line_error(real, "cannot load model 'diff'")


@pytest.mark.slow  # lm-eval builds seven task definitions
def test_dry_run_of_the_paper_suite_on_the_shipped_pair_is_one_line_per_problem(
    cli, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    models = f"diff={SHIPPED / 'tiny-diff'},base={SHIPPED / 'tiny-base'}"
    res = cli("run", "--config", "paper", "--models", models, "--dry-run", "-q")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("diffbench: error:")]
    assert len(errors) == len(set(errors))
    expected = [
        "niah#4k on diff, base: niah length 4096 is beyond the model's maximum context of 1024",
        "niah#64k on diff, base: niah length 8192 is beyond",
        "nll on diff, base: nll: 65536 tokens",
        "throughput on diff, base: throughput length 2048",
        "icl#banking77: dataset banking77 is not in the hub cache",
        "hallucination: dataset qasper is not in the hub cache",
        "prefetch it: hf download --repo-type dataset Xnhyacinth/LongBench --revision ",
        "lm-eval:hellaswag on diff@logit_bits=16, diff@logit_bits=8",
    ]
    for fragment in expected:
        assert any(fragment in line for line in errors), (fragment, errors)
    # Outliers fits (its sequences are 512 tokens): the plan says what it would compute.
    assert "outliers  diff   782" in res.stdout.replace("  ", "  ")
    assert not (tmp_path / "results").exists()


def test_a_plan_resolves_each_models_backend_once_and_names_its_directory():
    cfg = plan.RunConfig(("niah",), (ModelSpec("a", str(SHIPPED / "tiny-base")),))
    resolved = plan.resolve(cfg)
    assert [pm.backend.__name__ for pm in resolved.models] == ["HFBackend"]
    assert resolved.output.name.startswith("niah__a__") and not resolved.problems
    assert plan.resolve(cfg).output == resolved.output  # the same run, the same place


def test_problems_shared_by_models_are_said_once():
    lines = plan.problem_lines(
        [plan.Problem("niah", "a", "too long"), plan.Problem("niah", "b", "too  long"),
         plan.Problem("", "c", "no weights"), plan.Problem("icl", "", "no dataset")]
    )  # fmt: skip
    assert lines == ["niah on a, b: too long", "model c: no weights", "icl: no dataset"]


def test_dry_run_of_a_prompt_beyond_the_context_is_one_line_for_all_models(cli, tmp_path):
    res = cli("run", "--tasks", "niah", "--set", "niah.lengths=4096", "--dry-run")
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "diffbench: error: niah on tiny-base, tiny-diff, tiny-diff2: niah length 4096 is beyond "
        "the model's maximum context of 1024 tokens; lower --set niah.lengths"
    ]
    assert "task  model" in res.stdout and not (tmp_path / "results").exists()
