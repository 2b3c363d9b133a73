"""A built-in zero-shot multiple-choice task: recall of facts stated in a short passage.

Made for the paper's Figure 8 (zero-shot accuracy vs attention-logit bits; see
../shared/paper-protocols.md section 4): it runs offline and deterministically on a CPU, and the
shipped tiny pair scores well above chance on it, so quantizing the attention logits has an
accuracy to lose. HellaSwag and the paper's other zero-shot tasks come through lm-eval.

Each example is a passage of haystack prose holding `facts` facts, then a question about one of
them, with `choices` answer choices: the true value, the values of the passage's other facts, and
(where the passage holds fewer facts than choices) values that are nowhere in it. `facts` is a
list, one row per count, like NIAH's N: with one fact a model need only tell the passage's value
from absent ones, with more it must bind the value to the asked key, since every other fact's
value is in the passage too. Chance is 1 / choices on every row. Facts take one of the formats
below (`format`): the needle sentence of the NIAH task, or a short key-value line. No
demonstrations precede the question (zero-shot), and no chat template wraps it: the answer is
the likeliest continuation, scored as lm-eval scores a multiple-choice task (`acc`). Everything
comes from the seed alone.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

import pandas as pd
from diffbench.api import (
    ALL,
    CHANCE_KEY,
    SCORE_KEY,
    ChoiceRequest,
    ChoiceScores,
    FigureSpec,
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
from diffbench.tasks import haystack as hs

# (fact, question, answer prefix), each with {key} and the fact with {value}.
FORMATS: dict[str, tuple[str, str, str]] = {
    "needle": (hs.NEEDLE.replace("{city}", "{key}").replace("{number}", "{value}"),
               hs.QUESTION.replace("{city}", "{key}"),
               hs.ANSWER_PREFIX.replace("{city}", "{key}")),
    "passkey": ("The pass key for {key} is {value}.", "What is the pass key for {key}?",
                "The pass key for {key} is"),
    "code": ("Code for {key}: {value}.", "What is the code for {key}?", "Code for {key}:"),
}  # fmt: skip


@dataclass(frozen=True)
class ZeroshotConfig:
    """Options of the zeroshot task; the defaults run in well under a minute per tiny model."""

    samples: int = 60  # examples per format and fact count
    formats: tuple[str, ...] = tuple(FORMATS)
    facts: tuple[int, ...] = (1, 2, 4)  # facts in a passage, one row each
    choices: int = 4  # answer choices: the passage's values first, then values absent from it
    filler: int = 6  # haystack sentences around the facts
    preset: str = ""

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"unknown format {', '.join(bad)}; known: {', '.join(FORMATS)}")
        if self.samples < 1 or self.filler < 0:
            raise ValueError("samples must be >= 1 and filler >= 0")
        if not self.facts or not all(1 <= n <= len(hs.CITIES) for n in self.facts):
            raise ValueError(f"facts must be between 1 and {len(hs.CITIES)}")
        if len(set(self.facts)) != len(self.facts):
            raise ValueError("facts repeats a count")
        if self.choices < 2:
            raise ValueError("need choices >= 2")


PRESETS: dict[str, dict[str, Any]] = {"full": {"samples": 500}}


def example(
    cfg: ZeroshotConfig, fmt: str, facts: int, seed: int, index: int
) -> tuple[str, str, list[str]]:
    """(passage + question, answer prefix, choices with the true value first) of one example
    whose passage holds `facts` facts."""
    rng = random.Random(f"zeroshot|{seed}|{fmt}|{facts}|{index}")
    fact, question, prefix = FORMATS[fmt]
    keys = rng.sample(hs.CITIES, facts)
    # The passage's values, then the absent ones that fill the choices up.
    values: list[str] = []
    while len(values) < max(facts, cfg.choices):
        v = hs.magic_number(rng)
        if v not in values:
            values.append(v)
    filler = [hs.sentence(rng) for _ in range(cfg.filler)]
    slots = sorted(rng.randint(0, len(filler)) for _ in keys)
    parts: list[str] = []
    start = 0
    for slot, key, value in zip(slots, keys, values[:facts], strict=True):
        parts += filler[start:slot]
        parts.append(fact.format(key=key, value=value))
        start = slot
    parts += filler[start:]
    asked = rng.randrange(facts)
    in_passage = [v for i, v in enumerate(values[:facts]) if i != asked]
    wrong = rng.sample(in_passage, min(len(in_passage), cfg.choices - 1))
    choices = [values[asked], *(wrong + values[facts:])[: cfg.choices - 1]]
    text = f"{' '.join(parts)}\n\n{question.format(key=keys[asked])}\n"
    return text, prefix.format(key=keys[asked]), choices


class ZeroshotTask:
    """The zero-shot fact-recall multiple-choice task plugin."""

    name = "zeroshot"
    description = "Zero-shot multiple choice: recall a fact from a short passage (Figure 8's task)"
    config_type = ZeroshotConfig
    presets = PRESETS
    metrics = (Metric("accuracy", unit="passage"),)  # each question has its own passage
    setting_keys = ("format", "facts")
    headline = (Headline("accuracy", {"format": ALL}),)  # a row per fact count
    # The paper's Figure 8 beside the run's, for a run with --sweep logit_bits=16,8,6,4.
    paper = (
        PaperRef(
            "Figure 8",
            "Zero-shot accuracy vs attention-logit bits",
            "accuracy",
            {"format": ALL},
            by=("facts",),
            variant_key="logit_bits",
            note="HellaSwag, no exact numbers given: DIFF holds 16→6 bits; Transformer drops at "
            "6; 4-bit DIFF ≈ +25 points",
        ),
    )

    # None of its own: accuracy against a swept option is the sweep figure every task gets.
    figures: tuple[FigureSpec, ...] = ()

    def request_kinds(self, config: ZeroshotConfig) -> tuple[type, ...]:
        """The request kinds its items use, whatever the config."""
        return (ChoiceRequest,)

    def items(self, config: ZeroshotConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """One choice request per example, format and fact count, the choices in a seeded
        order."""
        out = []
        for fmt, facts, i in itertools.product(config.formats, config.facts, range(config.samples)):
            text, prefix, choices = example(config, fmt, facts, seed, i)
            target = choices[0]
            random.Random(f"zeroshot|{seed}|{fmt}|{facts}|{i}|order").shuffle(choices)
            request = ChoiceRequest(text, prefix, tuple(" " + c for c in choices), "best")
            if tokenizer.prompt_tokens(text + prefix) + 16 > tokenizer.max_context:
                raise DiffbenchError(
                    f"zeroshot passages do not fit the model's context of "
                    f"{tokenizer.max_context} tokens; lower zeroshot.filler"
                )
            meta = {"target": target, "target_index": choices.index(target)}
            setting = {"format": fmt, "facts": facts}
            out.append(Item(f"{fmt}-{facts}f-{i}", request, setting, meta))
        return out

    def score(self, config: ZeroshotConfig, item: Item, response: Response) -> Sample:
        """Whether the likeliest choice is the true value."""
        assert isinstance(response, ChoiceScores)
        assert isinstance(item.request, ChoiceRequest)
        return {
            "output": item.request.choices[response.chosen].strip(),
            SCORE_KEY: float(response.chosen == item.meta["target_index"]),
            CHANCE_KEY: 1 / len(item.request.choices),
        }

    def aggregate(self, config: ZeroshotConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """Accuracy per format and fact count, and per fact count over the formats (format =
        'all'). Fact counts are never pooled: they are different tasks."""
        return aggregate_means(
            self.name, samples, self.metrics, self.setting_keys, over=("format",), weigh="samples"
        )


TASK = ZeroshotTask()
