"""The judges: verdict parsing, the offline overlap judge, the judge command's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from diffbench.errors import DiffbenchError
from diffbench.judge import (
    EndpointJudge,
    JudgeInput,
    OverlapJudge,
    judge_prompt,
    llm_verdict,
    make_judge,
    parse_spans,
    parse_verdict,
)

DOCUMENT = (
    "The town of Marlow Cross lies on the river Teyne. It was founded in 1743 by Edda Voss. "
    "Today Marlow Cross has a population of 12,400 people. Its main industry is glass blowing."
)

# Replies in the shapes judges really give: the protocol's bold markers, plain text, a quoted
# instruction before the real conclusion, and replies with no conclusion at all.
REPLY_TRUE = (
    "The proposed answer states that Marlow Cross was founded in 1743, which the document says "
    "directly.\n\n**Conclusion: True**"
)
REPLY_FALSE = (
    "The document says the town was founded by Edda Voss, not Karl Brandt.\n\n"
    '**Conclusion: False**\n\n**Problematic Spans: ["Karl Brandt", "1812"]**'
)
REPLY_QUOTED = (
    "I must end with Conclusion: True or Conclusion: False. The answer adds a mayor the document "
    "never names. Conclusion: false"
)
REPLY_REASONED = (
    "The document names Edda Voss as the founder, and the answer says so too.\n\n"
    "So the answer is supported.\nConclusion: True"
)
MALFORMED = ("The answer seems mostly fine.", "Conclusion: maybe", "")

# Reply -> (supported, parsed): the verdict shapes real judges write, and unreadable replies.
VERDICTS = [
    (REPLY_TRUE, True, True),
    (REPLY_FALSE, False, True),
    (REPLY_QUOTED, False, True),  # the instruction quoted first: the last verdict counts
    ("**Conclusion**: **True**", True, True),
    ("Conclusion - False", False, True),
    ("Conclusion: false.", False, True),
    ("**Conclusion:** True", True, True),
    ("Final answer: True", True, True),
    ("Conclusion:\nTrue", True, True),
    (REPLY_REASONED, True, True),
    ("The answer invents a mayor.\n\n### Conclusion\n**False**", False, True),
    ("Conclusion: The proposed answer is False.", False, True),
    ("Every detail is in the document.\n\n**True**", True, True),  # a bare last line
    ("It is true that the town lies on the Teyne.", False, False),  # "true" in prose: no verdict
    *((reply, False, False) for reply in MALFORMED),
]


@pytest.mark.parametrize(("reply", "supported", "parsed"), VERDICTS)
def test_llm_verdict_reads_the_conclusion_shapes_judges_write(
    reply: str, supported: bool, parsed: bool
) -> None:
    verdict = llm_verdict(reply)
    assert (verdict.supported, verdict.parsed) == (supported, parsed)
    assert parse_verdict(reply) == (supported if parsed else None) and verdict.raw == reply


def test_problematic_spans_are_read_from_a_false_verdict() -> None:
    assert parse_spans(REPLY_FALSE) == ("Karl Brandt", "1812")
    assert llm_verdict(REPLY_FALSE).spans == ("Karl Brandt", "1812")


def test_judge_prompt_holds_document_question_truth_and_proposal() -> None:
    item = JudgeInput("a", DOCUMENT, "In 1743.", "When was Marlow Cross founded?", "1743")
    prompt = judge_prompt(item)
    parts = ("#Document#: The town", "#Question#: When was", "#Ground Truth Answer#: 1743",
             "#Proposed Answer#: In 1743.", "Conclusion: True", "Conclusion: False")  # fmt: skip
    for part in parts:
        assert part in prompt
    assert "#Proposed Summary#" in judge_prompt(JudgeInput("b", DOCUMENT, "A town."))


def _overlap(output: str) -> tuple[bool, float, tuple[str, ...]]:
    v = OverlapJudge().judge_one(JudgeInput("x", DOCUMENT, output, reference="Founded in 1743."))
    return v.supported, v.support_score, v.spans


def test_overlap_flags_a_planted_unsupported_number() -> None:
    supported, _, spans = _overlap("Marlow Cross, on the river Teyne, was founded in 1812.")
    assert not supported and "1812" in spans


def test_overlap_flags_a_planted_unsupported_name() -> None:
    supported, _, spans = _overlap("Marlow Cross was founded in 1743 by Karl Brandt.")
    assert not supported and {"karl", "brandt"} <= set(spans)


def test_overlap_passes_a_faithful_paraphrase() -> None:
    supported, score, _ = _overlap(
        "Founded by Edda Voss in 1743, Marlow Cross sits on the Teyne and is home to 12,400 "
        "people, most known for blowing glass."
    )
    assert supported and score >= 0.7


def test_overlap_reports_rouge_l_against_the_reference() -> None:
    v = OverlapJudge().judge_one(JudgeInput("x", DOCUMENT, "It was founded in 1743.",
                                            reference="It was founded in 1743."))  # fmt: skip
    assert v.rouge_l == pytest.approx(1.0)


def test_llm_judge_without_endpoint_or_model_is_refused() -> None:
    with pytest.raises(DiffbenchError, match="needs an endpoint"):
        make_judge("llm")
    with pytest.raises(DiffbenchError, match="must start with http"):
        make_judge("llm", base_url="localhost:8000", model="m")


def test_endpoint_down_is_one_error_after_the_retries(tmp_path: Path) -> None:
    judge = EndpointJudge("http://127.0.0.1:9/v1", "m", cache=tmp_path / "c.jsonl", retries=1,
                          backoff_s=0.01)  # fmt: skip
    with pytest.raises(DiffbenchError, match="failed after 2 tries") as err:
        judge.judge([JudgeInput("a", DOCUMENT, "x")])
    assert "\n" not in str(err.value) and judge.calls == 0


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"id": "good", "document": DOCUMENT, "output": "Marlow Cross was founded in 1743."},
    {"id": "bad", "document": DOCUMENT, "output": "Marlow Cross was founded in 1812.",
     "question": "When was it founded?", "reference": "1743"},
]  # fmt: skip


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_judge_command_writes_one_row_per_input_and_resumes(tmp_path: Path, suffix: str) -> None:
    src = _write(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / f"out{suffix}"
    first = run_cli(tmp_path, "judge", str(src), "--judge", "overlap", "--output", str(out))
    assert first.returncode == 0, first.stderr
    assert "hallucination-free: 0.500 (1/2)" in first.stdout
    import pandas as pd

    table = pd.read_json(out, lines=True) if suffix == ".jsonl" else pd.read_csv(out)
    assert list(table["id"]) == ["good", "bad"]
    assert list(table["supported"].astype(str)) == ["True", "False"]
    assert {"support_score", "verdict"} <= set(table.columns)
    _write(src, [*ROWS, {"id": "new", "document": DOCUMENT, "output": "It lies on the Teyne."}])
    second = run_cli(tmp_path, "judge", str(src), "--output", str(out))
    assert second.returncode == 0, second.stderr
    assert "newly judged: 1" in second.stdout and "(2/3)" in second.stdout
    lines = out.read_text().splitlines()
    assert len(lines) == 3 + (suffix == ".csv")
