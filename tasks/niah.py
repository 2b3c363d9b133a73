"""Needle in a haystack: single- and multi-needle retrieval over context length x needle depth.

Protocol: ../shared/paper-protocols.md section 1 (LWM multi-needle wording). A context of
`length` tokens (in each model's own tokenizer, the answer's room included) holds N needles
"The special magic {city} number is: {number}."; R of the cities are asked for. The first queried
needle sits at `depth` percent of the haystack; every other needle at a random depth. Needles
sit between sentences. Cities, numbers and depths come from the seed alone, so every model sees
the same needles; only where the haystack is cut depends on the tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from diffbench.api import (
    ChoiceRequest,
    ChoiceScores,
    GenerateRequest,
    Generation,
    Item,
    Response,
    Sample,
    TokenizerView,
)
from diffbench.errors import DiffbenchError
from diffbench.tasks import haystack as hs

SETTING_KEYS = ("mode", "length", "depth", "needles", "queries")
ALL_DEPTHS = "all"


@dataclass(frozen=True)
class NiahConfig:
    """Options of the niah task; the defaults run in about a minute per model on a CPU."""

    lengths: tuple[int, ...] = (512, 1024)  # inside the shipped pair's 1024-token context
    depths: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
    needles: tuple[str, ...] = ("1/1",)  # N/R: N needles in the context, R of them queried
    samples: int = 3
    mode: Literal["generate", "score", "both"] = "both"
    haystack: str = "procedural"  # or the path of a UTF-8 text file
    distractors: int = 9  # score mode: wrong numbers ranked against the true one
    answer_tokens: int = 16  # generation budget per queried needle
    chat: bool = True  # wrap the prompt in the model's chat template when it has one
    preset: str = ""

    def __post_init__(self) -> None:
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise ValueError("lengths must be positive token counts")
        if any(not 0 <= d <= 100 for d in self.depths) or not self.depths:
            raise ValueError("depths are percentages between 0 and 100")
        for pair in self.needles:
            n, r = parse_needles(pair)
            if not 1 <= r <= n <= len(hs.CITIES):
                raise ValueError(f"needles {pair!r}: need 1 <= R <= N <= {len(hs.CITIES)}")
        if self.samples < 1 or self.distractors < 1 or self.answer_tokens < 8:
            raise ValueError("samples and distractors must be >= 1 and answer_tokens >= 8")


PRESETS: dict[str, dict[str, Any]] = {
    "paper-4k": {"lengths": (4096,), "needles": ("1/1", "2/2", "4/2", "6/2"), "samples": 50},
    "paper-64k": {
        "lengths": tuple(range(8192, 65537, 8192)),
        "needles": ("8/1",),
        "samples": 50,
    },
}


def parse_needles(pair: str) -> tuple[int, int]:
    """'N/R' as (N, R)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", pair)
    if not m:
        raise ValueError(f"needles entries are N/R pairs like 4/2, got {pair!r}")
    return int(m.group(1)), int(m.group(2))


# ---- haystack ------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _file_sentences(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DiffbenchError(f"cannot read haystack file {path}: {err}") from None
    sentences = [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]
    if not sentences:
        raise DiffbenchError(f"haystack file {path} is empty")
    return sentences


def _haystack_sentences(source: str, rng: random.Random, n_chars: int) -> list[str]:
    """At least `n_chars` characters of whole sentences from the procedural stream or a file."""
    if source == "procedural":
        stream = hs.sentences(rng.randrange(2**31))
        out, total = [], 0
        while total < n_chars:
            s = next(stream)
            out.append(s)
            total += len(s) + 1
        return out
    sentences = _file_sentences(Path(source))
    start = rng.randrange(len(sentences))
    out, total, i = [], 0, start
    while total < n_chars:
        s = sentences[i % len(sentences)]
        out.append(s)
        total += len(s) + 1
        i += 1
    return out


# ---- items ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needle:
    city: str
    number: str
    depth: float


def _draw_needles(rng: random.Random, n: int, r: int, depth: float) -> list[Needle]:
    """N needles, the first R queried; the first at `depth`, the rest at random depths."""
    cities = rng.sample(hs.CITIES, n)
    numbers: list[str] = []
    while len(numbers) < n:
        num = hs.magic_number(rng)
        if num not in numbers:
            numbers.append(num)
    depths = [depth] + [round(rng.uniform(0, 100), 2) for _ in range(n - 1)]
    return [Needle(c, x, d) for c, x, d in zip(cities, numbers, depths, strict=True)]


def _insert(sentences: list[str], needles: list[Needle]) -> str:
    """Haystack text with each needle placed at the sentence boundary nearest its depth."""
    slots: dict[int, list[str]] = {}
    for nd in needles:
        idx = round(nd.depth / 100 * len(sentences))
        slots.setdefault(idx, []).append(hs.NEEDLE.format(city=nd.city, number=nd.number))
    parts: list[str] = []
    for i in range(len(sentences) + 1):
        parts.extend(slots.get(i, []))
        if i < len(sentences):
            parts.append(sentences[i])
    return " ".join(parts)


def _question(queried: list[Needle]) -> str:
    if len(queried) == 1:
        return hs.QUESTION.format(city=queried[0].city)
    return hs.QUESTION_MANY.format(cities=hs.join_cities([q.city for q in queried]))


def _build_prompt(
    cfg: NiahConfig,
    tok: TokenizerView,
    rng: random.Random,
    length: int,
    needles: list[Needle],
    r: int,
    answer_room: int,
) -> tuple[str, str, int]:
    """(user text, rendered prompt without answer prefix, haystack sentence count) for `length`."""
    queried = needles[:r]
    question = _question(queried)
    fixed = tok.prompt_tokens(tok.render(f"\n\n{question}", "", cfg.chat))
    needle_tokens = sum(
        tok.count(" " + hs.NEEDLE.format(city=n.city, number=n.number)) for n in needles
    )
    budget = length - answer_room - fixed - needle_tokens
    if budget < 16:
        raise DiffbenchError(
            f"niah length {length} leaves no room for a haystack ({budget} tokens) after the "
            f"question, {len(needles)} needles and {answer_room} answer tokens"
        )
    sentences = _haystack_sentences(cfg.haystack, rng, budget * 8)
    text = " ".join(sentences)
    cut = tok.char_offset(text, budget)
    keep, total = 0, -1
    for s in sentences:  # whole sentences only
        if total + 1 + len(s) > cut:
            break
        total += 1 + len(s)
        keep += 1
    while keep > 0:
        user = f"{_insert(sentences[:keep], needles)}\n\n{question}"
        prompt = tok.render(user, "", cfg.chat)
        if tok.prompt_tokens(prompt) + answer_room <= length:
            return user, prompt, keep
        keep -= 1  # tokenization at the joins can add a token or two
    raise DiffbenchError(f"niah length {length} is too short for its needles and question")


def _answer_room(cfg: NiahConfig, tok: TokenizerView, needles: list[Needle], r: int) -> int:
    prefix = max(tok.count(hs.ANSWER_PREFIX.format(city=n.city)) for n in needles[:r])
    return prefix + cfg.answer_tokens * r


def _modes(cfg: NiahConfig) -> tuple[str, ...]:
    return ("generate", "score") if cfg.mode == "both" else (cfg.mode,)


class NiahTask:
    """The needle-in-a-haystack task plugin."""

    name = "niah"
    description = "Needle-in-a-haystack retrieval over context length x depth, single/multi-needle"
    config_type = NiahConfig
    presets = PRESETS
    metrics = ("accuracy",)
    setting_keys = SETTING_KEYS
    lower_is_better: frozenset[str] = frozenset()
    sample_mean_metrics: frozenset[str] = frozenset({"accuracy"})

    def items(self, config: NiahConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """Every (mode, length, depth, N/R, sample) request for one model."""
        for length in config.lengths:
            if length > tokenizer.max_context:
                raise DiffbenchError(
                    f"niah length {length} is beyond the model's maximum context of "
                    f"{tokenizer.max_context} tokens; lower --set niah.lengths"
                )
        out: list[Item] = []
        for length in config.lengths:
            for depth in config.depths:
                for pair in config.needles:
                    n, r = parse_needles(pair)
                    for k in range(config.samples):
                        base_id = f"L{length}-d{depth:g}-n{n}r{r}-s{k}"
                        rng = random.Random(f"niah|{seed}|{base_id}")
                        needles = _draw_needles(rng, n, r, depth)
                        room = _answer_room(config, tokenizer, needles, r)
                        user, prompt, n_sent = _build_prompt(
                            config, tokenizer, rng, length, needles, r, room
                        )
                        setting = {"length": length, "depth": depth, "needles": n, "queries": r}
                        meta = {
                            "needle_list": [[x.city, x.number, x.depth] for x in needles],
                            "n_prompt_tokens": tokenizer.prompt_tokens(prompt),
                            "answer_room": room,
                            "haystack_sentences": n_sent,
                        }
                        out.extend(
                            self._mode_items(
                                config,
                                tokenizer,
                                base_id,
                                rng,
                                user,
                                prompt,
                                needles,
                                r,
                                setting,
                                meta,
                            )
                        )
        return out

    def _mode_items(
        self,
        cfg: NiahConfig,
        tok: TokenizerView,
        base_id: str,
        rng: random.Random,
        user: str,
        prompt: str,
        needles: list[Needle],
        r: int,
        setting: dict[str, Any],
        meta: dict[str, Any],
    ) -> list[Item]:
        items = []
        queried = needles[:r]
        distractor_rng = random.Random(rng.random())
        for mode in _modes(cfg):
            s = {"mode": mode, **setting}
            if mode == "generate":
                answer_prefix = hs.ANSWER_PREFIX.format(city=queried[0].city) if r == 1 else ""
                request = GenerateRequest(
                    prompt=tok.render(user, answer_prefix, cfg.chat),
                    max_new_tokens=cfg.answer_tokens * r,
                    stop=("\n",) if r == 1 else ("\n\n",),
                )
                target = [q.number for q in queried]
                items.append(Item(f"{base_id}-gen", request, s, {**meta, "target": target}))
                continue
            for qi, q in enumerate(queried):
                choices = [q.number] + [x.number for x in needles if x is not q]
                while len(choices) < cfg.distractors + 1:
                    num = hs.magic_number(distractor_rng)
                    if num not in choices:
                        choices.append(num)
                choices = choices[: cfg.distractors + 1]
                distractor_rng.shuffle(choices)
                request = ChoiceRequest(
                    prefix=prompt,
                    query=hs.ANSWER_PREFIX.format(city=q.city),
                    choices=tuple(" " + c for c in choices),
                )
                items.append(
                    Item(
                        f"{base_id}-score-q{qi}",
                        request,
                        s,
                        {**meta, "target": q.number, "target_index": choices.index(q.number)},
                    )
                )
        return items

    def score(self, config: NiahConfig, item: Item, response: Response) -> Sample:
        """Per-needle substring match (generate) or whether the true number ranks first (score)."""
        if isinstance(response, Generation):
            targets: list[str] = list(item.meta["target"])
            found = [t in response.text for t in targets]
            return {
                "output": response.text,
                "found": found,
                "score": sum(found) / len(found),
                "n_new_tokens": response.n_new_tokens,
            }
        assert isinstance(response, ChoiceScores)
        best = response.best
        return {
            "output": item.request.choices[best].strip(),
            "logprobs": [None if x is None else round(x, 6) for x in response.logprobs],
            "score": float(best == item.meta["target_index"]),
        }

    def aggregate(self, config: NiahConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """Accuracy per cell, and per (mode, length, N/R) averaged over depths (depth = 'all')."""
        keys = ["model", "mode", "length", "needles", "queries"]
        cells = (
            samples.groupby([*keys, "depth"], sort=True)["score"]
            .agg(value="mean", n="count", stderr=_stderr)
            .reset_index()
        )
        # The paper's number: the mean over depths of per-depth accuracy.
        overall = (
            cells.groupby(keys, sort=True)
            .agg(value=("value", "mean"), n=("n", "sum"))
            .reset_index()
        )
        se = samples.groupby(keys, sort=True)["score"].agg(_stderr).reset_index(name="stderr")
        overall = overall.merge(se, on=keys)
        overall["depth"] = ALL_DEPTHS
        cells["depth"] = cells["depth"].map(lambda d: f"{float(d):g}")
        frame = pd.concat([cells, overall], ignore_index=True)
        frame["task"] = self.name
        frame["metric"] = "accuracy"
        return frame

    def figures(self, metrics: pd.DataFrame, samples: pd.DataFrame, out_dir: Path) -> list[Path]:
        """The paper's depth x length heatmap per mode and N/R, and grouped bars per N/R."""
        from diffbench.tasks import niah_plots

        return niah_plots.draw(metrics, out_dir)


def _stderr(x: pd.Series) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


TASK = NiahTask()
