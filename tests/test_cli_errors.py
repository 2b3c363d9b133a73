"""Bad input: one clear line on stderr, exit status 2, nothing written, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import models_arg, run_cli
from diffbench.backends.hf import coerce_options
from diffbench.errors import DiffbenchError
from diffbench.models import ModelSpec
from test_stats import shared_run


def assert_one_line_error(res, *fragments: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("diffbench: error:")]
    assert len(errors) == 1, res.stderr
    assert all(line.startswith("diffbench: ") for line in lines), res.stderr  # no library noise
    for f in fragments:
        assert f in errors[0], errors[0]


# ---- the table: every command and option, run in a scratch folder holding these files -----

CONFIGS = {
    "broken.yaml": "tasks: [niah\nmodels: {a: b\n",
    "list.yaml": "- niah\n- icl\n",
    "unknown-key.yaml": "tasks: niah\ncolour: red\n",
    "tasks-number.yaml": "tasks: 5\n",
    "tasks-empty.yaml": "tasks: []\n",
    "models-list.yaml": "models: [tiny-base]\n",
    "models-nospec.yaml": "models: {a: {batch_size: 4}}\n",
    "models-label.yaml": "models: {'a/b': tiny-base}\n",
    "models-spec.yaml": "models: {a: {spec: [tiny-base]}}\n",
    "options-list.yaml": "options: [niah]\n",
    "options-task.yaml": "options: {niah: 3}\n",
    "options-float.yaml": "options: {niah: {samples: 2.5}}\n",
    "options-other-task.yaml": "options: {icl: {shots: 4}}\n",
    "seed.yaml": "seed: abc\n",
    "limit.yaml": "limit: 0\n",
    "limit-bool.yaml": "limit: true\n",
    "output.yaml": "output: existing.txt\n",
    "output-list.yaml": "output: [a, b]\n",
    "sweep.yaml": "sweep: {logit_bits: []}\n",
}

RUN = ["run", "--no-report"]
CASES: list[tuple[list[str], str]] = [
    # the command itself
    ([], "required: command"),
    (["frob"], "invalid choice: 'frob'"),
    (["list", "extra"], "unrecognized arguments: extra"),
    # run: the command line's form
    ([*RUN, "--bogus"], "unrecognized arguments: --bogus"),
    ([*RUN, "stray"], "unrecognized arguments: stray"),
    ([*RUN, "--tasks", ""], "malformed --tasks ''"),
    ([*RUN, "--tasks", "niah,,icl"], "malformed --tasks"),
    ([*RUN, "--tasks", "niah,niah"], "malformed --tasks"),
    ([*RUN, "--models", ""], "malformed --models ''"),
    ([*RUN, "--models", "=x"], "malformed --models"),
    ([*RUN, "--models", "a=hf:"], "malformed --models entry 'a=hf:'"),
    ([*RUN, "--models", "a b=tiny-base"], "malformed --models entry 'a b=tiny-base'"),
    ([*RUN, "--models", "a=tiny-base,"], "empty entry"),
    ([*RUN, "--models", "a=tiny-base,a=tiny-diff"], "'a' appears twice"),
    ([*RUN, "--model-args", "tiny-base"], "malformed --model-args 'tiny-base'"),
    ([*RUN, "--model-args", ":batch_size=4"], "malformed --model-args ':batch_size=4'"),
    ([*RUN, "--model-args", "tiny-base:batch_size"], "malformed --model-args entry 'batch_size'"),
    ([*RUN, "--model-args", "nope:batch_size=4"], "names 'nope', which is not a model"),
    ([*RUN, "--set", "niahsamples=3"], "malformed --set 'niahsamples=3'"),
    ([*RUN, "--set", "niah.samples"], "malformed --set 'niah.samples'"),
    ([*RUN, "--tasks", "niah", "--set", "icl.shots=4"], "names task 'icl', which is not in this"),
    ([*RUN, "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    ([*RUN, "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    ([*RUN, "--limit", "0"], "argument --limit: expected a positive integer, got '0'"),
    ([*RUN, "--limit", "-3"], "argument --limit: expected a positive integer"),
    ([*RUN, "--limit", "many"], "argument --limit: expected a positive integer"),
    ([*RUN, "--output", ""], "argument --output: expected a path"),
    ([*RUN, "--output", "existing.txt"], "existing.txt is a file, not a run directory"),
    ([*RUN, "--output", "existing.txt/run"], "existing.txt is not an existing folder"),
    ([*RUN, "--output", "missing/run"], "missing is not an existing folder"),
    ([*RUN, "--output", "folder"], "run directory folder holds other files"),
    # run: the YAML config
    ([*RUN, "--config", ""], "argument --config: expected a path"),
    ([*RUN, "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    ([*RUN, "--config", "folder"], "config file folder is a directory"),
    ([*RUN, "--config", "cfg/binary.yaml"], "cannot read config file cfg/binary.yaml"),
    ([*RUN, "--config", "cfg/broken.yaml"], "is not valid YAML"),
    ([*RUN, "--config", "cfg/list.yaml"], "must hold a mapping with keys tasks"),
    ([*RUN, "--config", "cfg/unknown-key.yaml"], "unknown keys in cfg/unknown-key.yaml: colour"),
    ([*RUN, "--config", "cfg/tasks-number.yaml"], "malformed tasks in cfg/tasks-number.yaml"),
    ([*RUN, "--config", "cfg/tasks-empty.yaml"], "malformed tasks in cfg/tasks-empty.yaml"),
    ([*RUN, "--config", "cfg/models-list.yaml"], "must map labels to specs"),
    ([*RUN, "--config", "cfg/models-nospec.yaml"], "model 'a' in cfg/models-nospec.yaml has no"),
    ([*RUN, "--config", "cfg/models-label.yaml"], "model label 'a/b' in cfg/models-label.yaml"),
    ([*RUN, "--config", "cfg/models-spec.yaml"], "spec must be a folder"),
    ([*RUN, "--config", "cfg/options-list.yaml"], "must map task names to their options"),
    ([*RUN, "--config", "cfg/options-task.yaml"], "options of 'niah' in cfg/options-task.yaml"),
    ([*RUN, "--config", "cfg/seed.yaml"], "seed in cfg/seed.yaml expects int, got 'abc'"),
    ([*RUN, "--config", "cfg/limit.yaml"], "limit in cfg/limit.yaml must be a positive integer"),
    ([*RUN, "--config", "cfg/limit-bool.yaml"], "limit in cfg/limit-bool.yaml expects int"),
    ([*RUN, "--config", "cfg/output.yaml"], "existing.txt is a file, not a run directory"),
    ([*RUN, "--config", "cfg/output-list.yaml"], "output in cfg/output-list.yaml must be"),
    # run: tasks and their options (the task plugins load, no model does)
    ([*RUN, "--tasks", "nope"], "unknown task 'nope'; available tasks: "),
    ([*RUN, "--set", "niah.colour=red"], "unknown option niah.colour"),
    ([*RUN, "--set", "niah.samples=many"], "niah.samples expects int, got 'many'"),
    ([*RUN, "--set", "niah.samples=0"], "niah: samples and distractors must be >= 1"),
    ([*RUN, "--set", "niah.mode=shout"], "niah.mode must be one of"),
    ([*RUN, "--set", "niah.lengths=256,,512"], "niah.lengths has an empty list item"),
    ([*RUN, "--set", "niah.preset=paper-1m"], "unknown niah preset 'paper-1m'"),
    (
        [*RUN, "--tasks", "lm-eval:arc_easy", "--set", "lm-eval.include_path=no-such-dir"],
        "include_path no-such-dir is not an existing folder",
    ),
    ([*RUN, "--tasks", "lm-eval:"], "an lm-eval task needs a name"),
    (
        [*RUN, "--tasks", "outliers", "--set", "outliers.activations=hidden_states,mlp"],
        "outliers: unknown activation type mlp",
    ),
    ([*RUN, "--tasks", "zeroshot", "--set", "zeroshot.choices=1"], "need choices >= 2"),
    ([*RUN, "--tasks", "zeroshot", "--set", "zeroshot.facts=0,2"], "facts must be between 1 and"),
    ([*RUN, "--tasks", "zeroshot", "--set", "zeroshot.facts=2,2"], "facts repeats a count"),
    ([*RUN, "--sweep", "logit_bits"], "malformed --sweep 'logit_bits': expected KEY=V1,V2"),
    ([*RUN, "--sweep", "logit_bits=16,,4"], "every value must be non-empty"),
    ([*RUN, "--config", "cfg/sweep.yaml"], "malformed sweep in cfg/sweep.yaml"),
    ([*RUN, "--tasks", "niah", "--sweep-tasks", "niah"], "--sweep-tasks needs --sweep"),
    (
        [*RUN, "--tasks", "niah", "--sweep", "logit_bits=16,8", "--sweep-tasks", "icl"],
        "sweep tasks icl are not tasks of this run (niah)",
    ),
    ([*RUN, "--sweep", "logit_bits=8", "--sweep-tasks", "zeroshot,"], "malformed --sweep-tasks"),
    ([*RUN, "--config", "cfg/options-float.yaml"], "niah.samples expects int, got 2.5"),
    ([*RUN, "--config", "cfg/options-other-task.yaml"], "options given for tasks not in this"),
    # run: models (resolved before anything is written)
    ([*RUN, "--models", "a=./does/not/exist"], "'./does/not/exist' is not an existing path"),
    ([*RUN, "--models", "a=existing.txt"], "existing.txt is a file, neither a checkpoint"),
    ([*RUN, "--models", "a=folder"], "model 'a': folder holds no config.json or .gguf"),
    ([*RUN, "--models", "a=vllm:tiny-base"], "the diffbench[vllm] extra provides"),
    ([*RUN, "--models", "a=nobody/not-cached"], "'nobody/not-cached' is not in the local cache"),
    # the one row that imports the backend (torch): the options' own table is below, in-process
    ([*RUN, "--models", "a=tiny-base", "--model-args", "a:batch_size=0"], "a:batch_size must be"),
    ([*RUN, "--models", "m=tiny-base", "--model-args", "m:dtype=flaot16"], "m:dtype must be one"),
    ([*RUN, "--models", "a=tiny-base", "--sweep", "logit_bits=16,0"], "a@logit_bits=0:logit_bits"),
    # report
    (["report"], "required: RUN_DIR"),
    (["report", ""], "expected a path"),
    (["report", "missing"], "run directory missing does not exist"),
    (["report", "existing.txt"], "existing.txt is a file, not a diffbench run directory"),
    (["report", "folder"], "folder is not a diffbench run directory (no run.json)"),
    (["report", "run", "./run"], "run directory run is given twice"),
    (["report", "run", "--output", ""], "argument --output: expected a path"),
    (["report", "run", "--output", "existing.txt"], "--output existing.txt is a file"),
    (["report", "run", "--output", "missing/report"], "missing is not an existing folder"),
    (["report", "run", "--reference", ""], "argument --reference: expected a value"),
    (["report", "run", "--reference", "nope"], "--reference 'nope' is not a model"),
    # plot
    (["plot"], "required: run_dir"),
    (["plot", "missing"], "run directory missing does not exist"),
    (["plot", "folder"], "folder is not a diffbench run directory"),
    (["plot", "run", "extra"], "unrecognized arguments: extra"),
    # compare: form, paths and output (nothing loaded)
    (["compare"], "required: BASELINE_DIR"),
    (["compare", "run"], "compare needs BASELINE_DIR CANDIDATE_DIR, or one DIR --models A,B"),
    (["compare", "missing", "run"], "run directory missing does not exist"),
    (["compare", "run", "folder"], "folder is not a diffbench run directory"),
    (["compare", "run", "run", "--models", "diff,base"], "compares two models of ONE run"),
    (["compare", "run", "--models", "diff,base", "--map", "a=b"], "--map applies to two runs"),
    (["compare", "run", "--models", "diff"], "malformed --models 'diff'"),
    (["compare", "run", "--models", ""], "malformed --models ''"),
    (["compare", "run", "run", "--format", "xml"], "invalid choice: 'xml'"),
    (["compare", "run", "run", "--adjust", "bonferroni"], "invalid choice: 'bonferroni'"),
    (["compare", "run", "run", "--fail-on", ","], "malformed --fail-on ','"),
    (["compare", "run", "run", "--output", "folder"], "--output folder is a folder"),
    (["compare", "run", "run", "--output", "missing/c.md"], "missing is not an existing folder"),
    # compare: against the runs' contents
    (["compare", "run", "run", "--tolerance", "-0.1"], "--tolerance '-0.1' must be a non-negative"),
    (["compare", "run", "run", "--tolerance", "recall=0.1"], "unknown metric recall"),
    (["compare", "run", "run", "--fail-on", "regresion"], "unknown --fail-on regresion"),
    (["compare", "run", "--models", "diff,nope"], "'nope' is not a model of run"),
    (["compare", "run", "run", "--map", "nope=diff"], "--map names 'nope'"),
    (["compare", "partial", "run"], "partial has no metrics.csv"),
    # runs
    (["runs", "extra"], "unrecognized arguments: extra"),
    (["runs", "--root", ""], "argument --root: expected a path"),
    (["runs", "--root", "missing"], "missing is not a directory"),
    (["runs", "--root", "existing.txt"], "existing.txt is not a directory"),
    # judge and serve (the hallucination task's commands)
    (["judge", "missing.jsonl", "--output", "o.jsonl"], "judge input missing.jsonl does not exist"),
    (["judge", "existing.txt", "--output", "o.txt"], "use a .jsonl or .csv file name"),
    (["judge", "existing.txt", "--output", "o.jsonl"], "existing.txt: line 1 is not valid JSON"),
    (["judge", "existing.txt", "--judge", "llm", "--output", "o.jsonl"], "needs an endpoint"),
    (["judge", "existing.txt", "--judge", "gpt", "--output", "o.jsonl"], "invalid choice: 'gpt'"),
    (["serve", "tiny-base", "--port", "0"], "--port must lie in 1..65535"),
    ([*RUN, "--tasks", "hallucination", "--set", "hallucination.threshold=2"], "must lie in"),
    # task instances, shipped suites, hub datasets, the dry run
    ([*RUN, "--tasks", "niah#"], "malformed task instance 'niah#'"),
    ([*RUN, "--tasks", "niah#a/b"], "malformed task instance 'niah#a/b'"),
    ([*RUN, "--tasks", "nope#x"], "unknown task 'nope'"),
    ([*RUN, "--tasks", "niah#x", "--set", "niah.samples=2"], "names task 'niah', which is not"),
    ([*RUN, "--config", "papr"], "config file papr does not exist (shipped suites, by name:"),
    (["datasets", "--yaml"], "unrecognized arguments: --yaml"),
]


@pytest.fixture(scope="module")
def scenery(tiny_pair, tmp_path_factory) -> Path:
    """The files the table's commands name: a real run, a file, a plain folder, YAML configs."""
    root = tmp_path_factory.mktemp("scenery")
    shutil.copytree(shared_run(tiny_pair, tmp_path_factory.getbasetemp()), root / "run")
    (root / "partial").mkdir()  # a run whose first write is all there is
    shutil.copy(root / "run" / "run.json", root / "partial" / "run.json")
    (root / "existing.txt").write_text("keep me\n")
    (root / "folder").mkdir()
    (root / "folder" / "notes.txt").write_text("not a run\n")
    (root / "cfg").mkdir()
    for name, text in CONFIGS.items():
        (root / "cfg" / name).write_text(text)
    (root / "cfg" / "binary.yaml").write_bytes(b"\xff\xfe\x00tasks: niah\n")
    return root


def snapshot(root: Path) -> dict[str, tuple[int, bytes] | None]:
    """Every path under `root` with its files' modification time and bytes (None for folders)."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize(("argv", "fragment"), CASES, ids=[" ".join(a) or "-" for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(scenery, tmp_path, argv, fragment):
    cwd = tmp_path / "cwd"
    shutil.copytree(scenery, cwd, symlinks=True)
    before = snapshot(cwd)
    res = run_cli(cwd, *argv)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.endswith("\n") and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("diffbench: error: "), res.stderr
    assert fragment in res.stderr, res.stderr
    assert res.stdout == ""
    assert snapshot(cwd) == before


def test_default_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "results").write_text("keep me\n")
    res = run_cli(tmp_path, "run", "--tasks", "niah", "--set", "niah.samples=1", "--no-report")
    assert_one_line_error(res, "results is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert (tmp_path / "results").read_text() == "keep me\n"


# ---- model options, checked where they are parsed (in-process: the backend is imported) ----


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"colour": "red"}, "unknown model option 'colour' for 'a'"),
        ({"batch_size": "0"}, "a:batch_size must be a positive integer or auto"),
        ({"batch_size": "many"}, "a:batch_size must be a positive integer or auto"),
        ({"max_length": "-5"}, "a:max_length must be 0"),
        ({"max_length": "1.5"}, "a:max_length expects int, got '1.5'"),
        ({"max_length": 1.5}, "a:max_length expects int, got 1.5"),
        ({"prefix_cache": "maybe"}, "a:prefix_cache expects true/false"),
        ({"dtype": "flaot16"}, "a:dtype must be one of float32, bfloat16, float16, auto"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"attn_implementation": "bogus"}, "a:attn_implementation 'bogus' is not a registered"),
        ({"logit_bits": "0"}, "a:logit_bits must be an integer from 2 to 16"),
        ({"logit_bits": "32"}, "a:logit_bits must be an integer from 2 to 16"),
        ({"logit_quant": "row"}, "a:logit_quant must be one of tensor, head"),
    ],
)
def test_bad_model_options_are_refused_before_loading(options, fragment):
    with pytest.raises(DiffbenchError) as err:
        coerce_options("a", options)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_good_model_options_and_builtin_models_pass_the_checks():
    from diffbench.models import check_spec

    opts = coerce_options("a", {"batch_size": "auto", "attn_implementation": "eager"})
    assert (opts.batch_size, opts.attn_implementation) == ("auto", "eager")
    check_spec(ModelSpec("a", "tiny-base", {"max_length": "512", "dtype": "auto"}))


def test_length_beyond_model_context_fails_and_keeps_scored_samples(cli, tiny_pair, tmp_path):
    out = tmp_path / "run"
    # Model a may use 2048 tokens and is scored in full; model b (1024) then fails.
    res = cli(
        "run",
        "--tasks",
        "niah",
        "--models",
        models_arg(tiny_pair).replace("diff=", "a=").replace("base=", "b="),
        "--model-args",
        "a:max_length=2048",
        "--set",
        "niah.lengths=256,2048",
        "--set",
        "niah.samples=1",
        "--set",
        "niah.mode=score",
        "--output",
        str(out),
    )
    assert_one_line_error(res, "niah length 2048", "maximum context of 1024")
    kept = (out / "samples" / "niah" / "a.jsonl").read_text().splitlines()
    assert len(kept) == 2 * 5


def test_a_later_task_beyond_the_context_stops_the_run_before_an_earlier_task_scores(
    cli, tiny_pair, tmp_path
):
    # Every task's requests are built when a model loads: niah must not run for minutes first.
    out = tmp_path / "run"
    res = cli(
        "run", "--tasks", "niah,throughput", "--models", f"a={tiny_pair['tiny-base']}",
        "--set", "niah.lengths=256", "--set", "throughput.lengths=1024", "--limit", "1",
        "--output", str(out),
    )  # fmt: skip
    assert_one_line_error(res, "throughput length 1024", "maximum context of 1024")
    assert not (out / "samples" / "niah" / "a.jsonl").exists()


def test_empty_haystack_file_fails(cli, tiny_pair, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    models = models_arg(tiny_pair)
    res = cli("run", "--tasks", "niah", "--models", models, "--set", f"niah.haystack={empty}")
    assert_one_line_error(res, "is empty")


def test_resume_into_a_directory_of_another_run_is_refused(cli, tiny_pair, tmp_path):
    out = tmp_path / "run"
    base = [
        "run",
        "--tasks",
        "niah",
        "--models",
        f"d={tiny_pair['tiny-diff']}",
        "--set",
        "niah.lengths=256",
        "--set",
        "niah.samples=1",
        "--set",
        "niah.mode=score",
        "--output",
        str(out),
        "--no-report",
    ]
    assert cli(*base).returncode == 0
    assert_one_line_error(cli(*base, "--seed", "7"), "different configuration")


def test_list_and_help_import_neither_torch_nor_transformers(tmp_path):
    code = (
        "import sys; from diffbench.cli import main\n"
        "for argv in (['list'], ['--help'], ['run', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "tiny-diff" in out.stdout and "niah" in out.stdout


PLUGIN = """
class GenerateOnly:
    \"\"\"A backend plugin that answers generation requests only.\"\"\"

    @classmethod
    def check(cls, spec):
        pass

    @classmethod
    def load(cls, spec):
        raise AssertionError("a model whose backend cannot answer the run is never loaded")

    def generate(self, requests):
        return []
"""


def test_a_backend_that_cannot_answer_a_tasks_requests_is_refused_before_any_model_loads(
    tmp_path,
):
    # A real plugin, installed the way pip installs one: a module and a dist-info folder whose
    # entry_points.txt registers it in the diffbench.backends group.
    site = tmp_path / "site"
    (site / "genonly-0.1.dist-info").mkdir(parents=True)
    (site / "genonly_backend.py").write_text(PLUGIN)
    (site / "genonly-0.1.dist-info" / "METADATA").write_text("Name: genonly\nVersion: 0.1\n")
    (site / "genonly-0.1.dist-info" / "entry_points.txt").write_text(
        "[diffbench.backends]\ngenonly = genonly_backend:GenerateOnly\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "diffbench.cli", "run", "--tasks", "niah,icl",
         "--models", "a=tiny-base,g=genonly:anything", "--output", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [
        "diffbench: error: model 'g' (genonly backend) cannot answer ChoiceRequest, "
        "which task niah sends"
    ]
    assert not (tmp_path / "out").exists()
