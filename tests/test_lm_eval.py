"""lm-eval tasks through diffbench, and diffbench as an lm-eval model: parity with lm-eval's own
HF model on the shipped tiny checkpoints, over task YAMLs and JSON Lines files written here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from conftest import kill_when, run_cli
from diffbench.models import MODELS_DIR, ModelSpec
from diffbench.runner import RunConfig, run
from diffbench.tasks.haystack import CITIES, NEEDLE, magic_number, sentence

MC = "test_magic_mc"
GEN = "test_magic_gen"
PROMPT = (
    "{{passage}}\n\nWhat is the special magic number for {{city}}?\n"
    "The special magic number for {{city}} is:"
)


def magic_rows(n: int, seed: int) -> list[dict]:
    """Passages with two facts, a question about one, four seven-digit (multi-token) choices."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pair = rng.sample(CITIES, 2)
        numbers = [magic_number(rng), magic_number(rng)]
        facts = [NEEDLE.format(city=c, number=x) for c, x in zip(pair, numbers, strict=True)]
        parts = [sentence(rng), *facts]
        choices = [*numbers, magic_number(rng), magic_number(rng)]
        rng.shuffle(choices)
        rows.append({"id": i, "passage": " ".join(parts), "city": pair[0], "answer": numbers[0],
                     "choices": choices, "gold": choices.index(numbers[0])})  # fmt: skip
    return rows


def write_tasks(root: Path, n_test: int = 6) -> Path:
    """A folder of lm-eval YAMLs over local JSONL files: multiple choice (2-shot) and generation."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n, seed in (("fewshot", 4, 1), ("test", n_test, 2)):
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in magic_rows(n, seed)))
    data = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
        "test_split": "test",
        "fewshot_split": "fewshot",
        "num_fewshot": 2,
        "fewshot_config": {"sampler": "first_n"},
        "doc_to_text": PROMPT,
        "fewshot_delimiter": "\n\n",
        "target_delimiter": " ",
    }
    mc = {"task": MC, **data, "output_type": "multiple_choice", "doc_to_target": "gold",
          "doc_to_choice": "{{choices}}",
          "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}  # fmt: skip
    gen = {"task": GEN, **data, "output_type": "generate_until", "doc_to_target": " {{answer}}",
           "generation_kwargs": {"until": [".", "\n"], "max_gen_toks": 10},
           "metric_list": [{"metric": "exact_match", "ignore_case": True}]}  # fmt: skip
    (root / "mc.yaml").write_text(yaml.safe_dump(mc, sort_keys=False))
    (root / "gen.yaml").write_text(yaml.safe_dump(gen, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


def lm_eval_own(task: str, task_dir: Path, model: Path, limit: int) -> list[dict]:
    """lm-eval 0.4.13's HF model on `task`: its logged samples, in document order."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model), device="cpu", dtype="float32", batch_size=4)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                          bootstrap_iters=0, log_samples=True)  # fmt: skip
    assert out is not None
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def diffbench_run(tmp_path: Path, task: str, task_dir: Path, models: tuple[str, ...]) -> Path:
    cfg = RunConfig(
        tasks=(f"lm-eval:{task}",),
        models=tuple(ModelSpec(m, m) for m in models),
        task_options={f"lm-eval:{task}": {"include_path": str(task_dir)}},
        output=tmp_path / "run",
    )
    return run(cfg)


def samples_of(run_dir: Path, task: str, model: str) -> dict[int, dict]:
    path = run_dir / "samples" / f"lm-eval:{task}" / f"{model}.jsonl"
    return {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}


def test_multiple_choice_predictions_and_loglikelihoods_equal_lm_evals_hf_model(task_dir, tmp_path):
    run_dir = diffbench_run(tmp_path, MC, task_dir, ("tiny-base",))
    ours = samples_of(run_dir, MC, "tiny-base")
    theirs = lm_eval_own(MC, task_dir, MODELS_DIR / "tiny-base", limit=6)
    assert len(ours) == len(theirs) == 6
    for s in theirs:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        mine = ours[s["doc_id"]]
        assert max(abs(a - b) for a, b in zip(lls, mine["logprobs"], strict=True)) < 1e-4
        assert mine["prediction"] == max(range(len(lls)), key=lambda k: (lls[k], -k))
        assert mine["lm_eval"]["acc"] == s["acc"]
        assert mine["lm_eval"]["acc_norm"] == s["acc_norm"]
        assert mine["score"] == s["acc"]
        assert mine["chance"] == 1 / len(lls)  # a uniform pick among the document's choices
    metrics = pd.read_csv(run_dir / "metrics.csv")
    acc = metrics[metrics["metric"] == "acc"].iloc[0]
    assert acc["value"] == pytest.approx(sum(s["acc"] for s in theirs) / 6)
    assert acc["n"] == 6 and acc["stderr"] >= 0  # lm-eval's closed form (0 when all agree)


def test_generation_with_until_equals_lm_evals_hf_model(task_dir, tmp_path):
    run_dir = diffbench_run(tmp_path, GEN, task_dir, ("tiny-diff",))
    ours = samples_of(run_dir, GEN, "tiny-diff")
    theirs = lm_eval_own(GEN, task_dir, MODELS_DIR / "tiny-diff", limit=6)
    for s in theirs:
        assert ours[s["doc_id"]]["output"] == s["filtered_resps"][0]
        assert ours[s["doc_id"]]["lm_eval"]["exact_match"] == s["exact_match"]
        assert "chance" not in ours[s["doc_id"]]  # no choices, no uniform guess
    assert sum(s["exact_match"] for s in theirs) > 0  # the tiny DIFF model does retrieve


@pytest.mark.parametrize("model", ["tiny-base", "tiny-diff2"])
def test_diffbench_as_an_lm_eval_model_matches_the_run_task(task_dir, model):
    """The LM adapter, driven by lm-eval's own evaluator, gives the numbers lm-eval's own HF
    model gives (DIFF V2 included, which transformers knows once diffbench is imported); backend
    options pass through `--model_args` unchanged."""
    from diffbench.lm_eval import DiffbenchLM, register
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    register()
    assert get_model("diffbench") is DiffbenchLM
    lm = DiffbenchLM.create_from_arg_string(f"model={model},prefix_cache=False,batch_size=2")
    assert lm.backend.options.prefix_cache is False
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=[MC], task_manager=manager, limit=6,
                          bootstrap_iters=0, log_samples=True)  # fmt: skip
    theirs = lm_eval_own(MC, task_dir, MODELS_DIR / model, limit=6)
    ours = sorted(out["samples"][MC], key=lambda s: s["doc_id"])
    for a, b in zip(ours, theirs, strict=True):
        la = [float(r[0]) for r in a["filtered_resps"]]
        lb = [float(r[0]) for r in b["filtered_resps"]]
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-4
        assert a["acc"] == b["acc"]


def test_lm_eval_scores_pair_for_mcnemar_and_compare(task_dir, tmp_path):
    run_dir = diffbench_run(tmp_path, MC, task_dir, ("tiny-base", "tiny-diff"))
    info = json.loads((run_dir / "run.json").read_text())["task_info"][f"lm-eval:{MC}"]
    # Every mean-aggregated lm-eval metric is a proportion over documents, read from the
    # per-document values each sample keeps under `lm_eval` (acc_norm too, not only the score).
    assert info["sample_mean_metrics"] == ["acc", "acc_norm"]
    assert info["metrics"] == ["acc", "acc_norm"]
    acc = next(m for m in info["metric_defs"] if m["name"] == "acc")
    assert (acc["kind"], acc["key"], acc["unit"]) == ("proportion", "lm_eval.acc", "document")
    gate = run_cli(
        tmp_path, "compare", str(run_dir), "--models", "tiny-base,tiny-diff", "--format", "json"
    )
    assert gate.returncode == 0, gate.stderr
    changes = {c["metric"]: c for c in json.loads(gate.stdout)["changes"]}
    # tiny-diff retrieves every number, tiny-base none: 6 discordant pairs, McNemar's exact
    # p = 2 * 0.5^6, from the per-document values, for acc and acc_norm alike.
    for metric in ("acc", "acc_norm"):
        c = changes[metric]
        assert c["delta"] == 1.0 and c["test"] == "McNemar exact", c
        assert c["p_value"] == pytest.approx(2 * 0.5**6) and c["n_pairs"] == 6


def test_task_info_follows_the_include_path_of_the_config_it_is_given(task_dir, tmp_path):
    """Two folders define one task name with different metrics: each config's description is
    its own folder's, whichever was read before (the task keeps no record of past configs)."""
    import yaml
    from diffbench.api import TaskInfo, declared_metrics
    from diffbench.tasks.lm_eval_tasks import LmEvalConfig, task_for

    other = write_tasks(tmp_path / "other")
    mc = yaml.safe_load((other / "mc.yaml").read_text())
    (other / "mc.yaml").write_text(yaml.safe_dump({**mc, "metric_list": [{"metric": "acc_norm"}]}))
    task = task_for(MC)
    mine, theirs = LmEvalConfig(include_path=str(task_dir)), LmEvalConfig(include_path=str(other))
    first = TaskInfo.of(task, theirs)
    assert TaskInfo.of(task, mine).metrics == ("acc", "acc_norm")
    assert [h.metric for h in TaskInfo.of(task, mine).headline] == ["acc"]
    again = TaskInfo.of(task, theirs)
    assert again == first and again.metrics == ("acc_norm",)
    assert [h.metric for h in again.headline] == ["acc_norm"]
    assert declared_metrics(task, theirs) == again.metric_defs


@pytest.mark.slow  # three CLI runs (about 3 minutes on a busy 2-core machine)
def test_cli_run_writes_lm_eval_metrics_and_resumes_after_sigkill(tmp_path):
    tasks = write_tasks(tmp_path / "tasks", n_test=12)
    args = ["run", "--tasks", f"lm-eval:{MC}", "--models", "tiny-base,tiny-diff",
            "--set", f"lm-eval.include_path={tasks}", "--no-report"]  # fmt: skip
    killed = tmp_path / "killed"
    watched = killed / "samples" / f"lm-eval:{MC}" / "tiny-base.jsonl"
    kill_when([*args, "--output", str(killed)], tmp_path, watched, 1)
    resumed = run_cli(tmp_path, *args, "--output", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    clean = run_cli(tmp_path, *args, "--output", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    assert (killed / "metrics.csv").read_bytes() == (
        tmp_path / "clean" / "metrics.csv"
    ).read_bytes()
    metrics = pd.read_csv(killed / "metrics.csv")
    assert set(metrics["metric"]) == {"acc", "acc_norm"}
    assert (metrics["n"] == 12).all() and metrics["stderr"].notna().all()


@pytest.mark.slow
def test_unknown_lm_eval_task_is_one_line_exit_2(tmp_path):
    res = run_cli(tmp_path, "run", "--tasks", "lm-eval:no_such_task_xyz", "--no-report")
    assert res.returncode == 2, res.stderr
    assert "unknown lm-eval task 'no_such_task_xyz'" in res.stderr
    assert not (tmp_path / "results").exists()


def test_a_swept_lm_eval_task_draws_the_sweep_figure_from_its_rows_alone(tmp_path):
    import pandas as pd
    from diffbench.figures import sweep_figures

    metrics = pd.DataFrame(
        {
            "task": ["lm-eval:x"] * 2,
            "metric": ["acc"] * 2,
            "model": ["a@logit_bits=16", "a@logit_bits=4"],
            "value": [0.5, 0.4],
            "n": [10, 10],
            "stderr": [0.1, 0.1],
        }
    )
    # File names stay portable: no ':' from the lm-eval: prefix.
    drawn = sweep_figures("lm-eval:x", metrics, tmp_path)
    assert drawn and all(p.exists() and ":" not in p.name for p in drawn)


def test_a_third_party_task_family_resolves_its_prefix_through_its_entry_point(
    tmp_path, monkeypatch
):
    """`PREFIX:NAME` goes through the `diffbench.task_families` entry point PREFIX, whoever
    installs it; `--set PREFIX.KEY=VALUE` reaches every task of that family in the run."""
    from diffbench import registry

    (tmp_path / "toy_family.py").write_text(
        "from diffbench.registry import TaskFamily\n"
        "from diffbench.tasks.zeroshot import ZeroshotTask\n\n"
        "class Toy(ZeroshotTask):\n"
        "    def __init__(self, name):\n"
        "        self.name = 'toy:' + name\n\n"
        "FAMILY = TaskFamily(task=Toy, installed=lambda: True)\n"
    )
    info = tmp_path / "toy_family-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[diffbench.task_families]\ntoy = toy_family:FAMILY\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert registry.families()["toy"] == "toy_family:FAMILY"
    assert registry.installed("toy:anything") and not registry.installed("nope:anything")
    task = registry.load("toy:first")
    assert task.name == "toy:first" and task.config_type().samples >= 1
    tasks = ["toy:first", "toy:second", "niah"]
    assert registry.expand_sets(["toy.samples=2", "niah.samples=3"], tasks) == [
        "toy:first.samples=2", "toy:second.samples=2", "niah.samples=3"
    ]  # fmt: skip
    options = {"toy": {"samples": 2}, "toy:second": {"samples": 5}}
    assert registry.expand_options(options, tasks) == {
        "toy:first": {"samples": 2}, "toy:second": {"samples": 5}
    }  # fmt: skip


def test_an_lm_eval_task_is_found_without_importing_lm_eval_and_holds_only_its_name():
    """The registry finds `lm-eval:` through its family's entry point without importing lm-eval
    (nor diffbench.lm_eval); the task keeps no state, its config is plain data."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from diffbench import registry\n"
        "assert registry.installed('lm-eval:anything')\n"
        "task = registry.load('lm-eval:anything')\n"
        "config = task.config_type(limit=3)\n"
        "print(json.dumps([sorted(vars(task)), sorted(vars(config)), "
        "[m for m in sys.modules if m.startswith(('lm_eval', 'diffbench.lm_eval'))]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    state, config, imported = json.loads(out.stdout)
    assert state == ["description", "lm_name", "name"]
    assert config == ["bootstrap_iters", "include_path", "limit", "num_fewshot", "preset"]
    assert imported == []


def test_the_lm_eval_command_runs_the_shipped_diff_v2(task_dir, tmp_path):
    res = run_cli(tmp_path, "lm-eval", "--model", "diffbench", "--model_args", "model=tiny-diff2",
                  "--tasks", MC, "--include_path", str(task_dir), "--limit", "4")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert MC in res.stdout and "acc" in res.stdout
