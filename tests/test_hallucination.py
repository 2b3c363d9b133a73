"""The hallucination task: shipped data, prompts, truncation in the model's tokens, the run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from diffbench.api import GenerateRequest
from diffbench.backends.hf import HFBackend
from diffbench.errors import DiffbenchError
from diffbench.models import ModelSpec
from diffbench.tasks import hallucination
from diffbench.tasks.hallucination import TASK, HallucinationConfig
from diffbench.tasks.hallucination_data import generate


@pytest.fixture(scope="module")
def view():  # the shipped tiny-base's tokenizer (1024 tokens of context)
    backend = HFBackend.load(ModelSpec("tiny-base", "tiny-base"))
    yield backend.tokenizer_view()
    backend.close()


def test_shipped_files_are_what_the_generator_makes() -> None:
    for name, rows in generate.build().items():
        assert (generate.DATA_DIR / generate.FILES[name]).read_text() == generate.render(rows)


def test_shipped_answers_are_in_their_documents_and_tempting_ones_contradict_memory() -> None:
    for ex in hallucination.load("synthetic-qa"):
        assert ex.question and ex.reference.split()[-1].rstrip(".") in ex.document
    for line in (generate.DATA_DIR / "tempting.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["memory_answer"] not in row["document"]


def test_items_use_the_protocol_prompts_greedy_budget_and_stops(view) -> None:
    cfg = HallucinationConfig(samples=2)
    items = TASK.items(cfg, view, 0)
    assert len(items) == 6 and {it.setting["dataset"] for it in items} == set(hallucination.SHIPPED)
    qa = next(it for it in items if it.setting["dataset"] == "synthetic-qa")
    summary = next(it for it in items if it.setting["dataset"] == "synthetic-summary")
    assert isinstance(qa.request, GenerateRequest) and qa.request.stop == ("\n#",)
    assert qa.request.prompt.rstrip().endswith("#Answer#:") and "#Question#:" in qa.request.prompt
    assert summary.request.prompt.startswith("Generate a summary based on the information")
    assert summary.request.max_new_tokens == 48


def test_long_documents_are_cut_in_model_tokens_keeping_the_question(view, tmp_path: Path) -> None:
    doc = " ".join(f"Sentence {i} of the long report names the harbour." for i in range(400))
    data = tmp_path / "long.jsonl"
    data.write_text(
        json.dumps({"document": doc, "question": "What is named?", "reference": "The harbour"})
        + "\n"
    )
    cfg = HallucinationConfig(datasets=(str(data),), max_new_tokens=32)
    (item,) = TASK.items(cfg, view, 0)
    assert item.meta["truncated"] and item.meta["kept_tokens"] < item.meta["document_tokens"]
    assert doc.startswith(item.meta["document"]) and item.meta["cut_at_char"] == len(
        item.meta["document"]
    )
    assert "#Question#: What is named?" in item.request.prompt
    assert view.prompt_tokens(item.request.prompt) + 32 <= view.max_context
    capped = HallucinationConfig(datasets=(str(data),), max_document_tokens=50)
    assert TASK.items(capped, view, 0)[0].meta["kept_tokens"] == 50


def test_prompts_are_overridable_and_checked() -> None:
    with pytest.raises(ValueError, match="document"):
        HallucinationConfig(summary_prompt="Summarise this.")
    cfg = HallucinationConfig(summary_prompt="Sum up: {document}")
    assert cfg.summary_prompt == "Sum up: {document}"


def test_unreachable_hub_dataset_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    with pytest.raises(DiffbenchError, match=r"dataset xsum .* is not in the hub cache") as err:
        hallucination.load("xsum")
    assert "\n" not in str(err.value)
    assert "prefetch it: hf download --repo-type dataset EdinburghNLP/xsum" in str(err.value)


def test_default_run_with_the_overlap_judge_on_the_shipped_set(tmp_path: Path) -> None:
    res = run_cli(
        tmp_path,
        "run",
        "--tasks",
        "hallucination",
        "--set",
        "hallucination.samples=2",
        "--set",
        "hallucination.max_new_tokens=8",
        "--output",
        str(tmp_path / "run"),
    )
    assert res.returncode == 0, res.stderr
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    rates = metrics[metrics["metric"] == "hallucination_free"]
    assert set(rates["model"]) == {"tiny-base", "tiny-diff", "tiny-diff2"} and len(rates) == 9
    assert set(metrics["metric"]) == {"hallucination_free", "support", "rouge_l", "unparseable"}
    assert (tmp_path / "run" / "figures" / "hallucination_hallucination_free.png").is_file()
    samples = pd.read_json(
        tmp_path / "run" / "samples" / "hallucination" / "tiny-base.jsonl", lines=True
    )
    assert {"document", "output", "reference", "verdict", "supported"} <= set(samples.columns)
