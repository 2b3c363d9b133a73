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


GAME = "In the board game Tidewatch, a week has eleven days. Players start on the third square."
WEEK = "In the board game Tidewatch, a week has seven days and a year has 21 weeks."
BRIDGE = "The bridge in Holtmere reopened on March 3, 1999, after two years of work."
FERRY = "The ferry does not run in winter. The museum opens every Thursday."
EVENT = "The bridge reopening in Brimhaven drew 4125 people on Thursday."
PARAPHRASE = (
    "Glass blowing is the main industry of Marlow Cross, a town of 12,400 people founded by "
    "Edda Voss in 1743 on the river Teyne."
)

# (document, output, supported): faithful and paraphrased outputs pass, planted facts fail.
OVERLAP = [
    (GAME, "A week has eleven days in Tidewatch.", True),
    (GAME, "A week has seven days in Tidewatch.", False),  # number-word swap
    (GAME, "A week has 7 days in Tidewatch.", False),
    (GAME, "Tidewatch weeks have 11 days.", True),  # digits for the document's number word
    (WEEK, "A week has 7 days in Tidewatch.", True),
    (WEEK, "In Tidewatch a year has twenty-one weeks.", True),
    (WEEK, "In Tidewatch a year has twenty-two weeks.", False),
    (WEEK, "In Tidewatch a year has a hundred weeks.", False),
    (GAME, "Players start on the 3rd square.", True),
    (GAME, "Players start on the fifth square.", False),  # ordinal swap
    (GAME, "Players start on the 2nd square.", False),
    (BRIDGE, "The Holtmere bridge reopened on 3 March 1999.", True),
    (BRIDGE, "The Holtmere bridge reopened on March 5, 1999.", False),  # date swap
    (BRIDGE, "The Holtmere bridge reopened on April 3, 1999.", False),
    (BRIDGE, "The Holtmere bridge reopened in March 1999.", True),
    (BRIDGE, "The Holtmere bridge reopened in 1999.", True),
    (BRIDGE, "The Holtmere bridge reopened in 2001.", False),
    (BRIDGE, "The Holtmere bridge reopened on 1999-03-03, after two years of work.", True),
    (FERRY, "In winter the ferry does not run.", True),
    (FERRY, "The ferry doesn't run in winter.", True),
    (FERRY, "The ferry runs in winter.", False),  # asserts what the document negates
    (FERRY, "The museum never opens on Thursday.", False),  # negates what the document asserts
    (FERRY, "The museum does not open every Thursday.", False),
    (FERRY, "Without the ferry, the museum opens every Thursday.", False),
    (FERRY, "The museum opens every Thursday.", True),
    (EVENT, "The lighthouse restoration in Brimhaven drew 4125 people on Thursday.", False),
    (EVENT, "The bridge reopening in Brimhaven drew 4125 tourists.", False),  # lowercase noun
    (EVENT, "Brimhaven's bridge reopening drew 4125 people.", True),  # reordered
    (EVENT, "4125 people were drawn to the reopening of the bridge in Brimhaven.", True),
    # A verb of its own is a paraphrase (the shipped pair writes "attended" for "drew"); an
    # invented event beside it is not.
    (EVENT, "4125 people attended the bridge reopening in Brimhaven.", True),
    (EVENT, "4125 people attended the lighthouse restoration in Brimhaven.", False),
    (EVENT, "4125 people attended the bridge reopening in Holtmere.", False),
    (EVENT, "The bridge reopening in Brimhaven drew 4.125 thousand people.", True),
    (DOCUMENT, PARAPHRASE, True),  # the document's own words, reordered and reinflected
    (DOCUMENT, "Marlow Cross, on the river Teyne, was founded in 1812.", False),
    (DOCUMENT, "Marlow Cross was founded in 1743 by Karl Brandt.", False),
    (DOCUMENT, "Marlow Cross was founded in 1743 and is famous for its cathedral.", False),
    (DOCUMENT, "", False),
]


@pytest.mark.parametrize(("document", "output", "supported"), OVERLAP)
def test_overlap_passes_faithful_outputs_and_fails_planted_facts(
    document: str, output: str, supported: bool
) -> None:
    verdict = OverlapJudge().judge_one(JudgeInput("x", document, output))
    assert verdict.supported is supported, verdict.raw
    assert 0.0 <= verdict.support_score <= 1.0


def _overlap(output: str) -> tuple[bool, float, tuple[str, ...]]:
    v = OverlapJudge().judge_one(JudgeInput("x", DOCUMENT, output, reference="Founded in 1743."))
    return v.supported, v.support_score, v.spans


def test_overlap_names_the_unsupported_spans() -> None:
    supported, score, spans = _overlap("Marlow Cross was founded in 1812 by Karl Brandt.")
    assert not supported and set(spans) == {"1812", "Karl", "Brandt"}
    assert score == pytest.approx(1 - 3 / 6)


def test_overlap_without_strict_lets_content_words_pass_at_the_threshold() -> None:
    lenient = OverlapJudge(threshold=0.7, strict=False)
    item = JudgeInput("x", DOCUMENT, "Marlow Cross, on the river Teyne, makes glass.")
    assert lenient.judge_one(item).supported and not OverlapJudge().judge_one(item).supported
    planted = JudgeInput("y", DOCUMENT, "Marlow Cross, on the river Teyne, has 900 people.")
    assert not lenient.judge_one(planted).supported


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


def test_judge_command_lenient_lets_content_words_pass_at_the_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffbench.cli import main

    row = {"id": "a", "document": DOCUMENT, "output": "Marlow Cross, on the Teyne, makes glass."}
    src = _write(tmp_path / "in.jsonl", [row])
    for flags, rate in (((), "0.000 (0/1)"), (("--lenient",), "1.000 (1/1)")):
        out = tmp_path / f"out{len(flags)}.jsonl"
        assert main(["judge", str(src), *flags, "--output", str(out)]) == 0
        assert f"hallucination-free: {rate}" in capsys.readouterr().out
