"""scripts/train_pair.py end to end: the smoke preset trains a loadable matched pair."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_pair.py"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pair")
    subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out), "--seed", "0"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out


def test_smoke_training_loss_goes_down(smoke_run: Path) -> None:
    with (smoke_run / "training_curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert (smoke_run / "training_curves.png").stat().st_size > 0
    for model in ("tiny-base", "tiny-diff"):
        train = [float(r["lm_loss"]) for r in rows if r["model"] == model and r["split"] == "train"]
        assert len(train) >= 2
        assert train[-1] < train[0]


@pytest.mark.parametrize(
    ("name", "model_type"), [("tiny-base", "llama"), ("tiny-diff", "diffllama")]
)
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


def test_smoke_pair_runs_through_tasks(smoke_run: Path, cli, tmp_path: Path) -> None:
    models = f"diff={smoke_run / 'tiny-diff'},base={smoke_run / 'tiny-base'}"
    out = tmp_path / "run"
    res = cli(
        "run", "--tasks", "niah,icl", "--models", models, "--output", str(out), "--no-report",
        "--set", "niah.lengths=128", "--set", "niah.depths=0,100", "--set", "niah.samples=1",
        "--set", "icl.draws=1", "--set", "icl.test_size=4", "--set", "icl.max_shots=4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    for task in ("niah", "icl"):
        assert {r["model"] for r in rows if r["task"] == task} == {"diff", "base"}
    run = (out / "run.json").read_text()
    assert "DiffLlamaForCausalLM" in run and "LlamaForCausalLM" in run


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
