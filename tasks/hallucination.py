"""Contextual hallucination in summarisation and QA (paper §3.6, Table 4).

Protocol: ../shared/paper-protocols.md section 3 (Lookback Lens, Chuang et al. 2024). Each
document (with its question, for QA) is cut to fit the model in its own tokens, put in the
protocol's prompt, and answered greedily up to a token budget or a stop string; the output is
then judged against the document it was made from. The paper's number is the hallucination-free
rate per dataset.

Datasets: `synthetic-qa`, `synthetic-tempting` and `synthetic-summary` are the generated set
shipped in `hallucination_data/` (the default, offline); `xsum`, `cnndm`, `multinews`, `qasper`,
`hotpotqa` and `2wikimqa` load from the Hugging Face hub where it is reachable; any other name
is a local JSON Lines file with `document`, optional `question` and `reference`.

Judges (`diffbench.judge`): `overlap` (default, offline) or `llm`, the protocol's binary judge
over an OpenAI-compatible endpoint (`judge_base_url`, `judge_model`; `diffbench serve` makes any
local checkpoint one). A task never loads a model, so a local judge model is served, or run
afterwards with `diffbench judge` on the stored samples, which hold everything it needs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from diffbench import judge as judges
from diffbench.api import (
    SCORE_KEY,
    FigureSpec,
    GenerateRequest,
    Generation,
    Headline,
    Item,
    Metric,
    PaperRef,
    Response,
    Sample,
    TokenizerView,
    aggregate_means,
)
from diffbench.errors import DiffbenchError
from diffbench.jsonl import read_objects

DATA_DIR = Path(__file__).parent / "hallucination_data"
SHIPPED = {
    "synthetic-qa": "qa.jsonl",
    "synthetic-tempting": "tempting.jsonl",
    "synthetic-summary": "summary.jsonl",
}

# The protocol's generation prompts (Lookback Lens): CNN/DM's for summaries, XSum's one-sentence
# variant, and the same shape for QA. {document} and {question} are filled in; the answer cue
# ends the prompt (after the chat template, when the model has one).
SUMMARY_PROMPT = (
    "Generate a summary based on the information in the document.\n\n#Document#: {document}"
)
XSUM_PROMPT = (
    "Generate a summary comprising of 1 sentence for the given article.\n\n#Article#: {document}"
)
QA_PROMPT = (
    "Answer the question based on the information in the document.\n\n"
    "#Document#: {document}\n#Question#: {question}"
)
SUMMARY_CUE = "#Summary#:"
QA_CUE = "#Answer#:"


@dataclass(frozen=True)
class Example:
    id: str
    document: str
    question: str
    reference: str


# The hub datasets (their pinned sources: bench/sources.py).
HUB = ("xsum", "cnndm", "multinews", "qasper", "hotpotqa", "2wikimqa")


def _text(value: Any) -> str:
    """A field as text; LongBench's answer lists joined."""
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return "" if value is None else str(value)


@functools.cache
def _from_hub(name: str, cache: Path) -> tuple[Example, ...]:
    """Hub dataset `name` from its pinned source in hub cache `cache` (fetched unless offline)."""
    from diffbench import sources

    source = sources.get(name)
    table = sources.read(source, source.split)
    reference = "answers" if "answers" in source.columns else "summary"
    out = []
    for i, row in enumerate(table.rows):
        document, ref = _text(row["document"]), _text(row[reference])
        if not document.strip() or not ref.strip():
            missing = "document" if not document.strip() else reference
            raise DiffbenchError(
                f"dataset {name} ({source.repo}, split {source.split}): row {i + 1} has no "
                f"{missing}"
            )
        out.append(Example(f"{name}-{i}", document, _text(row.get("question")), ref))
    return tuple(out)


@functools.cache
def _from_jsonl(path: Path) -> tuple[Example, ...]:
    out = []
    for n, row in read_objects(path, "hallucination dataset file"):
        if not str(row.get("document") or "").strip():
            raise DiffbenchError(f"{path}: line {n} has no 'document'")
        if not isinstance(row.get("reference"), str | list) or not _text(row["reference"]):
            raise DiffbenchError(f"{path}: line {n} has no 'reference'")
        rid = str(row.get("id") or f"{path.stem}-{n}")
        question, reference = _text(row.get("question")), _text(row["reference"])
        out.append(Example(rid, str(row["document"]), question, reference))
    if not out:
        raise DiffbenchError(f"hallucination dataset file {path} holds no rows")
    if len({e.id for e in out}) != len(out):
        raise DiffbenchError(f"{path}: ids must be unique")
    return tuple(out)


def load(name: str) -> tuple[Example, ...]:
    """The examples of dataset `name`: shipped, a hub name, or a local .jsonl path."""
    if name in SHIPPED:
        return _from_jsonl(DATA_DIR / SHIPPED[name])
    if name in HUB:
        from diffbench import sources

        return _from_hub(name, sources.cache_root())
    path = Path(name).expanduser()
    if path.suffix == ".jsonl" or path.exists():
        return _from_jsonl(path)
    raise DiffbenchError(
        f"unknown hallucination dataset {name!r}: use {', '.join(SHIPPED)}, {', '.join(HUB)}, "
        "or a .jsonl path"
    )


def dataset_label(name: str) -> str:
    """A dataset's name in metrics and figures (a path's file stem)."""
    return name if name in SHIPPED or name in HUB else Path(name).stem


@dataclass(frozen=True)
class HallucinationConfig:
    """Options of the hallucination task; the defaults run in a minute on a CPU."""

    datasets: tuple[str, ...] = tuple(SHIPPED)
    samples: int = 12  # per dataset (the paper: 100)
    max_document_tokens: int = 0  # 0: whatever fits the context; the protocol cuts at ~2033
    max_new_tokens: int = 48  # the protocol: 256
    stop: tuple[str, ...] = ("\n#",)
    summary_prompt: str = SUMMARY_PROMPT
    xsum_prompt: str = XSUM_PROMPT
    qa_prompt: str = QA_PROMPT
    chat: bool = True  # the model's chat template, when it has one
    judge: Literal["overlap", "llm"] = "overlap"
    # overlap: every unit of the answer must be in the document (strict); lenient: every number,
    # ordinal, date, negation and name, and at least `threshold` of the other content words
    lenient: bool = False
    threshold: float = 0.7
    judge_base_url: str = ""  # llm: an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    judge_model: str = ""
    judge_api_key_env: str = "OPENAI_API_KEY"  # the variable's name; the key is never stored
    judge_cache: str = ""  # llm: the reply cache (default ~/.cache/diffbench/judge.jsonl)
    preset: str = ""

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets must name at least one dataset")
        if self.samples < 1 or self.max_new_tokens < 1 or self.max_document_tokens < 0:
            raise ValueError("samples and max_new_tokens must be >= 1, max_document_tokens >= 0")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], not {self.threshold}")
        prompts = {"summary_prompt": self.summary_prompt, "xsum_prompt": self.xsum_prompt,
                   "qa_prompt": self.qa_prompt}  # fmt: skip
        for name, prompt in prompts.items():
            if "{document}" not in prompt:
                raise ValueError(f"{name} must hold {{document}}")
        if "{question}" not in self.qa_prompt:
            raise ValueError("qa_prompt must hold {question}")
        if self.judge == "llm" and not (self.judge_base_url and self.judge_model):
            raise ValueError("judge=llm needs judge_base_url and judge_model")


PRESETS: dict[str, dict[str, Any]] = {
    # Table 4: six datasets, 100 samples each, documents cut at ~2K tokens, 256 new tokens,
    # judged by an LLM (set judge_base_url and judge_model).
    "paper": {
        "datasets": tuple(HUB), "samples": 100, "max_document_tokens": 2033,
        "max_new_tokens": 256, "judge": "llm",
    },
}  # fmt: skip


def _prompt_parts(cfg: HallucinationConfig, dataset: str, ex: Example) -> tuple[str, str]:
    """The prompt template (with {document}) for one example, and its answer cue."""
    if ex.question:
        return cfg.qa_prompt.replace("{question}", ex.question), QA_CUE
    return (cfg.xsum_prompt if dataset == "xsum" else cfg.summary_prompt), SUMMARY_CUE


def fit_document(
    cfg: HallucinationConfig, tokenizer: TokenizerView, template: str, cue: str, document: str
) -> tuple[str, int, int]:
    """The document cut, in the model's tokens, so that the prompt (question included) and the
    token budget fit its context; with its full and kept token counts."""
    full = tokenizer.count(document)

    def prompt(doc: str) -> str:
        return tokenizer.render(template.replace("{document}", doc), cue, cfg.chat)

    overhead = tokenizer.prompt_tokens(prompt(""))
    room = tokenizer.max_context - cfg.max_new_tokens - overhead
    keep = min(full, room)
    if cfg.max_document_tokens:
        keep = min(keep, cfg.max_document_tokens)
    if keep < 1:
        raise DiffbenchError(
            f"hallucination: the prompt without its document already takes {overhead} tokens; "
            f"with {cfg.max_new_tokens} new tokens nothing fits the model's context of "
            f"{tokenizer.max_context}; lower --set hallucination.max_new_tokens"
        )
    while True:
        doc = document if keep >= full else document[: tokenizer.char_offset(document, keep)]
        # Tokens may merge across the cut or the template: re-check the rendered prompt.
        if tokenizer.prompt_tokens(prompt(doc)) + cfg.max_new_tokens <= tokenizer.max_context:
            return doc, full, keep
        keep -= max(1, keep // 50)


class HallucinationTask:
    """The contextual hallucination task plugin."""

    name = "hallucination"
    description = "Contextual hallucination in summarisation and QA, judged against the document"
    config_type = HallucinationConfig
    presets = PRESETS
    metrics = (
        Metric("hallucination_free", unit="document"),
        Metric("support", "higher", "mean", "support", unit="document"),
        Metric("rouge_l", "higher", "mean", "rouge_l", unit="document"),
        Metric("unparseable", "lower", "proportion", "unparseable", unit="document"),
    )
    setting_keys = ("dataset",)
    headline = (Headline("hallucination_free"),)  # Table 4: one row per dataset
    # The paper's numbers beside the run's (report.md's first section). The shipped synthetic
    # sets have no paper number: each is set beside the mean of the paper's sets of its kind.
    paper = (
        PaperRef(
            "Table 4",
            "Hallucination-free rate, summarisation and QA",
            "hallucination_free",
            by=("dataset",),
            transformer={
                "xsum": "0.44", "cnndm": "0.32", "multinews": "0.42",
                "qasper": "0.28", "hotpotqa": "0.36", "2wikimqa": "0.29",
                "synthetic-qa": "0.31", "synthetic-tempting": "0.31", "synthetic-summary": "0.39",
            },
            diff={
                "xsum": "0.53", "cnndm": "0.41", "multinews": "0.61",
                "qasper": "0.39", "hotpotqa": "0.46", "2wikimqa": "0.36",
                "synthetic-qa": "0.40", "synthetic-tempting": "0.40", "synthetic-summary": "0.52",
            },
            note="GPT-4o judge, 100 samples per set; synthetic-qa/-tempting: the mean of the "
            "paper's QA sets, synthetic-summary: of its summarisation sets",
        ),
    )  # fmt: skip

    # The paper's Table 4 as bars: the hallucination-free rate per dataset, and ROUGE-L.
    figures = tuple(
        FigureSpec(
            "bars",
            (metric,),
            ("dataset",),
            metric,
            "Contextual hallucination",
            y_label=f"{label} (95% CI)",
            limits=(0.0, 1.0),
        )
        for metric, label in (
            ("hallucination_free", "hallucination-free rate"),
            ("rouge_l", "ROUGE-L"),
        )
    )

    def request_kinds(self, config: HallucinationConfig) -> tuple[type, ...]:
        """The request kinds its items use, whatever the config."""
        return (GenerateRequest,)

    def sources(self, config: HallucinationConfig) -> tuple[str, ...]:
        """The hub datasets (bench/sources.py) its items read."""
        return tuple(d for d in config.datasets if d in HUB)

    def items(self, config: HallucinationConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """One greedy generation per example, the first `samples` of each dataset."""
        out = []
        for name in config.datasets:
            label = dataset_label(name)
            for ex in load(name)[: config.samples]:
                template, cue = _prompt_parts(config, name, ex)
                doc, full, kept = fit_document(config, tokenizer, template, cue, ex.document)
                prompt = tokenizer.render(template.replace("{document}", doc), cue, config.chat)
                request = GenerateRequest(prompt, config.max_new_tokens, tuple(config.stop))
                meta = {
                    "document": doc, "question": ex.question, "reference": ex.reference,
                    "kind": "answer" if ex.question else "summary",
                    "document_tokens": full, "kept_tokens": kept, "truncated": kept < full,
                    "cut_at_char": len(doc),
                }  # fmt: skip
                out.append(Item(f"{label}/{ex.id}", request, {"dataset": label}, meta))
        return out

    def score(self, config: HallucinationConfig, item: Item, response: Response) -> Sample:
        """The output and the judge's verdict on it (against the document the model saw)."""
        assert isinstance(response, Generation)
        output = response.text.strip()
        verdict = _judge(config).judge([judges.JudgeInput(
            item.id, str(item.meta["document"]), output, str(item.meta["question"]),
            str(item.meta["reference"]),
        )])[0]  # fmt: skip
        rouge = verdict.rouge_l
        if rouge is None:
            rouge = judges.rouge_l(str(item.meta["reference"]), output)
        return {
            "output": output,
            "n_new_tokens": response.n_new_tokens,
            "supported": verdict.supported,
            "support": verdict.support_score,
            "parsed": verdict.parsed,
            "unparseable": float(not verdict.parsed),
            "rouge_l": rouge,
            "spans": list(verdict.spans),
            "verdict": verdict.raw,
            "judge": _judge(config).name,
            SCORE_KEY: float(verdict.supported),
        }

    def aggregate(self, config: HallucinationConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """Per model and dataset: hallucination-free rate, mean support, ROUGE-L, unparseable
        rate."""
        # `unparseable` from the judge's `parsed`, which samples stored before it existed hold.
        unparseable = (~samples["parsed"].astype(bool)).astype(float)
        return aggregate_means(
            self.name, samples.assign(unparseable=unparseable), self.metrics, self.setting_keys
        )


@functools.cache
def _judge(config: HallucinationConfig) -> judges.Judge:
    return judges.make_judge(
        config.judge,
        threshold=config.threshold,
        strict=not config.lenient,
        base_url=config.judge_base_url,
        model=config.judge_model,
        api_key_env=config.judge_api_key_env,
        cache=Path(config.judge_cache).expanduser() if config.judge_cache else None,
    )


TASK = HallucinationTask()
