"""Needle in a haystack: single- and multi-needle retrieval over context length x needle depth.

Protocol: ../shared/paper-protocols.md section 1 (LWM multi-needle wording). A context of
`length` tokens (in each model's own tokenizer, the answer's room included) holds N needles
"The special magic {city} number is: {number}."; R of the cities are asked for. The first queried
needle sits at the sentence boundary nearest `depth` percent of the haystack's tokens; every other
needle at a random depth. A sample is one haystack with its needles (and decoys): across depths
only the first queried needle moves, so depths are compared on the same text, and the prompts of
one sample share their tokens up to the shallower needle, which the backend computes once.
In score mode the context also holds decoys: the same sentence for
other cities, carrying the choices no needle carries, so that every choice is in the context and
only its city tells the true one apart. Cities, numbers and depths come from the seed alone, so
every model sees the same needles; where the haystack is cut and where a needle lands depend on
the tokenizer, and each sample records the needle's realised depth in tokens (`token_depth`).

Attention mode (`mode=attention`, the paper's Table 3) asks no question of the model's output:
on the generate-mode prompt (single-needle: ending in the answer prefix, so its last token is the
one that produces the answer) it asks where that last token's attention goes
(`AttentionRequest`, one span per queried needle's sentence and one for the whole haystack).
The map is, for a Transformer, its softmax; for a DIFF model, the differential map of each head
pair, (softmax1 - lambda softmax2) / (1 - lambda) with lambda the layer's own: dividing by
1 - lambda makes the map sum to 1 over the prompt like a softmax, so the two models' numbers share
a scale. A differential map has negative entries, and a signed sum would let over-subtraction
read as "no noise", so its positive and negative parts are reported apart:
- `attention_answer`: the positive mass, sum of max(map, 0), on the tokens of every queried
  needle's sentence (an R = 2 row counts both needles);
- `attention_noise`: the positive mass on the rest of the haystack (every other token of the
  context, unqueried needles included);
- `attention_negative`: the magnitude of the negative mass, sum of max(-map, 0), over the whole
  haystack, answer needles included (0 for a Transformer).
The remaining positions (the BOS token, the question, the chat template and the answer prefix)
count in none. Each is averaged over heads (by the backend) and over layers (here), per sample,
and then over samples. A Transformer's positive masses are probabilities: each in [0, 1], and with
the rest of the prompt they sum to 1; for a DIFF model positive minus negative mass over the whole
prompt is 1 per layer. Where a DIFF layer's lambda >= 1 the backend does not divide (it would flip
or blow up the map) and reports that layer's map un-normalised with a warning: the sample keeps the
warnings (`warnings`), the task logs per model how many samples of which cells had one, and the
rows of those cells mix two normalisations.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from diffbench.api import (
    ALL,
    CHANCE_KEY,
    CLUSTER_KEY,
    LARGEST,
    AttentionMass,
    AttentionRequest,
    ChoiceRequest,
    ChoiceScores,
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
from diffbench.tasks import haystack as hs

SETTING_KEYS = ("mode", "length", "depth", "needles", "queries")
ATTENTION_METRICS = ("attention_answer", "attention_noise", "attention_negative")
# A cell of the metric rows; an ALL depth averages a cell's depths.
CELL = ("mode", "length", "needles", "queries", "depth")
UNIT = "haystack draw"
log = logging.getLogger("diffbench")
NORMALISATION = (
    "positive and negative mass of the last token's map, mean over heads then layers; DIFF: "
    "(a1 - lambda a2) / (1 - lambda) per head pair, so a map sums to 1 over the prompt like a "
    "softmax (un-normalised where lambda >= 1, with a warning)"
)


@dataclass(frozen=True)
class NiahConfig:
    """Options of the niah task; the defaults run in about a minute per model on a CPU."""

    lengths: tuple[int, ...] = (512, 1024)  # inside the shipped pair's 1024-token context
    depths: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
    needles: tuple[str, ...] = ("1/1",)  # N/R: N needles in the context, R of them queried
    samples: int = 3
    # both: generate and score; all: generate, score and attention (Tables 2 and 3 in one run)
    mode: Literal["generate", "score", "both", "attention", "all"] = "both"
    haystack: str = "procedural"  # or the path of a UTF-8 text file
    # sample: each sample its own haystack (samples independent); length: one haystack for every
    # sample of a length (gkamradt's, NeedleBench's and RULER's protocol), whose prompts then
    # share their text across samples up to the needle, so a depth sweep costs about 2.5 x L
    # prefill tokens per sample instead of 3.5 x L.
    haystack_per: Literal["sample", "length"] = "sample"
    # Score mode: wrong numbers ranked against the true one. Each sits in the context in a
    # needle-shaped sentence (~16-22 tokens), so 4 keeps a 256-token context feasible.
    distractors: int = 4
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
        if self.distractors >= len(hs.CITIES):
            raise ValueError(
                f"distractors must be < {len(hs.CITIES)}: each sits in the context keyed by "
                "its own city"
            )


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


def _haystack_sentences(source: str, start: int, n_chars: int) -> list[str]:
    """At least `n_chars` characters of whole sentences from the procedural stream or a file.

    `start` seeds the procedural stream, or picks the file's first sentence, so that the modes
    of one sample read the same haystack.
    """
    if source == "procedural":
        stream = hs.sentences(start)
        out, total = [], 0
        while total < n_chars:
            s = next(stream)
            out.append(s)
            total += len(s) + 1
        return out
    sentences = _file_sentences(Path(source))
    out, total, i = [], 0, start % len(sentences)
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


def _draw_decoys(rng: random.Random, needles: list[Needle], distractors: int) -> list[Needle]:
    """Score mode: needle-shaped sentences for unused cities, carrying the choices no needle has.

    Each query ranks `distractors` + 1 numbers; the needles' own numbers come first, and the rest
    must sit in the context too, or "pick the only number present" would score 100%.
    """
    k = max(0, distractors + 1 - len(needles))
    used = {n.city for n in needles}
    cities = rng.sample([c for c in hs.CITIES if c not in used], k)
    taken = {n.number for n in needles}
    numbers: list[str] = []
    while len(numbers) < k:
        num = hs.magic_number(rng)
        if num not in taken:
            taken.add(num)
            numbers.append(num)
    return [
        Needle(c, x, round(rng.uniform(0, 100), 2)) for c, x in zip(cities, numbers, strict=True)
    ]


def _place(
    tok: TokenizerView,
    count_piece: Callable[[str], int],
    sentences: list[str],
    inserts: list[Needle],
) -> tuple[str, list[float]]:
    """The haystack with each insert at the sentence boundary nearest its depth, and the depths.

    A depth is a percentage of the haystack's own tokens (inserts excluded) in the model's
    tokenizer, not of its sentences: sentences differ in length, so a sentence index put 25% at
    22-27% of the tokens, and further off in a file of long and short sentences. The realised
    depths, in the same units, come back rounded to 0.01.
    """
    text = " ".join(sentences)
    total = tok.count(text)
    ends = [0]  # ends[i]: characters of the first i sentences joined by spaces
    for k, s in enumerate(sentences):
        ends.append(ends[-1] + (1 if k else 0) + len(s))
    # Tokens before each boundary, from per-sentence counts (cached: haystacks repeat sentences).
    # Exact when no token crosses a sentence join, which the total confirms; otherwise each
    # candidate boundary's prefix is counted on the joined text, a long haystack at a time.
    counts = list(
        accumulate((count_piece(" " + s if k else s) for k, s in enumerate(sentences)), initial=0)
    )
    additive = counts[-1] == total
    exact = {0: 0, len(sentences): total}

    def before(i: int) -> int:
        """Tokens of the haystack before boundary i, as the joined text encodes them."""
        if additive:
            return counts[i]
        if i not in exact:
            exact[i] = tok.count(text[: ends[i]])
        return exact[i]

    slots: dict[int, list[str]] = {}
    realised: list[float] = []
    for nd in inserts:
        target = nd.depth / 100 * total
        if additive:
            i = bisect.bisect_right(counts, target) - 1
        else:
            i = bisect.bisect_right(ends, tok.char_offset(text, round(target))) - 1
            while i < len(sentences) and before(i + 1) <= target:
                i += 1
            while i > 0 and before(i) > target:
                i -= 1
        if i < len(sentences) and before(i + 1) - target < target - before(i):
            i += 1
        slots.setdefault(i, []).append(hs.NEEDLE.format(city=nd.city, number=nd.number))
        realised.append(round(100 * before(i) / total, 2))
    parts: list[str] = []
    for i in range(len(sentences) + 1):
        parts.extend(slots.get(i, []))
        if i < len(sentences):
            parts.append(sentences[i])
    return " ".join(parts), realised


def _question(queried: list[Needle]) -> str:
    if len(queried) == 1:
        return hs.QUESTION.format(city=queried[0].city)
    return hs.QUESTION_MANY.format(cities=hs.join_cities([q.city for q in queried]))


@dataclass(frozen=True)
class Context:
    """One prompt's context: the user text, the rendered prompt, and where things landed."""

    user: str
    prompt: str
    n_prompt_tokens: int
    n_sentences: int
    token_depth: float  # realised depth of the first queried needle, % of haystack tokens


def _build_prompt(
    cfg: NiahConfig,
    tok: TokenizerView,
    count_piece: Callable[[str], int],
    hay_start: int,
    length: int,
    inserts: list[Needle],
    r: int,
    answer_room: int,
) -> Context:
    """The context for `length` tokens holding `inserts` (needles first, the first R queried)."""
    question = _question(inserts[:r])
    fixed = tok.prompt_tokens(tok.render(f"\n\n{question}", "", cfg.chat))
    insert_tokens = sum(
        tok.count(" " + hs.NEEDLE.format(city=n.city, number=n.number)) for n in inserts
    )
    budget = length - answer_room - fixed - insert_tokens
    if budget < 16:
        raise DiffbenchError(
            f"niah length {length} leaves no room for a haystack ({budget} tokens) after the "
            f"question, {len(inserts)} needles and decoys and {answer_room} answer tokens; "
            "raise --set niah.lengths or lower niah.needles / niah.distractors"
        )
    sentences = _haystack_sentences(cfg.haystack, hay_start, budget * 8)
    text = " ".join(sentences)
    cut = tok.char_offset(text, budget)
    keep, total = 0, -1
    for s in sentences:  # whole sentences only
        if total + 1 + len(s) > cut:
            break
        total += 1 + len(s)
        keep += 1
    while keep > 0:
        haystack, depths = _place(tok, count_piece, sentences[:keep], inserts)
        user = f"{haystack}\n\n{question}"
        prompt = tok.render(user, "", cfg.chat)
        n_tokens = tok.prompt_tokens(prompt)
        if n_tokens + answer_room <= length:
            return Context(user, prompt, n_tokens, keep, depths[0])
        keep -= 1  # tokenization at the joins can add a token or two
    raise DiffbenchError(f"niah length {length} is too short for its needles and question")


def _answer_room(cfg: NiahConfig, tok: TokenizerView, needles: list[Needle], r: int) -> int:
    prefix = max(tok.count(hs.ANSWER_PREFIX.format(city=n.city)) for n in needles[:r])
    return prefix + cfg.answer_tokens * r


def _modes(cfg: NiahConfig) -> tuple[str, ...]:
    if cfg.mode == "all":
        return ("generate", "score", "attention")
    return ("generate", "score") if cfg.mode == "both" else (cfg.mode,)


class NiahTask:
    """The needle-in-a-haystack task plugin."""

    name = "niah"
    description = "Needle-in-a-haystack retrieval over context length x depth, single/multi-needle"
    config_type = NiahConfig
    presets = PRESETS
    # One haystack draw (its filler text, needles, numbers and decoys) is read at every depth,
    # in every mode and by every query: it, not the sample, is the independent unit.
    metrics = (
        Metric("accuracy", unit=UNIT),
        Metric("attention_answer", "higher", "mean", "attention_answer", unit=UNIT),
        Metric("attention_noise", "lower", "mean", "attention_noise", unit=UNIT),
        Metric("attention_negative", "lower", "mean", "attention_negative", unit=UNIT,
               note=NORMALISATION),
    )  # fmt: skip
    setting_keys = SETTING_KEYS
    # The paper's Table 2: accuracy per length and N/R, averaged over depths; Table 3 (attention
    # mode): attention on the answer and on the noise per depth.
    headline = (
        Headline("accuracy", {"depth": ALL}),
        Headline("attention_answer"),
        Headline("attention_noise"),
    )
    # The paper's numbers beside the run's (report.md's first section).
    paper = (
        PaperRef(
            "Table 2",
            "Multi-needle retrieval accuracy, N needles / R queried",
            "accuracy",
            {"mode": "generate", "depth": ALL, "length": LARGEST},
            by=("needles", "queries"),
            transformer={"1/1": "1.00", "2/2": "0.85", "4/2": "0.62", "6/2": "0.55"},
            diff={"1/1": "1.00", "2/2": "0.92", "4/2": "0.84", "6/2": "0.85"},
            note="4K context, mean over depths; the run: its largest length, generate mode",
        ),
        PaperRef(
            "Figure 5",
            "Retrieval accuracy by context length, N=8 R=1",
            "accuracy",
            {"mode": "generate", "depth": ALL, "needles": "8", "queries": "1"},
            by=("length",),
            transformer=dict(
                zip(
                    (str(8192 * i) for i in range(1, 9)),
                    ("0.95", "0.84", "0.78", "0.64", "0.50", "0.75", "0.78", "0.52"),
                    strict=True,
                )
            ),
            diff=dict(
                zip(
                    (str(8192 * i) for i in range(1, 9)),
                    ("1.00", "0.94", "0.87", "0.83", "0.83", "0.92", "0.84", "0.86"),
                    strict=True,
                )
            ),
            note="8K-64K context, mean over depths (preset paper-64k)",
        ),
        PaperRef(
            "Table 3",
            "Attention on the answer span",
            "attention_answer",
            {"mode": "attention", "depth": ALL, "length": LARGEST, "needles": "1", "queries": "1"},
            transformer={"": "0.03–0.09"},
            diff={"": "0.27–0.40"},
            note="4K context, range over depths 0-100%; the run: mean over depths",
        ),
        PaperRef(
            "Table 3",
            "Attention on the noise context",
            "attention_noise",
            {"mode": "attention", "depth": ALL, "length": LARGEST, "needles": "1", "queries": "1"},
            transformer={"": "0.49–0.54"},
            diff={"": "0.01–0.02"},
            note="4K context, range over depths 0-100%; the run: mean over depths",
        ),
    )

    # The paper's depth x length heatmaps per mode and N/R (its Figures 3 and 4), its Table 2 as
    # bars per N/R over depths, and its Table 3 as attention on the answer and on the noise per
    # depth (attention mode).
    figures = (
        FigureSpec(
            "heatmap",
            ("accuracy",),
            ("length",),
            "heatmap_{mode}_n{needles}r{queries}",
            "Needle in a haystack (N={needles}, R={queries}, {mode})",
            y="depth",
            per=("mode", "needles", "queries"),
            x_label="context length (tokens)",
            y_label="answer needle depth (%)",
            limits=(0.0, 1.0),
        ),
        FigureSpec(
            "bars",
            ("accuracy",),
            ("needles", "queries", "length"),
            "bars_{mode}",
            "Multi-needle retrieval ({mode})",
            per=("mode",),
            where={"depth": ALL},
            y_label="accuracy (mean over depths)",
            limits=(0.0, 1.05),
        ),
        FigureSpec(
            "line",
            ("attention_answer", "attention_noise"),
            ("depth",),
            "attention_L{length}_n{needles}r{queries}",
            "Attention allocation ({length} tokens, N={needles}, R={queries})",
            per=("length", "needles", "queries"),
            x_label="answer needle depth (%)",
            y_label="attention mass (mean over heads, layers)",
        ),
    )

    def request_kinds(self, config: NiahConfig) -> tuple[type, ...]:
        """The request kinds of the config's modes: a backend without attention probes (vLLM)
        runs generate and score, and is refused before loading when attention is asked for."""
        kind = {"generate": GenerateRequest, "score": ChoiceRequest, "attention": AttentionRequest}
        return tuple(kind[m] for m in _modes(config))

    def items(self, config: NiahConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """Every (mode, length, depth, N/R, sample) request for one model."""
        for length in config.lengths:
            if length > tokenizer.max_context:
                raise DiffbenchError(
                    f"niah length {length} is beyond the model's maximum context of "
                    f"{tokenizer.max_context} tokens; lower --set niah.lengths"
                )
        count_piece = functools.cache(tokenizer.count)
        # One set of needles and decoys per (length, N/R, sample), and one haystack per sample
        # (`haystack_per=sample`) or per length (`length`, as gkamradt's and RULER's: every sample
        # on the same text); only the first queried needle moves with the depth, so depths are
        # compared on the same text, and prompts share their tokens up to the shallower needle.
        # Items come deepest first, each mode's prompts together (and with one haystack per
        # length, every sample of a depth together), so that each prompt's shared prefix is the
        # one its predecessor left in the backend's cache.
        depths = sorted(config.depths, reverse=True)
        modes = _modes(config)
        keyed: list[tuple[tuple[int, ...], list[Item]]] = []
        for li, length in enumerate(config.lengths):
            shared_start = random.Random(f"niah|{seed}|L{length}-haystack").randrange(2**31)
            for pi, pair in enumerate(config.needles):
                n, r = parse_needles(pair)
                for k in range(config.samples):
                    rng = random.Random(f"niah|{seed}|L{length}-n{n}r{r}-s{k}")
                    drawn = _draw_needles(rng, n, r, depths[0])
                    own_start = rng.randrange(2**31)
                    hay_start = own_start if config.haystack_per == "sample" else shared_start
                    decoys = _draw_decoys(random.Random(rng.random()), drawn, config.distractors)
                    room = _answer_room(config, tokenizer, drawn, r)
                    for mi, mode in enumerate(modes):
                        for di, depth in enumerate(depths):
                            base_id = f"L{length}-d{depth:g}-n{n}r{r}-s{k}"
                            needles = [dataclasses.replace(drawn[0], depth=depth), *drawn[1:]]
                            setting = {"length": length, "depth": depth, "needles": n, "queries": r}
                            items = self._mode_items(
                                config,
                                tokenizer,
                                count_piece,
                                mode,
                                base_id,
                                random.Random(f"niah|{seed}|{base_id}|choices"),
                                hay_start,
                                needles,
                                decoys if mode == "score" else [],
                                r,
                                room,
                                {"mode": mode, **setting},
                            )
                            # Every item of one draw, whatever its depth, mode or query, is
                            # one independent unit.
                            draw = f"L{length}-n{n}r{r}-s{k}"
                            items = [
                                dataclasses.replace(it, meta={**it.meta, CLUSTER_KEY: draw})
                                for it in items
                            ]
                            order = (
                                (li, pi, k, mi, di)
                                if config.haystack_per == "sample"
                                else (li, pi, mi, di, k)
                            )
                            keyed.append((order, items))
        return [it for _, items in sorted(keyed, key=lambda x: x[0]) for it in items]

    def _mode_items(
        self,
        cfg: NiahConfig,
        tok: TokenizerView,
        count_piece: Callable[[str], int],
        mode: str,
        base_id: str,
        choice_rng: random.Random,
        hay_start: int,
        needles: list[Needle],
        decoys: list[Needle],
        r: int,
        room: int,
        setting: dict[str, Any],
    ) -> list[Item]:
        queried = needles[:r]
        ctx = _build_prompt(
            cfg, tok, count_piece, hay_start, setting["length"], needles + decoys, r, room
        )
        meta: dict[str, Any] = {
            "needle_list": [[x.city, x.number, x.depth] for x in needles],
            "token_depth": ctx.token_depth,
            "n_prompt_tokens": ctx.n_prompt_tokens,
            "answer_room": room,
            "haystack_sentences": ctx.n_sentences,
        }
        if mode == "attention":
            return [self._attention_item(cfg, tok, ctx, base_id, queried, setting, meta)]
        if mode == "generate":
            answer_prefix = hs.ANSWER_PREFIX.format(city=queried[0].city) if r == 1 else ""
            generate = GenerateRequest(
                prompt=tok.render(ctx.user, answer_prefix, cfg.chat),
                max_new_tokens=cfg.answer_tokens * r,
                # One number is asked: it ends at the sentence's full stop (the number itself
                # has none), so a model that runs on after it costs no further decode steps.
                stop=("\n", ".") if r == 1 else ("\n\n",),
            )
            target = [q.number for q in queried]
            return [Item(f"{base_id}-gen", generate, setting, {**meta, "target": target})]
        meta["decoy_list"] = [[x.city, x.number, x.depth] for x in decoys]
        items = []
        for qi, q in enumerate(queried):
            others = [x.number for x in needles + decoys if x is not q]
            choices = [q.number, *others[: cfg.distractors]]
            choice_rng.shuffle(choices)
            request = ChoiceRequest(
                prefix=ctx.prompt,
                query=hs.ANSWER_PREFIX.format(city=q.city),
                choices=tuple(" " + c for c in choices),
            )
            items.append(
                Item(
                    f"{base_id}-score-q{qi}",
                    request,
                    setting,
                    {
                        **meta,
                        "target": q.number,
                        "target_index": choices.index(q.number),
                    },
                )
            )
        return items

    @staticmethod
    def _attention_item(
        cfg: NiahConfig,
        tok: TokenizerView,
        ctx: Context,
        base_id: str,
        queried: list[Needle],
        setting: dict[str, Any],
        meta: dict[str, Any],
    ) -> Item:
        """The generate-mode prompt with one span per queried needle's sentence, then the
        haystack's span."""
        answer_prefix = hs.ANSWER_PREFIX.format(city=queried[0].city) if len(queried) == 1 else ""
        prompt = tok.render(ctx.user, answer_prefix, cfg.chat)
        haystack = ctx.user.rsplit("\n\n", 1)[0]
        h0 = prompt.find(haystack)
        assert h0 >= 0, "the rendered prompt holds the haystack"
        spans = []
        for q in queried:
            needle = hs.NEEDLE.format(city=q.city, number=q.number)
            a0 = prompt.find(needle, h0)
            assert h0 <= a0 < h0 + len(haystack), "the haystack holds every queried needle"
            spans.append((a0, a0 + len(needle)))
        request = AttentionRequest(prompt, (*spans, (h0, h0 + len(haystack))))
        target = [q.number for q in queried]
        return Item(f"{base_id}-attn", request, setting, {**meta, "target": target})

    def score(self, config: NiahConfig, item: Item, response: Response) -> Sample:
        """Per-needle substring match (generate), whether the true number ranks first (score), or
        the attention's positive mass on the queried needles and on the rest of the haystack and
        its negative mass on the haystack (attention)."""
        if isinstance(response, AttentionMass):
            # Spans: each queried needle's sentence, then the whole haystack (needles included).
            answer = [sum(float(x) for x in m[:-1]) for m in response.masses]
            noise = [float(m[-1]) - a for m, a in zip(response.masses, answer, strict=True)]
            sample: Sample = {
                "attention_answer": sum(answer) / len(answer),
                "attention_noise": sum(noise) / len(noise),
                "answer_per_layer": [round(x, 6) for x in answer],
                "noise_per_layer": [round(x, 6) for x in noise],
                "warnings": list(response.warnings),
            }
            if response.negative:  # a backend reporting signed masses only has none
                negative = [float(m[-1]) for m in response.negative]
                sample["attention_negative"] = sum(negative) / len(negative)
                sample["negative_per_layer"] = [round(x, 6) for x in negative]
            return sample
        if isinstance(response, Generation):
            targets: list[str] = list(item.meta["target"])
            found = [t in response.text for t in targets]
            return {
                "output": response.text,
                "found": found,
                "score": sum(found) / len(found),
                "n_new_tokens": response.n_new_tokens,
            }
        assert isinstance(response, ChoiceScores) and isinstance(item.request, ChoiceRequest)
        best = response.chosen
        return {
            "output": item.request.choices[best].strip(),
            "logprobs": [None if x is None else round(x, 6) for x in response.logprobs],
            "score": float(best == item.meta["target_index"]),
            CHANCE_KEY: 1 / len(item.request.choices),
        }

    def aggregate(self, config: NiahConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """Accuracy (or attention allocation) per cell, and per (mode, length, N/R) averaged over
        depths (depth = 'all')."""
        attention = samples["mode"] == "attention"
        frames = [self._allocation(samples[attention])] if attention.any() else []
        if not attention.all():
            frames.append(self._accuracy(samples[~attention]))
        return pd.concat(frames, ignore_index=True)

    def _allocation(self, samples: pd.DataFrame) -> pd.DataFrame:
        """attention_answer, attention_noise and attention_negative per depth, and their mean
        over depths; a warning per model whose samples hold un-normalised layers."""
        if "warnings" in samples.columns:
            warned = samples[samples["warnings"].map(lambda w: isinstance(w, list) and bool(w))]
            for model, group in warned.groupby("model", sort=True):
                where = sorted(
                    {f"L{length} n{n}r{r} d{float(depth):g}" for length, n, r, depth in
                     zip(group["length"], group["needles"], group["queries"], group["depth"],
                         strict=True)}
                )  # fmt: skip
                log.warning(
                    "niah/%s: %d of %d attention samples have a DIFF layer with lambda >= 1, left "
                    "un-normalised (%s); the rows of cells %s mix normalisations",
                    model,
                    len(group),
                    int((samples["model"] == model).sum()),
                    group["warnings"].iloc[0][0],
                    ", ".join(where),
                )
        # attention_negative is absent from a backend reporting signed masses only: no rows.
        declared = [m for m in self.metrics if m.name in ATTENTION_METRICS]
        return aggregate_means(self.name, samples, declared, CELL, over=("depth",))

    def _accuracy(self, samples: pd.DataFrame) -> pd.DataFrame:
        """Accuracy per cell, and the paper's number: the mean over depths of per-depth
        accuracy (every depth weighs the same)."""
        accuracy = [m for m in self.metrics if m.name == "accuracy"]
        return aggregate_means(self.name, samples, accuracy, CELL, over=("depth",))


TASK = NiahTask()
