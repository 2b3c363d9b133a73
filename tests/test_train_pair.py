"""scripts/train_pair.py end to end: the smoke preset trains a loadable matched pair and checks
it by running diffbench's niah task."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_pair.py"


@pytest.fixture(scope="module")
def smoke_train(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The smoke preset's output folder and the script's stdout."""
    out = tmp_path_factory.mktemp("pair")
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out), "--seed", "0"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out, res.stdout


@pytest.fixture(scope="module")
def smoke_run(smoke_train: tuple[Path, str]) -> Path:
    return smoke_train[0]


@pytest.mark.slow
def test_smoke_training_loss_goes_down(smoke_run: Path) -> None:
    with (smoke_run / "training_curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert (smoke_run / "training_curves.png").stat().st_size > 0
    for model in ("tiny-base", "tiny-diff", "tiny-diff2"):
        train = [float(r["lm_loss"]) for r in rows if r["model"] == model and r["split"] == "train"]
        assert len(train) >= 2
        assert train[-1] < train[0]


@pytest.mark.parametrize(
    ("name", "model_type"),
    [("tiny-base", "llama"), ("tiny-diff", "diffllama"), ("tiny-diff2", "diff_v2")],
)
@pytest.mark.slow
def test_smoke_checkpoint_loads_and_runs_forward(
    smoke_run: Path, name: str, model_type: str
) -> None:
    path = smoke_run / name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == model_type
    assert (path / "README.md").read_text().startswith("---")
    ids = tokenizer("The special magic Oslo number is: 1234567.", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_smoke_niah_numbers_are_the_harness_runs(smoke_train: tuple[Path, str]) -> None:
    out, stdout = smoke_train
    run_dir = out / ".pair_check"
    run = json.loads((run_dir / "run.json").read_text())
    assert {m["architecture"] for m in run["models"].values()} == {
        "LlamaForCausalLM",
        "DiffLlamaForCausalLM",
        "DiffV2ForCausalLM",
    }
    niah = run["config"]["tasks"]["niah"]
    assert niah["mode"] == "both" and niah["lengths"] == [256]
    with (run_dir / "metrics.csv").open() as f:
        overall = [r for r in csv.DictReader(f) if r["depth"] == "all"]
    # Three models x two N/R settings x two modes, each an average over niah's five depths.
    assert len(overall) == 12 and {r["n"] for r in overall} == {"5"}
    acc = {
        (r["model"], f"{r['needles']}/{r['queries']}", r["mode"]): float(r["value"])
        for r in overall
    }
    for model in ("tiny-base", "tiny-diff"):
        card = (out / model / "README.md").read_text()
        for pair in ("1/1", "3/1"):
            score, generate = acc[(model, pair, "score")], acc[(model, pair, "generate")]
            assert f"| {model} | {pair} | {score:.2f} | {generate:.2f} |" in card
            assert f"NIAH {model} {pair} @ 256: score {score:.2f} generate {generate:.2f}" in stdout


@pytest.mark.slow
def test_smoke_niah_score_check_holds_every_choice_in_context(smoke_run: Path) -> None:
    for model in ("tiny-base", "tiny-diff"):
        path = smoke_run / ".pair_check" / "samples" / "niah" / f"{model}.jsonl"
        samples = [json.loads(line) for line in path.read_text().splitlines()]
        scored = [s for s in samples if s["mode"] == "score"]
        assert len(scored) == 10
        for s in scored:
            in_context = {n[1] for n in s["needle_list"] + s["decoy_list"]}
            # The smoke preset's 2 distractors: 3 choices, every one a number in the context.
            assert len(s["logprobs"]) == 3 and len(in_context) >= 3
            assert s["target"] in in_context


@pytest.mark.slow
def test_smoke_pair_runs_icl_through_the_cli(smoke_run: Path, cli, tmp_path: Path) -> None:
    models = f"diff={smoke_run / 'tiny-diff'},base={smoke_run / 'tiny-base'}"
    out = tmp_path / "run"
    res = cli(
        "run", "--tasks", "icl", "--models", models, "--output", str(out), "--no-report",
        "--set", "icl.draws=1", "--set", "icl.test_size=4", "--set", "icl.max_shots=4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows if r["task"] == "icl"} == {"diff", "base"}


@pytest.mark.slow
def test_the_cards_describe_the_presets_intent_labels(smoke_run: Path) -> None:
    """The smoke preset labels intents as the shipped pair does (names shuffled among the
    intents); the card said the `names` preset's own-name scheme whatever the preset."""
    for name in ("tiny-base", "tiny-diff"):
        card = (smoke_run / name / "README.md").read_text()
        assert "shuffled among the intents" in card
        assert "intents' own names" not in card
        assert "| keyed | documents | word values |" in card


def train_pair_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import train_pair

    return train_pair


def test_keyed_episodes_label_each_repeated_key_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    tp = train_pair_module(monkeypatch)
    for seed in range(20):
        doc = tp.keyed_episode(random.Random(seed), 200)
        label_of: dict[str, str] = {}
        for (prompt, _), (label, kind) in zip(doc[::2], doc[1::2], strict=True):
            key = prompt.split("utterance: ")[1].removesuffix("\nintent:")
            # Weighted exactly when the key was demonstrated before, with the same label.
            assert (kind == tp.LABEL) == (key in label_of)
            assert label_of.setdefault(key, label) == label
            assert label.strip() != key
        assert 2 <= len(label_of) <= 8


def test_word_values_make_some_answers_words(monkeypatch: pytest.MonkeyPatch) -> None:
    tp = train_pair_module(monkeypatch)

    def answers(word_values: float) -> list[str]:
        rng = random.Random(3)
        out = []
        for _ in range(200):
            for _, question in tp.retrieval_facts(rng, 3, word_values):
                out.append(question[-1][0].strip())
        return out

    assert all(a.isdigit() for a in answers(0.0))
    words = [a for a in answers(1.0) if not a.isdigit()]
    # The NIAH-format sequences (75%) keep their numbers; every other fact has a word value.
    assert 0.1 < len(words) / 600 < 0.4
    assert all(a.replace(" ", "").isalpha() for a in words)


@pytest.mark.slow
def test_smoke_pair_is_matched(smoke_run: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(smoke_run / "tiny-base")
    diff = AutoModelForCausalLM.from_pretrained(smoke_run / "tiny-diff")
    n_base = sum(p.numel() for p in base.parameters())
    n_diff = sum(p.numel() for p in diff.parameters())
    cfg = diff.config
    # Only the four lambda vectors per layer differ.
    assert n_diff - n_base == 4 * cfg.head_dim * cfg.num_hidden_layers
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
        assert getattr(base.config, key) == getattr(cfg, key)
    # DIFF V2: the same output heads; its extra query and lambda projections paid by its MLP.
    v2 = AutoModelForCausalLM.from_pretrained(smoke_run / "tiny-diff2")
    h, d, width = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    assert v2.config.num_attention_heads == h and v2.config.head_dim == d
    extra = (h * d + h) * width * cfg.num_hidden_layers
    mlp = 3 * width * cfg.num_hidden_layers * (cfg.intermediate_size - v2.config.intermediate_size)
    n_v2 = sum(p.numel() for p in v2.parameters())
    assert n_v2 - n_base == extra - mlp and abs(extra - mlp) <= 3 * width * cfg.num_hidden_layers


@pytest.mark.slow
def test_parallel_training_gives_the_lockstep_pair(smoke_run: Path, tmp_path: Path) -> None:
    """--parallel trains each model in its own process on the same batch stream: the weights are
    bit-for-bit those of lockstep training, and the curves hold the same rows."""
    out = tmp_path / "pair"
    cmd = [sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out), "--seed", "0"]
    subprocess.run([*cmd, "--parallel"], check=True, capture_output=True, text=True, timeout=600)
    for name in ("tiny-base", "tiny-diff", "tiny-diff2"):
        lockstep = AutoModelForCausalLM.from_pretrained(smoke_run / name).state_dict()
        parallel = AutoModelForCausalLM.from_pretrained(out / name).state_dict()
        assert lockstep.keys() == parallel.keys()
        for key, value in lockstep.items():
            assert torch.equal(value, parallel[key]), (name, key)
    with (smoke_run / "training_curves.csv").open() as f, (out / "training_curves.csv").open() as g:
        keep = ("model", "split", "step", "loss", "answer_loss")
        a = [tuple(r[k] for k in keep) for r in csv.DictReader(f)]
        b = [tuple(r[k] for k in keep) for r in csv.DictReader(g)]
    assert a == b
    # The two processes' folders and the shared tokenizer are gone once the pair is saved.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".pair_check"]


@pytest.mark.slow
def test_a_model_joined_to_a_trained_set_is_the_one_lockstep_training_gives(
    smoke_run: Path, tmp_path: Path
) -> None:
    """--join trains tiny-diff2 beside a trained pair on its tokenizer, batch stream and stage
    steps: the weights are bit-for-bit those of the three trained together; the curves are
    merged and every card describes the set."""
    out = tmp_path / "set"
    cmd = [sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out), "--seed", "0"]
    run = dict(check=True, capture_output=True, text=True, timeout=600)
    subprocess.run([*cmd, "--models", "tiny-base,tiny-diff"], **run)  # type: ignore[call-overload]
    assert not (out / "tiny-diff2").exists()
    subprocess.run([*cmd, "--models", "tiny-diff2", "--join"], **run)  # type: ignore[call-overload]
    lockstep = AutoModelForCausalLM.from_pretrained(smoke_run / "tiny-diff2").state_dict()
    joined = AutoModelForCausalLM.from_pretrained(out / "tiny-diff2").state_dict()
    for key, value in lockstep.items():
        assert torch.equal(value, joined[key]), key
    with (smoke_run / "training_curves.csv").open() as f, (out / "training_curves.csv").open() as g:
        keep = ("model", "split", "step", "tokens_seen", "loss")
        a = sorted(tuple(r[k] for k in keep) for r in csv.DictReader(f))
        b = sorted(tuple(r[k] for k in keep) for r in csv.DictReader(g))
    assert a == b
    for name in ("tiny-base", "tiny-diff", "tiny-diff2"):
        card = (out / name / "README.md").read_text()
        assert "`tiny-base` / `tiny-diff` / `tiny-diff2`" in card
        assert "`tiny-diff2` joined the set later (`--join`)" in card
        assert sum(line.startswith("| tiny-diff2 | ") for line in card.splitlines()) == 4


@pytest.mark.slow
def test_joining_with_another_seed_stops_at_the_first_logged_step(
    smoke_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "set"
    out.mkdir()
    for name in ("tiny-base", "training_curves.csv"):
        src = smoke_run / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        else:
            shutil.copy(src, out / name)
    cmd = [sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out), "--seed", "1"]
    res = subprocess.run([*cmd, "--models", "tiny-diff2", "--join"], capture_output=True, text=True)
    assert res.returncode != 0
    assert "error: at step 5" in res.stderr and "not the set's batch stream" in res.stderr
    assert not (out / "tiny-diff2").exists()


def test_parallel_refuses_a_preset_that_extends_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage lengthened until both answer losses broke needs both models in one process."""
    train_pair = train_pair_module(monkeypatch)
    smoke = train_pair.PRESETS["smoke"]
    train_pair.check_parallel(smoke)  # no extension: fine
    stage = dataclasses.replace(smoke.stages[0], max_extra_steps=100)
    extending = dataclasses.replace(smoke, stages=(stage, *smoke.stages[1:]))
    with pytest.raises(SystemExit, match="--parallel needs a preset without max_extra_steps"):
        train_pair.check_parallel(extending)


PROBE = SCRIPT.with_name("probe_icl.py")


@pytest.mark.slow
def test_the_icl_probe_trains_a_model_from_scratch_and_scores_every_episode_kind(tmp_path):
    out, log = tmp_path / "model", tmp_path / "log.json"
    subprocess.run(
        [sys.executable, str(PROBE), "train", "--model", "tiny-diff", "--steps", "4",
         "--every", "2", "--episodes", "3", "--out", str(out), "--json", str(log)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    rows = json.loads(log.read_text())["log"]
    assert [r["step"] for r in rows] == [2, 4]
    kinds = {"keyed-digits", "keyed-words", "intent-2", "intent-4", "intent-6", "toy-2", "toy-4"}
    for row in rows:
        assert kinds <= set(row) and row["label_loss"] > 0
        # Three episodes per kind: a share of them.
        assert all(row[k] in (0.0, 0.333, 0.667, 1.0) for k in kinds)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "diffllama"


@pytest.mark.slow
def test_the_icl_probe_finds_the_shipped_diff_binding_keys_to_numbers(tmp_path):
    log = tmp_path / "eval.json"
    subprocess.run(
        [sys.executable, str(PROBE), "eval", str(SCRIPT.parents[1] / "bench" / "models"),
         "--episodes", "20", "--json", str(log)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    acc = json.loads(log.read_text())["accuracy"]
    # docs/pair_copy.md: tiny-diff copies the number that followed a repeated key (chance
    # 0.25); tiny-base copies a number, not the key's.
    assert acc["tiny-diff"]["keyed-digits"] >= 0.7 > acc["tiny-base"]["keyed-digits"]


@pytest.mark.slow
def test_the_default_presets_batch_stream_is_the_one_that_trained_the_shipped_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default preset regenerates the shipped set's batches: the same non-pad token counts
    at every logged step through the first of stage 1, where the documents (and their summaries'
    wording, which the task changed after the set was trained) enter the stream."""
    train_pair = train_pair_module(monkeypatch)
    from transformers import PreTrainedTokenizerFast

    shipped = SCRIPT.parents[1] / "bench" / "models"
    rows = train_pair.read_curves(shipped)
    steps = train_pair.stage_steps(rows, 4)
    through = steps[0] + 50  # two logged steps into stage 1
    cut = [min(n, max(0, through - sum(steps[:i]))) for i, n in enumerate(steps)]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(shipped / "tiny-base")
    seen = train_pair.stream_tokens(train_pair.PRESETS["default"], tokenizer, 0, cut)
    want = {
        r["step"]: r["tokens_seen"]
        for r in rows
        if r["model"] == "tiny-base" and r["split"] == "train" and r["step"] <= through
    }
    assert len(want) == through // 25 and seen == want
