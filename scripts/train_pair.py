"""Train the shipped tiny DIFF / Transformer pair on a procedural retrieval curriculum.

Both models see the same tokenizer, the same batches in the same order, the same AdamW settings,
the same warmup-stable-decay schedule and the same seed: stepped in lockstep in one process, or
with `--parallel` in two one-thread processes that generate the identical batch stream (the same
pair, bit for bit, in about half the time on two cores). The data is generated here, nothing is
downloaded: haystack filler from `tasks/haystack.py`, key-value facts in the exact NIAH needle
format (and a few other formats) queried at the end of each sequence, many-shot classification
episodes (toy categories, and the icl task's default intent format), and short documents in the
hallucination task's QA and summary prompts answered from the document (its generator, with the
shipped rows held out). Loss is weighted towards the tokens that need retrieval (answer digits,
in-context labels and answers: weight 1, everything else 0.1), which is what makes a retrieval
circuit appear within a CPU budget.

    python scripts/train_pair.py --preset default --out bench/models --seed 0 --threads 1

That run is what ships in bench/models (69 minutes on one core of the project's 2-core machine;
its first stage lengthens until both answer losses broke, which needs lockstep). The `names` and
`copy` presets, fixed schedules tried for the icl task and not shipped (docs/pair_names.md,
docs/pair_copy.md), train with `--parallel` in about an hour. `--resume` continues a run
that was interrupted from its last saved state. The saved pair is then checked by
diffbench itself: its niah and icl tasks, run by `diffbench.runner.run` into OUT/.pair_check,
whose metrics.csv gives the accuracies printed and written into the model cards.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffbench import runner
from diffbench.api import ALL
from diffbench.models import ModelSpec
from diffbench.plan import RunConfig
from diffbench.store import RunStore, write_atomic
from diffbench.tasks import hallucination, icl_datasets
from diffbench.tasks.hallucination_data import generate as hallucination_data
from diffbench.tasks.haystack import ANSWER_PREFIX, CITIES, NEEDLE, QUESTION, magic_number, sentence
from diffbench.tiny import ARCHITECTURES, tiny_configs, train_tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerFast, get_wsd_schedule

REPO = Path(__file__).resolve().parents[1]
LN10 = math.log(10)
# The answer loss has "broken" once its running mean is well below what copying a digit from the
# right offset of *some* fact in context would give (ln 3 to ln 6 nats with 3-6 facts).
BREAK_NATS = 1.0
BREAK_WINDOW = 50
REST_WEIGHT = 0.1
LOSS_KEYS = ("loss", "lm_loss", "answer_loss", "label_loss")  # logged per model and split


@dataclass(frozen=True)
class Stage:
    """A block of optimizer steps at one context length and retrieval density."""

    steps: int
    seq_len: int
    batch_size: int
    facts: tuple[int, int]  # facts per sequence, inclusive range
    questions: tuple[int, int]  # questions per sequence, at most the number of facts
    classification: float = 0.05  # share of sequences that are toy classification episodes
    intents: float = 0.15  # share of intent episodes in the icl task's default format
    documents: float = 0.2  # share of document QA / summaries in the hallucination format
    # Share of keyed episodes: intent-format episodes whose "utterance" is one key that repeats
    # exactly, so its label is copied from the key's earlier demonstration (see keyed_episode).
    keyed: float = 0.0
    # Share of the non-NIAH facts whose value is a word or two instead of a number, so that the
    # retrieval circuit copies any token, not only digits (in-context labels are words).
    word_values: float = 0.0
    # Up to this many more steps while either model's answer loss has not broken.
    max_extra_steps: int = 0


@dataclass(frozen=True)
class Preset:
    """Model size, curriculum and optimizer settings of one training run."""

    hidden_size: int
    n_layers: int
    n_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    stages: tuple[Stage, ...]
    lr: float = 3e-3
    warmup_steps: int = 100
    decay_steps: int = 500  # cosine decay over the last steps, which are the long-context ones
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    extend_block: int = 250  # a stage is lengthened in blocks of this many steps ...
    break_margin: int = 500  # ... until both models broke at least this many steps ago
    log_every: int = 25
    checkpoint_every: int = 250  # training state for --resume, removed when training ends
    val_every: int = 500
    val_sequences: int = 32
    # The finished pair's check: diffbench's niah task at one context length ...
    eval_length: int = 0  # 0: the final training length
    eval_needles: tuple[str, ...] = ("1/1", "3/1")  # N/R pairs, one table row each
    eval_samples: int = 20  # prompts per depth, at niah's five default depths
    eval_distractors: int = 9  # wrong choices per score-mode query, each a decoy in context
    # ... and its icl check: accuracy by shots on a seeded subset of the generated intents.
    eval_icl_shots: tuple[int, ...] = (4, 16, 32)
    eval_icl_classes: int = 6
    eval_icl_draws: int = 2
    eval_icl_test: int = 32
    tokenizer_docs: int = 3000
    dtype: str = "float32"
    # Intent episodes' labels: "shuffled" (half the episodes the intent names permuted among the
    # intents, so a name never means its utterances) or "own" (40% the intents' own names).
    intent_names: str = "shuffled"

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def final_len(self) -> int:
        return self.stages[-1].seq_len

    @property
    def niah_len(self) -> int:
        return self.eval_length or self.final_len


# Sized for a CPU: about 70 minutes for both models together on one core (--threads 1).
# What ships in bench/models.
DEFAULT = Preset(
    hidden_size=128,
    n_layers=2,
    # 8 heads of 32 (attention width 2x hidden): with 4 heads of 32 the Llama broke at step
    # ~3000 but DIFF (2 differential heads) had not by 5300; with 8 heads of 16 DIFF broke at
    # ~6500 but the Llama had not by 8700. This keeps 32-dim heads and gives DIFF 4 heads.
    n_heads=8,
    head_dim=32,
    intermediate_size=256,
    vocab_size=1024,
    stages=(
        Stage(
            steps=3000,
            seq_len=160,
            batch_size=14,
            facts=(3, 4),
            questions=(3, 4),
            max_extra_steps=7000,
        ),
        Stage(steps=600, seq_len=256, batch_size=8, facts=(2, 8), questions=(2, 4)),
        Stage(steps=600, seq_len=512, batch_size=4, facts=(1, 10), questions=(1, 4)),
        Stage(steps=600, seq_len=1024, batch_size=2, facts=(1, 12), questions=(1, 4)),
    ),
    decay_steps=1200,
)

# The same model with more in-context episodes and intents labelled by their own names (about
# an hour with --parallel). Tried for the default suite's icl rows and not shipped: both models
# reach 1.00 on the icl task (the names' meaning, learned in weights), none learns labels
# assigned in context, and the Llama learned retrieval first (docs/pair_names.md).
NAMES = replace(
    DEFAULT,
    # A fixed schedule, so that --parallel can train it.
    stages=(
        replace(DEFAULT.stages[0], steps=5000, max_extra_steps=0, classification=0.1, intents=0.35),
        Stage(800, seq_len=256, batch_size=8, facts=(2, 8), questions=(2, 4), intents=0.25),
        Stage(800, seq_len=512, batch_size=4, facts=(1, 10), questions=(1, 4), intents=0.25),
        Stage(800, seq_len=1024, batch_size=2, facts=(1, 12), questions=(1, 4), intents=0.25),
    ),
    decay_steps=1600,
    intent_names="own",
)

# The names preset's fixed schedule with the shipped (shuffled) intent labels, plus what in-context
# labels need and the shipped pair lacks: it copies only digits from context (a label word after
# a repeated key is at chance, a number at 0.87 for tiny-diff). Facts of the other formats get
# word values; keyed episodes bridge retrieval to intent episodes.
COPY = replace(
    NAMES,
    stages=(
        replace(NAMES.stages[0], classification=0.05, intents=0.25, keyed=0.1, word_values=0.5),
        *(replace(s, intents=0.25, keyed=0.05, word_values=0.5) for s in NAMES.stages[1:]),
    ),
    intent_names="shuffled",
)

PRESETS = {
    "default": DEFAULT,
    "names": NAMES,
    "copy": COPY,
    # Seconds on a CPU: exercises every code path for the tests.
    "smoke": Preset(
        hidden_size=32,
        n_layers=1,
        n_heads=2,
        head_dim=16,
        intermediate_size=64,
        vocab_size=320,
        stages=(
            Stage(steps=30, seq_len=64, batch_size=4, facts=(1, 2), questions=(1, 2)),
            Stage(steps=10, seq_len=128, batch_size=2, facts=(1, 3), questions=(1, 2)),
        ),
        lr=3e-3,
        warmup_steps=5,
        decay_steps=10,
        log_every=5,
        val_every=20,
        checkpoint_every=20,
        val_sequences=4,
        # Past the trained 128 tokens: in this tokenizer a needle or decoy is ~20 tokens and a
        # haystack sentence up to ~45, so 128 tokens often cannot hold both beside the question.
        eval_length=256,
        eval_samples=1,
        eval_distractors=2,
        eval_icl_shots=(1, 2),
        eval_icl_classes=2,
        eval_icl_draws=1,
        eval_icl_test=4,
        tokenizer_docs=150,
    ),
    # A larger pair for one GPU (not run here): same curriculum shape, longer final context.
    "gpu": Preset(
        hidden_size=512,
        n_layers=6,
        n_heads=8,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=4096,
        stages=(
            Stage(steps=8000, seq_len=256, batch_size=64, facts=(4, 8), questions=(3, 6)),
            Stage(steps=3000, seq_len=1024, batch_size=16, facts=(2, 16), questions=(2, 6)),
            Stage(steps=2000, seq_len=4096, batch_size=4, facts=(1, 20), questions=(1, 6)),
        ),
        lr=1e-3,
        warmup_steps=500,
        decay_steps=2000,
        tokenizer_docs=20000,
        dtype="bfloat16",
    ),
}


# ---------------------------------------------------------------------------------------------
# Procedural data. A document is a list of (text, kind) segments; kinds weight the loss.

FILLER, FACT, DIGITS, LABEL, PAD = 0, 1, 2, 3, 4

# Other key-value formats, so the model does not learn only the NIAH template:
# (fact, question, answer prefix); the answer is always " {value}".
KV_FORMATS = (
    (
        "The pass key for {key} is {value}.",
        "What is the pass key for {key}?",
        "The pass key for {key} is",
    ),
    ("Remember: {key} = {value}.", "Recall {key}.", "{key} ="),
    (
        "The {key} room is number {value}.",
        "Which number is the {key} room?",
        "The {key} room is number",
    ),
    ("Code for {key}: {value}.", "What is the code for {key}?", "Code for {key}:"),
)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "black", "white", "pink")
ANIMALS = ("fox", "owl", "cat", "horse", "whale", "tiger", "frog", "eagle", "wolf", "bear", "otter")
SYLLABLES = ("ka", "zo", "rip", "lu", "mek", "ta", "vo", "nim", "pa", "gu", "sel", "dra", "qui")
# Classification categories: a text is a few words of one category; labels are assigned per
# episode, so the only way to predict a label is to read the demonstrations.
CATEGORIES = (
    ("apple", "pear", "plum", "grape", "lemon", "cherry", "melon", "peach", "mango", "fig"),
    ("hammer", "saw", "drill", "wrench", "chisel", "shovel", "rake", "pliers", "axe", "file"),
    ("rain", "snow", "wind", "storm", "fog", "hail", "sunshine", "thunder", "frost", "cloud"),
    ("car", "bus", "train", "bicycle", "truck", "boat", "plane", "tram", "ferry", "scooter"),
    ("chair", "table", "sofa", "bed", "shelf", "desk", "lamp", "stool", "bench", "cabinet"),
    ("piano", "violin", "drum", "flute", "guitar", "trumpet", "harp", "cello", "banjo", "organ"),
    ("football", "tennis", "golf", "rugby", "hockey", "boxing", "rowing", "cricket", "skiing"),
    ("happy", "angry", "sad", "calm", "afraid", "proud", "bored", "excited", "lonely", "shy"),
    ("doctor", "nurse", "farmer", "pilot", "baker", "lawyer", "chef", "miner", "judge", "clerk"),
)


def nonsense_word(rng: random.Random) -> str:
    """A pronounceable made-up word of two or three syllables."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def colour_animal(rng: random.Random) -> str:
    """A two-word phrase such as "red fox"."""
    return f"{rng.choice(COLOURS)} {rng.choice(ANIMALS)}"


def kv_key(rng: random.Random, used: set[str]) -> str:
    """A fresh key for a non-NIAH fact: a city, a colour-animal pair or a nonsense word."""
    while True:
        r = rng.random()
        if r < 0.3:
            key = rng.choice(CITIES)
        elif r < 0.65:
            key = colour_animal(rng)
        else:
            key = nonsense_word(rng)
        if key not in used:
            used.add(key)
            return key


def kv_value(rng: random.Random, word_values: float = 0.0) -> str:
    """Mostly a 7-digit magic number, sometimes a shorter one; with `word_values`, that share of
    values are a colour-animal pair or a nonsense word."""
    # No draw when word_values is 0: the default preset's batch stream stays as it was.
    if word_values and rng.random() < word_values:
        return colour_animal(rng) if rng.random() < 0.5 else nonsense_word(rng)
    return magic_number(rng) if rng.random() < 0.8 else str(rng.randrange(100, 1_000_000))


def retrieval_facts(
    rng: random.Random, n_facts: int, word_values: float = 0.0
) -> list[tuple[list[tuple[str, int]], list[tuple[str, int]]]]:
    """(fact segments, question segments) per fact, 75% of sequences in the NIAH format (the
    others' values: see `kv_value`)."""
    niah = rng.random() < 0.75
    used: set[str] = set()
    cities = rng.sample(CITIES, n_facts) if niah else []
    out = []
    for i in range(n_facts):
        if niah:
            city, number = cities[i], magic_number(rng)
            fact_text, q, a = NEEDLE, QUESTION, ANSWER_PREFIX
            # NEEDLE ends "is: {number}."; split so the digits are their own segment.
            head = " " + fact_text.split(" {number}")[0].format(city=city)
            fact = [(head, FACT), (" " + number, FACT), (".", FACT)]
            question = [
                ("\n\n" + q.format(city=city) + "\n" + a.format(city=city), FILLER),
                (" " + number, DIGITS),
            ]
        else:
            fmt = rng.choice(KV_FORMATS)
            key, value = kv_key(rng, used), kv_value(rng, word_values)
            head, tail = fmt[0].split("{value}")
            fact = [(" " + head.format(key=key).rstrip(), FACT), (" " + value, FACT), (tail, FACT)]
            question = [
                ("\n\n" + fmt[1].format(key=key) + "\n" + fmt[2].format(key=key), FILLER),
                (" " + value, DIGITS),
            ]
        out.append((fact, question))
    return out


class SegmentLengths:
    """Token counts of segments, cached: filler sentences repeat a lot."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def n_tokens(self, text: str) -> int:
        return len(self.ids(text))


def retrieval_document(
    rng: random.Random, seq_len: int, stage: Stage, n_tokens: Callable[[str], int]
) -> list[tuple[str, int]]:
    """Facts at random depths in haystack filler, then questions about some of them."""
    n_facts = rng.randint(*stage.facts)
    n_questions = min(n_facts, rng.randint(*stage.questions))
    facts = retrieval_facts(rng, n_facts, stage.word_values)
    asked = rng.sample(range(n_facts), n_questions)
    used = 1 + sum(n_tokens(t) for f, _ in facts for t, _ in f)
    q_lens = [sum(n_tokens(t) for t, _ in facts[i][1]) for i in asked]
    # Drop questions that would not fit rather than truncate an answer away.
    while len(asked) > 1 and used + sum(q_lens) > seq_len:
        asked.pop()
        q_lens.pop()
    used += sum(q_lens)
    filler: list[str] = []
    while True:
        s = " " + sentence(rng)
        n = n_tokens(s)
        if used + n > seq_len:
            break
        filler.append(s)
        used += n
    slots = sorted(rng.randint(0, len(filler)) for _ in range(n_facts))
    doc: list[tuple[str, int]] = []
    fi = 0
    for pos, (fact, _) in zip(slots, facts, strict=True):
        doc.extend((s, FILLER) for s in filler[fi:pos])
        doc.extend(fact)
        fi = pos
    doc.extend((s, FILLER) for s in filler[fi:])
    if doc:
        doc[0] = (doc[0][0].lstrip(" "), doc[0][1])
    for i in asked:
        doc.extend(facts[i][1])
    return doc


def classification_document(rng: random.Random, seq_len: int) -> list[tuple[str, int]]:
    """Few-shot episode: texts of 2-4 categories labelled with episode-specific label words."""
    cats = rng.sample(range(len(CATEGORIES)), rng.randint(2, 4))
    kind = rng.random()
    labels: list[str] = []
    while len(labels) < len(cats):
        if kind < 0.4:
            w = nonsense_word(rng)
        elif kind < 0.7:
            w = rng.choice(COLOURS)
        else:
            w = rng.choice(ANIMALS)
        if w not in labels:
            labels.append(w)
    doc: list[tuple[str, int]] = []
    seen: set[int] = set()
    # ~12 tokens per example; the caller truncates the last one if it overflows.
    for _ in range(max(2, seq_len // 12)):
        c = rng.randrange(len(cats))
        words = rng.sample(CATEGORIES[cats[c]], rng.randint(1, 3))
        sep = "" if not doc else "\n"
        doc.append((f"{sep}text: {' '.join(words)}\nlabel:", FILLER))
        doc.append((" " + labels[c], LABEL if c in seen else FILLER))
        seen.add(c)
    return doc


def intent_labels(rng: random.Random, intents: list[str], names: str) -> list[str]:
    """Distinct label phrases for one episode's intents. `names="shuffled"`: half the episodes the
    icl dataset's intent names in a random assignment (so a name says nothing about which
    utterances it labels), a quarter colour-animal pairs, a quarter nonsense words. `names="own"`:
    40% of the episodes the intents' own names (what a pretrained model knows of "book flight"),
    30% colour-animal pairs, 30% nonsense. Colour-animal and nonsense labels are readable only
    from the context."""
    kind = rng.random()
    if names == "own":
        if kind < 0.4:
            return list(intents)
        animal_below = 0.7
    else:
        if kind < 0.5:
            return rng.sample(list(icl_datasets.INTENTS), len(intents))
        animal_below = 0.75
    labels: list[str] = []
    while len(labels) < len(intents):
        w = colour_animal(rng) if kind < animal_below else nonsense_word(rng)
        if w not in labels:
            labels.append(w)
    return labels


def intent_episode(rng: random.Random, seq_len: int, names: str) -> list[tuple[str, int]]:
    """Many-shot episode in the icl task's default format (`utterance: ...\nintent: ...`,
    demonstrations apart by a blank line), utterances from its intent generator; a label is
    weighted from the second demonstration of its intent on."""
    n_classes = rng.randint(2, max(2, min(len(icl_datasets.INTENTS), seq_len // 32)))
    intents = rng.sample(list(icl_datasets.INTENTS), n_classes)
    labels = intent_labels(rng, intents, names)
    # ~20 tokens per demonstration; the caller truncates the last one if it overflows.
    return intent_demonstrations(
        rng,
        max(2, seq_len // 16),
        labels,
        lambda c: icl_datasets._utterance(icl_datasets.INTENTS[intents[c]], rng),
    )


def intent_demonstrations(
    rng: random.Random, count: int, labels: list[str], utterance: Callable[[int], str]
) -> list[tuple[str, int]]:
    """`count` demonstrations in the icl task's default format (`utterance: ...\nintent: ...`,
    apart by a blank line) of classes drawn at random, `utterance(c)` giving class c's text; a
    label is weighted from the second demonstration of its class on."""
    doc: list[tuple[str, int]] = []
    seen: set[int] = set()
    for _ in range(count):
        c = rng.randrange(len(labels))
        text = utterance(c)
        sep = "" if not doc else "\n\n"
        doc.append((f"{sep}utterance: {text}\nintent:", FILLER))
        doc.append((" " + labels[c], LABEL if c in seen else FILLER))
        seen.add(c)
    return doc


def keyed_episode(rng: random.Random, seq_len: int) -> list[tuple[str, int]]:
    """Intent-format episode whose inputs are single keys (cities or nonsense words), each
    repeated exactly: `utterance: Lima\nintent: red fox`. A label is predictable from the key's
    earlier demonstration alone, the bridge from retrieval (copy what followed the same key) to
    intent episodes (copy what followed a similar utterance). Labels as `intent_labels`."""
    n_classes = rng.randint(2, 8)
    keys: list[str] = []
    while len(keys) < n_classes:
        key = rng.choice(CITIES) if rng.random() < 0.5 else nonsense_word(rng)
        if key not in keys:
            keys.append(key)
    # Never the keys themselves ("own" would label a key by its own name).
    labels = intent_labels(rng, keys, "shuffled")
    # ~10 tokens per demonstration; the caller truncates the last one if it overflows.
    return intent_demonstrations(rng, max(2, seq_len // 10), labels, keys.__getitem__)


DOCUMENT_KINDS = (
    ("qa", hallucination_data.qa_rows, 0.5),
    ("tempting", hallucination_data.tempting_rows, 0.2),
    # The summaries' wording the shipped set trained on: the task's references changed wording
    # after it was trained (9410c0f), and the default preset's stream must stay the one that
    # trained bench/models, or a model joined to the set would not see the set's batches.
    ("summary", functools.partial(hallucination_data.summary_rows, reference="attended"), 0.3),
)
# The shipped hallucination set is never trained on: a generated row equal to one is redrawn.
HELD_OUT_DOCUMENTS = frozenset(
    row["document"] for rows in hallucination_data.build().values() for row in rows
)


def document_qa(
    rng: random.Random, seq_len: int, n_tokens: Callable[[str], int]
) -> list[tuple[str, int]] | None:
    """A short invented document and its question (or a summary request) in the hallucination
    task's prompt, answered from the document; None when it does not fit `seq_len` tokens."""
    r, acc = rng.random(), 0.0
    for _kind, rows_of, share in DOCUMENT_KINDS:  # noqa: B007
        acc += share
        if r < acc:
            break
    while True:
        row = rng.choice(rows_of(rng))
        if row["document"] not in HELD_OUT_DOCUMENTS:
            break
    if row["question"]:
        template = hallucination.QA_PROMPT.replace("{question}", row["question"])
        cue = hallucination.QA_CUE
    else:
        template, cue = hallucination.SUMMARY_PROMPT, hallucination.SUMMARY_CUE
    # The prompt exactly as the task renders it for a model without a chat template.
    prompt = template.replace("{document}", row["document"]) + "\n" + cue
    answer = " " + row["reference"]
    if 1 + n_tokens(prompt) + n_tokens(answer) + n_tokens("\n#") > seq_len:
        return None
    return [(prompt, FILLER), (answer, LABEL), ("\n#", LABEL)]


def encode(
    doc: list[tuple[str, int]], seq_len: int, seg: SegmentLengths
) -> tuple[list[int], list[int]]:
    """BOS + segment ids truncated/padded to `seq_len`, and a per-token kind."""
    tok = seg.tokenizer
    ids, kinds = [tok.bos_token_id], [FILLER]
    for text, kind in doc:
        t = seg.ids(text) if kind == FILLER else tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        kinds.extend([kind] * len(t))
    ids, kinds = ids[:seq_len], kinds[:seq_len]
    pad = seq_len - len(ids)
    return ids + [tok.pad_token_id] * pad, kinds + [PAD] * pad


def make_batch(
    rng: random.Random, stage: Stage, seg: SegmentLengths, names: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids (B, L) and token kinds (B, L) for one optimizer step (`names`: intent labels,
    see `intent_labels`)."""
    rows = []
    for _ in range(stage.batch_size):
        r = rng.random()
        doc: list[tuple[str, int]] | None = None
        if r < stage.classification:
            doc = classification_document(rng, stage.seq_len)
        elif r < stage.classification + stage.intents:
            doc = intent_episode(rng, stage.seq_len, names)
        elif r < stage.classification + stage.intents + stage.keyed:
            doc = keyed_episode(rng, stage.seq_len)
        elif r < stage.classification + stage.intents + stage.keyed + stage.documents:
            doc = document_qa(rng, stage.seq_len, seg.n_tokens)  # None: it does not fit
        if doc is None:
            doc = retrieval_document(rng, stage.seq_len, stage, seg.n_tokens)
        rows.append(encode(doc, stage.seq_len, seg))
    ids = torch.tensor([r[0] for r in rows])
    kinds = torch.tensor([r[1] for r in rows])
    return ids, kinds


def tokenizer_corpus(n_docs: int, seed: int, names: str) -> list[str]:
    """Generated documents of every kind, for training the BPE tokenizer."""
    rng = random.Random(seed)
    stage = Stage(steps=0, seq_len=256, batch_size=1, facts=(1, 6), questions=(1, 4))
    texts = []
    for i in range(n_docs):
        if i % 10 == 0:
            doc = classification_document(rng, 256)
        elif i % 10 in (1, 2):
            doc = intent_episode(rng, 256, names)
        elif i % 10 in (3, 4):
            doc = document_qa(rng, 10_000, len) or []
        else:
            # Budgeted in characters: the tokenizer does not exist yet.
            doc = retrieval_document(rng, 1200, stage, len)
        texts.append("".join(t for t, _ in doc))
    return texts


# ---------------------------------------------------------------------------------------------
# Training.


def weighted_loss(
    model: PreTrainedModel, ids: torch.Tensor, kinds: torch.Tensor
) -> tuple[torch.Tensor, float, float, float]:
    """Weighted next-token loss, plus the unweighted LM loss, the answer-digit loss and the
    in-context label loss (NaN for a batch without digits or labels)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    target, tkind = ids[:, 1:], kinds[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none")
    ce = ce.view_as(target)
    answer = (tkind == DIGITS) | (tkind == LABEL)
    weight = torch.where(answer, 1.0, REST_WEIGHT) * (tkind != PAD)
    loss = (ce * weight).sum() / weight.sum()
    real = tkind != PAD
    digits = tkind == DIGITS
    lm = (ce * real).sum() / real.sum()
    ans = (ce * digits).sum() / digits.sum().clamp(min=1)
    labels = tkind == LABEL
    lab = (ce * labels).sum() / labels.sum().clamp(min=1)
    nan = float("nan")
    return (
        loss,
        lm.item(),
        ans.item() if digits.any() else nan,
        lab.item() if labels.any() else nan,
    )


@torch.no_grad()
def validation(model: PreTrainedModel, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Mean weighted, LM, answer-digit and label losses over fixed validation batches (the last
    two over the batches that have such tokens)."""
    model.eval()
    out = [weighted_loss(model, ids, kinds) for ids, kinds in batches]
    model.train()

    def mean(values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else float("nan")

    return {
        "loss": mean([o[0].item() for o in out]),
        "lm_loss": mean([o[1] for o in out]),
        "answer_loss": mean([o[2] for o in out]),
        "label_loss": mean([o[3] for o in out]),
    }


@dataclass
class Run:
    """One model's training state and record."""

    name: str
    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    answer_window: deque = field(default_factory=lambda: deque(maxlen=BREAK_WINDOW))
    break_step: int | None = None
    seconds: float = 0.0
    # loss, lm, ans, n, n_ans, label, n_label
    sums: list[float] = field(default_factory=lambda: [0.0] * 7)
    last_train: dict = field(default_factory=dict)
    last_val: dict = field(default_factory=dict)


MODELS = tuple(ARCHITECTURES)  # tiny-base, tiny-diff, tiny-diff2
KINDS = {
    "tiny-base": ("Transformer (Llama)", "llama"),
    "tiny-diff": ("Differential Transformer (DiffLlama)", "diffllama"),
    "tiny-diff2": ("Differential Transformer V2 (DIFF V2)", "diff-v2"),
}


def build_runs(
    preset: Preset, tokenizer: PreTrainedTokenizerFast, seed: int, names: tuple[str, ...] = MODELS
) -> list[Run]:
    """The Llama baseline and the matched DiffLlama and DIFF V2 (those in `names`), identically
    seeded and optimized."""
    configs = tiny_configs(
        tokenizer,
        hidden_size=preset.hidden_size,
        n_layers=preset.n_layers,
        n_heads=preset.n_heads,
        head_dim=preset.head_dim,
        intermediate_size=preset.intermediate_size,
        max_context=preset.final_len,
    )
    runs = []
    for name in names:
        torch.manual_seed(seed)
        model = ARCHITECTURES[name](configs[name])
        model.train()
        opt = torch.optim.AdamW(
            model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=preset.weight_decay
        )
        runs.append(Run(name, model, opt, wsd_schedule(opt, preset, preset.total_steps)))
    return runs


def wsd_schedule(
    optimizer: torch.optim.Optimizer, preset: Preset, total_steps: int, done_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup-stable-decay over `total_steps`, positioned after `done_steps` optimizer steps."""
    return get_wsd_schedule(
        optimizer,
        num_warmup_steps=preset.warmup_steps,
        num_decay_steps=preset.decay_steps,
        num_training_steps=total_steps,
        min_lr_ratio=preset.min_lr_ratio,
        last_epoch=done_steps - 1,
    )


def train(
    preset: Preset,
    runs: list[Run],
    seg: SegmentLengths,
    seed: int,
    out: Path,
    resume: bool,
    expect_tokens: dict[int, int] | None = None,
) -> tuple[list[dict], list[int]]:
    """Lockstep training of all runs on one batch stream; the logged rows and steps per stage.
    `expect_tokens` (step -> tokens seen, from a set being joined) stops training at the first
    logged step whose batch stream has diverged from it."""
    names = preset.intent_names
    rng = random.Random(seed)
    vrng = random.Random(seed + 10_000)
    rows: list[dict] = []
    planned = [s.steps for s in preset.stages]
    step, tokens, first_stage, done = 0, 0, 0, 0
    val_batches: list | None = None
    t0 = time.time()
    state_path = out / ".train_state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, weights_only=True)
        rng.setstate(st["rng"])
        vrng.setstate(st["vrng"])
        rows, planned, val_batches = st["rows"], st["planned"], st["val_batches"]
        # A preset that gained stages since the state was saved continues into them.
        planned += [s.steps for s in preset.stages[len(planned) :]]
        step, tokens, first_stage, done = st["step"], st["tokens"], st["stage"], st["done"]
        t0 -= st["elapsed"]
        for run, rs in zip(runs, st["runs"], strict=True):
            run.model.load_state_dict(rs.pop("model"))
            run.optimizer.load_state_dict(rs.pop("optimizer"))
            run.scheduler = wsd_schedule(run.optimizer, preset, sum(planned), step)
            run.answer_window = deque(rs.pop("answer_window"), maxlen=BREAK_WINDOW)
            for k, v in rs.items():
                setattr(run, k, v)
        print(f"resumed from {state_path} at step {step}", flush=True)

    def save_state(si: int) -> None:
        # Everything needed to continue bit-for-bit: weights, optimizer moments, RNG states.
        st = {
            "rng": rng.getstate(),
            "vrng": vrng.getstate(),
            "rows": rows,
            "planned": planned,
            "val_batches": val_batches,
            "step": step,
            "tokens": tokens,
            "stage": si,
            "done": done,
            "elapsed": time.time() - t0,
            "runs": [
                {
                    "model": r.model.state_dict(),
                    "optimizer": r.optimizer.state_dict(),
                    "answer_window": list(r.answer_window),
                    "break_step": r.break_step,
                    "seconds": r.seconds,
                    "sums": r.sums,
                    "last_train": r.last_train,
                    "last_val": r.last_val,
                }
                for r in runs
            ],
        }
        tmp = state_path.with_suffix(".tmp")
        torch.save(st, tmp)
        os.replace(tmp, state_path)

    def all_broke() -> bool:
        breaks = [r.break_step for r in runs]
        return all(b is not None for b in breaks) and step - max(breaks) >= preset.break_margin  # type: ignore[type-var,operator]

    def log_val(si: int, stage: Stage, val_batches: list) -> None:
        for run in runs:
            run.last_val = validation(run.model, val_batches)
            rows.append(_row(run, "val", step, si, stage, tokens, t0, run.last_val))
        print(
            "  val "
            + " ".join(
                f"{r.name}: loss {r.last_val['loss']:.3f} "
                f"lm {r.last_val['lm_loss']:.3f} ans {r.last_val['answer_loss']:.3f} "
                f"label {r.last_val['label_loss']:.3f}"
                for r in runs
            ),
            flush=True,
        )
        write_curves(rows, out)

    for si in range(first_stage, len(preset.stages)):
        stage = preset.stages[si]
        if val_batches is None:
            val_batches = [
                make_batch(vrng, Stage(**{**asdict(stage), "batch_size": 4}), seg, names)
                for _ in range(max(1, preset.val_sequences // 4))
            ]
            done = 0
        while True:
            if done == planned[si]:
                extra = stage.steps + stage.max_extra_steps - planned[si]
                if extra <= 0 or all_broke():
                    break
                # A stage that ends before both answer losses broke is lengthened for both
                # models alike; the decay, which follows it, moves with it.
                planned[si] += min(preset.extend_block, extra)
                for run in runs:
                    run.scheduler = wsd_schedule(run.optimizer, preset, sum(planned), step)
                print(f"stage {si} extended to {planned[si]} steps: answer losses not both broken")
            ids, kinds = make_batch(rng, stage, seg, names)
            step += 1
            done += 1
            tokens += int((kinds != PAD).sum())
            for run in runs:
                t = time.time()
                loss, lm, ans, lab = weighted_loss(run.model, ids, kinds)
                run.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
                run.optimizer.step()
                run.scheduler.step()
                run.seconds += time.time() - t
                has_ans, has_lab = not math.isnan(ans), not math.isnan(lab)
                values = (loss.item(), lm, ans if has_ans else 0.0, 1.0, has_ans,
                          lab if has_lab else 0.0, has_lab)  # fmt: skip
                for i, v in enumerate(values):
                    run.sums[i] += v
                if has_ans:
                    run.answer_window.append(ans)
                if (
                    run.break_step is None
                    and len(run.answer_window) == BREAK_WINDOW
                    and sum(run.answer_window) / BREAK_WINDOW < BREAK_NATS
                ):
                    run.break_step = step
                    print(f"[{run.name}] answer loss broke below {BREAK_NATS} at step {step}")
            if step % preset.log_every == 0:
                if expect_tokens is not None and expect_tokens.get(step, tokens) != tokens:
                    raise SystemExit(
                        f"error: at step {step} {tokens:,} tokens seen, the set saw "
                        f"{expect_tokens[step]:,}: not the set's batch stream (other tokenizer, "
                        "seed or preset)"
                    )
                for run in runs:
                    n = run.sums[3]
                    run.last_train = {
                        "loss": run.sums[0] / n,
                        "lm_loss": run.sums[1] / n,
                        "answer_loss": run.sums[2] / max(run.sums[4], 1),
                        "label_loss": run.sums[5] / run.sums[6] if run.sums[6] else math.nan,
                    }
                    run.sums = [0.0] * 7
                    rows.append(_row(run, "train", step, si, stage, tokens, t0, run.last_train))
                print(
                    f"step {step}/{sum(planned)} len {stage.seq_len} "
                    f"lr {runs[0].scheduler.get_last_lr()[0]:.2e} "
                    + " ".join(
                        f"{r.name}: loss {r.last_train['loss']:.3f} "
                        f"ans {r.last_train['answer_loss']:.3f} "
                        f"label {r.last_train['label_loss']:.3f}"
                        for r in runs
                    )
                    + f" [{time.time() - t0:.0f}s]",
                    flush=True,
                )
            if step % preset.val_every == 0:
                log_val(si, stage, val_batches)
            if preset.checkpoint_every and step % preset.checkpoint_every == 0:
                save_state(si)
        if step % preset.val_every != 0:
            log_val(si, stage, val_batches)
        val_batches = None
    state_path.unlink(missing_ok=True)
    return rows, planned


def _row(run: Run, split: str, step: int, si: int, stage: Stage, tokens: int, t0: float, m: dict):
    return {
        "model": run.name,
        "split": split,
        "step": step,
        "stage": si,
        "seq_len": stage.seq_len,
        "tokens_seen": tokens,
        "lr": run.scheduler.get_last_lr()[0],
        "loss": round(m["loss"], 5),
        "lm_loss": round(m["lm_loss"], 5),
        "answer_loss": round(m["answer_loss"], 5),
        "label_loss": round(m["label_loss"], 5),
        "elapsed_s": round(time.time() - t0, 1),
    }


def write_curves(rows: list[dict], out: Path) -> None:
    """training_curves.csv (one row per model, split and step) and its figure, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".csv")
    with os.fdopen(fd, "w", newline="") as f:
        # A set trained before a loss was logged has no column for it: the union, blank there.
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    Path(tmp).chmod(0o644)
    os.replace(tmp, out / "training_curves.csv")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for name, colour in zip(MODELS, ("tab:blue", "tab:red", "tab:green"), strict=True):
        for split, style in (("train", "-"), ("val", "o--")):
            rs = [r for r in rows if r["model"] == name and r["split"] == split]
            if not rs:
                continue
            x = [r["step"] for r in rs]
            kw = dict(color=colour, label=f"{name} {split}", markersize=3)
            axes[0].plot(x, [r["lm_loss"] for r in rs], style, **kw)
            axes[1].plot(x, [r["answer_loss"] for r in rs], style, **kw)
            axes[2].plot(x, [r.get("label_loss", math.nan) for r in rs], style, **kw)
    axes[0].set_title("LM loss (all tokens)")
    axes[1].set_title("answer-digit loss (nats/digit)")
    axes[1].axhline(LN10, color="grey", lw=0.8, ls=":", label="chance (ln 10)")
    axes[2].set_title("in-context label loss (nats/token)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    Path(tmp).chmod(0o644)
    os.replace(tmp, out / "training_curves.png")


# ---------------------------------------------------------------------------------------------
# The check of the saved pair: diffbench's own niah and icl tasks, run by its runner.

EVAL_DIR = ".pair_check"  # the check's run directory; hidden: neither committed nor packaged
EVAL_MODES = ("score", "generate")


def niah_options(preset: Preset) -> dict[str, Any]:
    """The niah task options of the check (every other option keeps the task's default)."""
    return {
        "lengths": (preset.niah_len,),
        "needles": preset.eval_needles,
        "samples": preset.eval_samples,
        "distractors": preset.eval_distractors,
    }


def icl_options(preset: Preset) -> dict[str, Any]:
    """The icl task options of the check."""
    return {
        "classes": preset.eval_icl_classes,
        "shots": preset.eval_icl_shots,
        "draws": preset.eval_icl_draws,
        "test_size": preset.eval_icl_test,
    }


def set_flags(task: str, options: dict[str, Any]) -> str:
    """The `--set TASK.KEY=VALUE` flags that give a task these options, as card text."""
    return " ".join(
        f"`--set {task}.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}`"
        for k, v in options.items()
    )


def model_options(preset: Preset) -> dict[str, Any]:
    """The hf backend options of the check: an accelerator when there is one, and the context."""
    return {"device": "auto", "max_length": max(preset.niah_len, preset.final_len)}


def evaluate(
    names: list[str], preset: Preset, out: Path
) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, int], float]]:
    """NIAH accuracy per (model, N/R, mode) over all depths and ICL accuracy per (model, shots),
    from the metrics.csv of one diffbench run of the niah and icl tasks."""
    run_dir = out / EVAL_DIR
    # A run left by an earlier training holds other weights, which the runner refuses to resume.
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = RunConfig(
        tasks=("niah", "icl"),
        models=tuple(ModelSpec(n, str((out / n).resolve()), model_options(preset)) for n in names),
        task_options={"niah": niah_options(preset), "icl": icl_options(preset)},
        output=run_dir,
    )
    metrics = RunStore(runner.run(cfg)).metrics()
    acc = metrics[metrics["metric"] == "accuracy"]
    niah = acc[(acc["task"] == "niah") & (acc["depth"] == ALL)]
    icl = acc[(acc["task"] == "icl") & (acc["draw"] == ALL)]
    return (
        {
            (r.model, f"{int(r.needles)}/{int(r.queries)}", r.mode): float(r.value)
            for r in niah.itertuples(index=False)
        },
        {(r.model, int(r.shots)): float(r.value) for r in icl.itertuples(index=False)},
    )


# ---------------------------------------------------------------------------------------------
# Saving.


def n_params(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def save_pair(
    runs: list[Run], tokenizer: PreTrainedTokenizerFast, preset: Preset, out: Path
) -> None:
    """HF folders with weights and tokenizer, each replaced atomically."""
    dtype = getattr(torch, preset.dtype)
    for run in runs:
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{run.name}-"))
        run.model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        final = out / run.name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def write_cards(
    runs: list[Run],
    preset: Preset,
    preset_name: str,
    seed: int,
    steps: list[int],
    tokens: int,
    evals: dict[tuple[str, str, str], float],
    icl: dict[tuple[str, int], float],
    out: Path,
    joined: tuple[str, ...] = (),
) -> None:
    """Each saved folder's README.md (not part of a model's fingerprint), written atomically."""
    for run in runs:
        card = model_card(run, runs, preset, preset_name, seed, steps, tokens, evals, icl, joined)
        write_atomic(out / run.name / "README.md", card)


# The card's words for each `Preset.intent_names` scheme (see `intent_labels`).
INTENT_LABELS = {
    "shuffled": "Each episode assigns its own label phrases: half of the episodes the intent names "
    "themselves, shuffled among the intents (so a name says nothing about its utterances), the "
    "rest colour-animal pairs or nonsense words. A label can only be predicted from an earlier "
    "demonstration of its intent, which is in-context learning, not the dataset's mapping.",
    "own": "In 40% of the episodes the labels are the intents' own names, so the model learns "
    'what each name means, as a pretrained model knows what "book flight" means (the `icl` '
    "task's test utterances are other draws from the same templates); in the rest each episode "
    "assigns its own label phrases, colour-animal pairs or nonsense words, which only an earlier "
    "demonstration of the intent can predict.",
}


def _loss(x: float) -> str:
    """A loss for a card's table; – where it was not logged (a set trained before it was)."""
    return "–" if math.isnan(x) else f"{x:.3f}"


def model_card(
    run: Run,
    runs: list[Run],
    preset: Preset,
    preset_name: str,
    seed: int,
    steps: list[int],
    tokens: int,
    evals: dict[tuple[str, str, str], float],
    icl: dict[tuple[str, int], float],
    joined: tuple[str, ...] = (),
) -> str:
    """A README.md describing recipe, data, matching rule and results of one checkpoint."""
    kind, tag = KINDS[run.name]
    names = " / ".join(f"`{r.name}`" for r in runs)
    stages = "\n".join(
        f"| {i} | {n} | {s.seq_len} | {s.batch_size} | {s.facts[0]}-{s.facts[1]} | "
        f"{s.questions[0]}-{s.questions[1]} | {s.classification:.0%} | {s.intents:.0%} | "
        f"{s.keyed:.0%} | {s.documents:.0%} | {s.word_values:.0%} |"
        for i, (s, n) in enumerate(zip(preset.stages, steps, strict=True))
    )
    evals_rows = "\n".join(
        f"| {r.name} | {pair} | "
        + " | ".join(f"{evals[(r.name, pair, mode)]:.2f}" for mode in EVAL_MODES)
        + " |"
        for r in runs
        for pair in preset.eval_needles
    )
    loss_rows = "\n".join(
        f"| {r.name} | {n_params(r.model):,} | "
        + " / ".join(_loss(r.last_train[k]) for k in LOSS_KEYS)
        + " | "
        + " / ".join(_loss(r.last_val[k]) for k in LOSS_KEYS)
        + f" | {r.break_step or 'never'} | {r.seconds / 60:.1f} |"
        for r in runs
    )
    icl_rows = "\n".join(
        f"| {r.name} | "
        + " | ".join(f"{icl[(r.name, k)]:.2f}" for k in preset.eval_icl_shots)
        + " |"
        for r in runs
    )
    icl_head = " | ".join(f"{k} shots" for k in preset.eval_icl_shots)
    icl_set = set_flags("icl", icl_options(preset))
    pair = preset.eval_needles[0]
    first = [evals[(r.name, pair, "score")] for r in runs]
    learned = (
        f"all retrieve the queried needle's number at context {preset.niah_len} ({pair} needles: "
        f"score accuracy at least {min(first):.2f}), so a score near chance points at the "
        "harness, not the model"
        if min(first) >= 0.9
        else f"NOT all retrieve reliably at context {preset.niah_len} ({pair} needles: score "
        "accuracy "
        + ", ".join(f"{r.name} {a:.2f}" for r, a in zip(runs, first, strict=True))
        + "), so low scores may be the model's, not the harness's"
    )
    h = preset.n_heads
    params = ", ".join(f"{r.name} {n_params(r.model):,}" for r in runs)
    v2 = next((r for r in runs if r.name == "tiny-diff2"), None)
    mlp_note = " (DIFF V2: below)" if v2 is not None else ""
    v2_rule = (
        f"""

DIFF V2 (`tiny-diff2`, `diffbench.modeling.diff_v2`) keeps the baseline's {h} heads of
{preset.head_dim} as its output heads: its query projection makes {2 * h} heads (heads 2i and
2i+1 a pair in one GQA group), its lambda projection {h} values per token (lambda = sigmoid), and
out_i = attn_2i - lambda_i attn_2i+1 goes through the baseline's o_proj shape. Those two
projections add {(h * preset.head_dim + h) * preset.hidden_size:,} parameters per layer; its MLP
gives them back (intermediate size {v2.model.config.intermediate_size} instead of
{preset.intermediate_size}), so the attention differs and the budget does not."""
        if v2 is not None
        else ""
    )
    joined_note = "".join(
        f"""
- `{name}` joined the set later (`--join`): the set's own tokenizer, the same batch stream from
  seed {seed}, the set's stage steps as recorded in training_curves.csv (no stage lengthened),
  and the set's token counts checked at every logged step, so it saw exactly the batches the
  others saw."""
        for name in joined
    )
    niah_set = set_flags("niah", niah_options(preset))
    model_set = ", ".join(f"`{k}={v}`" for k, v in model_options(preset).items())
    beyond = (
        f" (past the trained {preset.final_len} tokens)"
        if preset.niah_len > preset.final_len
        else ""
    )
    return f"""---
library_name: transformers
tags: [diffbench, tiny, {tag}, synthetic]
---

# {run.name}: tiny {kind} for diffbench

A {n_params(run.model):,}-parameter {kind} trained from scratch on a procedural retrieval
curriculum (needle retrieval, many-shot intent episodes, document QA and summaries) by
`scripts/train_pair.py --preset {preset_name} --seed {seed}`. It ships with
diffbench as one of a matched set ({names}) so the harness's tasks run
end to end on a CPU with models that *can* retrieve. It is a test fixture, not a language model.

## Matching rule
All models have {preset.n_layers} layers, hidden size {preset.hidden_size}, MLP size
{preset.intermediate_size}{mlp_note}, `num_attention_heads = num_key_value_heads = {h}`, head dim
{preset.head_dim}, vocab {run.model.config.vocab_size}, untied embeddings, RoPE, context
{preset.final_len}. transformers' DiffLlama counts `num_attention_heads` as the *baseline's*
heads: Q/K head i is paired with head i + {h // 2}, and the values of the pair are concatenated,
so it has {h // 2} differential heads of value width {2 * preset.head_dim} and projection
matrices of exactly the baseline's shapes. This is the paper's rule (DIFF heads = Transformer
heads / 2, same width and head dimension, parameter count matched). The only extra parameters
are the 4 x {preset.head_dim} lambda vectors per layer ({4 * preset.head_dim * preset.n_layers}
in total).{v2_rule}

Parameters: {params}.

## Training (identical for every model)
- Tokenizer: byte-level BPE (`diffbench.tiny.train_tokenizer`) trained on generated text,
  digits split one per token, so a 7-digit number is always 7 tokens. No chat template.
- Data order: one batch stream (seed {seed}); every model consumes the same batches in the same
  order (in lockstep, or with `--parallel` in processes generating the same stream).{joined_note}
- Optimizer: AdamW, lr {preset.lr}, betas (0.9, 0.95), weight decay {preset.weight_decay},
  grad-norm clip 1.0. Schedule: `transformers.get_wsd_schedule`, {preset.warmup_steps} warmup
  steps, constant, cosine decay to {preset.min_lr_ratio} x lr over the last {preset.decay_steps}
  steps (the long-context ones). Loss: next-token cross-entropy with weight 1 on answer digits
  and in-context labels and {REST_WEIGHT} on every other token.
- Curriculum ({sum(steps)} steps, {tokens:,} non-pad tokens seen):

| stage | steps | context | batch | facts/seq | questions/seq | toy classes | intents | keyed \
| documents | word values |
|---|---|---|---|---|---|---|---|---|---|---|
{stages}

## Data (all procedural, nothing downloaded)
- Filler: `diffbench.tasks.haystack.sentence`, as in the NIAH task's haystacks.
- Facts: 75% of retrieval sequences use exactly the NIAH needle
  `{NEEDLE}` with distinct cities and fresh random numbers per sequence, at random depths,
  followed by questions in the exact evaluation format
  `\\n\\n{QUESTION}\\n{ANSWER_PREFIX} {{number}}`. The rest use other key-value
  formats (pass keys, `key = value`, room numbers, codes) with city, colour-animal or nonsense
  keys, so retrieval is not tied to one template; their values are numbers, or in the stages'
  "word values" share a colour-animal pair or a nonsense word.
- Toy classes: few-shot episodes of `text: <1-3 words>\\nlabel: <word>`
  pairs from 2-4 word categories (fruit, tools, weather, ...); each episode assigns fresh label
  words (nonsense, colours or animals), so labels can only be read from the context.
- Intents: many-shot episodes in the `icl` task's default format (`utterance: ...\\nintent: ...`,
  a blank line between demonstrations), utterances from its generated intent set
  (`diffbench.tasks.icl_datasets`), 2 to {len(icl_datasets.INTENTS)} intents per episode.
  {INTENT_LABELS[preset.intent_names]} Labels are weighted from their second occurrence on. Real
  benchmark label names (TREC, Banking77) never occur.
- Keyed episodes: the same format with one key per "utterance" (a city or a nonsense word)
  repeated exactly, labelled as the shuffled intent episodes; a label follows from the key's
  earlier demonstration alone.
- Documents: invented towns, settings that override a well-known fact, and event reports from
  the hallucination task's generator (`diffbench.tasks.hallucination_data.generate`, fresh
  seeds), in that task's QA and summary prompts (`#Document#: ... #Question#: ... #Answer#:` /
  `#Summary#:`), the reference answer after the cue (weight 1). A generated document equal to
  one of the shipped evaluation rows is redrawn, so the shipped set stays held out. Sequences
  too short for a document (stage 0) get a retrieval sequence instead.

## Results
Losses in nats (weighted = training objective; LM = all tokens; answer = answer digits, chance
ln 10 = {LN10:.2f}; label = in-context labels and document answers, per token); train = mean of
the last {preset.log_every} steps, validation = held-out sequences at context {preset.final_len}.
Break step = first step where the answer loss's running mean over {BREAK_WINDOW} steps fell below
{BREAK_NATS}.

| model | params | train weighted/LM/answer/label | val same | break step | minutes |
|---|---|---|---|---|---|
{loss_rows}

NIAH at context {preset.niah_len}{beyond}: diffbench's own `niah` task, run on the saved
checkpoints by `diffbench.runner.run` into `{EVAL_DIR}/` beside them (its `run.json` holds the
configuration: {niah_set}, model options {model_set}, seed {RunConfig.seed}). Each number is
that run's metrics.csv accuracy at depth `all`: the mean over niah's default depths of per-depth
accuracy, prompts per depth: {preset.eval_samples}. Score: the queried number ranks first by
summed log-likelihood among {preset.eval_distractors + 1} choices, every one of which stands in
the context in a needle for its own city (chance {1 / (preset.eval_distractors + 1):.2f}).
Generate: the greedy answer contains the number.

| model | needles N/R | score acc | generate acc |
|---|---|---|---|
{evals_rows}

In-context learning, in the same run: diffbench's `icl` task ({icl_set}), {preset.eval_icl_classes}
of the generated intents with their own names as labels (chance
{1 / preset.eval_icl_classes:.2f}), demonstrations in random order, accuracy over
{preset.eval_icl_draws} draws of demonstrations per shot count.

| model | {icl_head} |
|---|{"---|" * len(preset.eval_icl_shots)}
{icl_rows}

## What a score on this pair means
The set is matched in everything but the attention mechanism; {learned}. A diffbench task run
on it checks the harness end to end and gives a small, noisy signal about DIFF vs Transformer
behaviour on *in-distribution* synthetic retrieval. It says nothing about natural language,
knowledge or the paper's scale: contexts beyond {preset.final_len} tokens are out of
distribution (RoPE positions never seen), the intent episodes and documents are generated
from the same templates as the suite's default datasets (other draws, the shipped rows held out),
and differences between two {preset.n_layers}-layer models trained for minutes
are within seed noise unless they are large. Use the `gpu` preset or real checkpoints for
claims about the method.
"""


# ---------------------------------------------------------------------------------------------
# Two processes: each model trains on its own core, on the same batch stream.

TOKENIZER_DIR = ".tokenizer"  # the pair's tokenizer, shared by the two training processes


def child_dir(out: Path, name: str) -> Path:
    """Where one model's process keeps its resumable state, curves and result."""
    return out / f".train-{name}"


def check_parallel(preset: Preset) -> None:
    """Refuse a preset whose stages lengthen on the answer losses: that decision needs both
    models, which separate processes do not see."""
    if any(s.max_extra_steps for s in preset.stages):
        raise SystemExit(
            "error: --parallel needs a preset without max_extra_steps (a stage lengthened on "
            "both models' answer losses needs them in one process); train it without --parallel"
        )


def train_one(args: argparse.Namespace, preset: Preset) -> int:
    """`--only NAME`: train one model of the pair, as `--parallel` starts it, into its own
    folder; its weights and record go to result.pt there."""
    check_parallel(preset)
    tok_dir = args.out / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise SystemExit(f"error: no tokenizer at {tok_dir}; --only is started by --parallel")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    runs = build_runs(preset, tokenizer, args.seed, (args.only,))
    work = child_dir(args.out, args.only)
    work.mkdir(parents=True, exist_ok=True)
    rows, steps = train(preset, runs, SegmentLengths(tokenizer), args.seed, work, args.resume)
    (run,) = runs
    record = {k: getattr(run, k) for k in ("break_step", "seconds", "last_train", "last_val")}
    result = {"rows": rows, "steps": steps, "model": run.model.state_dict(), "record": record}
    torch.save(result, work / "result.tmp")
    os.replace(work / "result.tmp", work / "result.pt")
    return 0


def train_parallel(
    args: argparse.Namespace, preset: Preset, tokenizer: PreTrainedTokenizerFast
) -> tuple[list[Run], list[dict], list[int]]:
    """Both models at once, one process and one thread each (twice the throughput of lockstep on
    two cores). Each process generates the same batch stream from the seed and starts from the
    same initial weights as lockstep training would, so the pair is the one lockstep trains.
    The caller has checked the preset (`check_parallel`) before training the tokenizer."""
    if not (args.out / TOKENIZER_DIR).is_dir():
        tokenizer.save_pretrained(args.out / TOKENIZER_DIR)
    runs = build_runs(preset, tokenizer, args.seed, args.names)
    procs = {}
    for run in runs:
        if args.resume and (child_dir(args.out, run.name) / "result.pt").exists():
            continue
        cmd = [sys.executable, __file__, "--preset", args.preset, "--seed", str(args.seed),
               "--out", str(args.out), "--threads", "1", "--only", run.name]  # fmt: skip
        procs[run.name] = subprocess.Popen(cmd + (["--resume"] if args.resume else []))
    try:
        # Poll rather than wait in turn, so that one process failing stops the other at once.
        while True:
            failed = [name for name, p in procs.items() if p.poll() not in (None, 0)]
            if failed or all(p.poll() is not None for p in procs.values()):
                break
            time.sleep(1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
    if failed:
        raise SystemExit(f"error: training {', '.join(failed)} failed; rerun with --resume")
    rows: list[dict] = []
    steps: list[int] = []
    for run in runs:
        result = torch.load(child_dir(args.out, run.name) / "result.pt", weights_only=True)
        run.model.load_state_dict(result["model"])
        for k, v in result["record"].items():
            setattr(run, k, v)
        rows += result["rows"]
        steps = result["steps"]
    order = {r.name: i for i, r in enumerate(runs)}
    rows.sort(key=lambda r: (r["step"], r["split"] != "train", order[r["model"]]))
    write_curves(rows, args.out)
    return runs, rows, steps


# ---------------------------------------------------------------------------------------------
# Joining a trained set: another model on the same tokenizer, batch stream and stage steps.

CURVE_INTS = ("step", "stage", "seq_len", "tokens_seen")


def stream_tokens(
    preset: Preset, tokenizer: PreTrainedTokenizerFast, seed: int, steps: list[int]
) -> dict[int, int]:
    """Non-pad tokens seen by each logged step of the batch stream `seed` gives over `steps`
    steps per stage, generated without training (what `train` logs as tokens_seen)."""
    rng, seg, tokens, step, seen = random.Random(seed), SegmentLengths(tokenizer), 0, 0, {}
    for stage, n in zip(preset.stages, steps, strict=True):
        for _ in range(n):
            _, kinds = make_batch(rng, stage, seg, preset.intent_names)
            step += 1
            tokens += int((kinds != PAD).sum())
            if step % preset.log_every == 0:
                seen[step] = tokens
    return seen


def read_curves(out: Path) -> list[dict]:
    """OUT/training_curves.csv's rows, numbers parsed."""
    path = out / "training_curves.csv"
    if not path.is_file():
        raise SystemExit(f"error: --join needs a trained set in {out}: no {path.name} there")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k not in ("model", "split"):
                r[k] = int(v) if k in CURVE_INTS else float(v or "nan")
    return rows


def stage_steps(rows: list[dict], n_stages: int) -> list[int]:
    """Steps per stage as the set trained them (a stage's last logged row ends it)."""
    ends = [max((r["step"] for r in rows if r["stage"] == si), default=0) for si in range(n_stages)]
    return [e - (ends[i - 1] if i else 0) for i, e in enumerate(ends)]


def card_record(card: Path, name: str) -> tuple[int | None, float]:
    """A trained model's break step and training minutes, from its card's results row."""
    for line in card.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == name and len(cells) == 6:
            return (None if cells[4] == "never" else int(cells[4])), float(cells[5]) * 60
    raise SystemExit(f"error: {card} has no results row for {name}")


def join(args: argparse.Namespace, preset: Preset, names: tuple[str, ...]) -> int:
    """`--join`: train `names` beside the set in OUT on its tokenizer, batch stream and stage
    steps; merge the curves; check and describe the whole set."""
    out: Path = args.out
    set_rows = read_curves(out)
    present = tuple(m for m in MODELS if m not in names and any(r["model"] == m for r in set_rows))
    if not present:
        raise SystemExit(f"error: {out} holds no trained model besides {', '.join(names)}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / present[0])
    steps = stage_steps(set_rows, len(preset.stages))
    preset = replace(
        preset,
        stages=tuple(
            replace(s, steps=n, max_extra_steps=0)
            for s, n in zip(preset.stages, steps, strict=True)
        ),
    )
    expect = {r["step"]: r["tokens_seen"] for r in set_rows if r["model"] == present[0]}
    t0 = time.time()
    print(f"joining {', '.join(names)} to {', '.join(present)}: stages {steps}", flush=True)
    runs = build_runs(preset, tokenizer, args.seed, names)
    rows, _ = train(preset, runs, SegmentLengths(tokenizer), args.seed, out, args.resume, expect)
    save_pair(runs, tokenizer, preset, out)
    order = {m: i for i, m in enumerate(MODELS)}
    merged = [r for r in set_rows if r["model"] not in names] + rows
    merged.sort(key=lambda r: (r["step"], r["split"] != "train", order[r["model"]]))
    write_curves(merged, out)
    # The set's models, as the cards describe them: weights from their folders, losses from the
    # curves, break step and minutes from their cards.
    for run in (kept := build_runs(preset, tokenizer, args.seed, present)):
        run.model = ARCHITECTURES[run.name].from_pretrained(out / run.name)
        for split in ("train", "val"):
            last = [r for r in set_rows if r["model"] == run.name and r["split"] == split][-1]
            setattr(run, f"last_{split}", {k: last.get(k, math.nan) for k in LOSS_KEYS})
        run.break_step, run.seconds = card_record(out / run.name / "README.md", run.name)
    every = sorted([*kept, *runs], key=lambda r: order[r.name])
    evals, icl = evaluate([r.name for r in every], preset, out)
    tokens = rows[-1]["tokens_seen"]
    write_cards(every, preset, args.preset, args.seed, steps, tokens, evals, icl, out, names)
    for run in runs:
        print(f"{run.name}: {n_params(run.model):,} params, break step {run.break_step}")
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument(
        "--resume", action="store_true", help="continue from OUT/.train_state.pt if present"
    )
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="train the two models in two processes of one thread each (same batches, same "
        "pair; about twice as fast on two cores)",
    )
    ap.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated models to train (default: {','.join(MODELS)})",
    )
    ap.add_argument(
        "--join",
        action="store_true",
        help="train --models beside the set already in OUT: its tokenizer, its batch stream and "
        "stage steps (OUT/training_curves.csv), curves merged, the check and cards over the set",
    )
    ap.add_argument("--only", choices=MODELS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = args.names = tuple(m for m in args.models.split(",") if m)
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        bad = ", ".join(unknown) or "empty"
        ap.error(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    preset = PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.only:
        return train_one(args, preset)
    if args.join:
        return join(args, preset, names)
    if args.parallel:
        check_parallel(preset)
    t0 = time.time()

    if args.parallel and args.resume and (out / TOKENIZER_DIR).is_dir():
        # The tokenizer the interrupted processes trained with.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out / TOKENIZER_DIR)
    else:
        tokenizer = train_tokenizer(
            tokenizer_corpus(preset.tokenizer_docs, args.seed + 1, preset.intent_names),
            vocab_size=preset.vocab_size,
        )
    print(
        f"preset {args.preset}: vocab {len(tokenizer)}, {preset.total_steps} steps"
        + (", two processes" if args.parallel else "")
        + f" [{time.time() - t0:.0f}s]",
        flush=True,
    )
    if args.parallel:
        runs, rows, steps = train_parallel(args, preset, tokenizer)
    else:
        runs = build_runs(preset, tokenizer, args.seed, args.names)
        rows, steps = train(preset, runs, SegmentLengths(tokenizer), args.seed, out, args.resume)
    print(", ".join(f"{r.name} {n_params(r.model):,} params" for r in runs), flush=True)
    tokens = rows[-1]["tokens_seen"]

    save_pair(runs, tokenizer, preset, out)
    evals, icl = evaluate([r.name for r in runs], preset, out)
    for run in runs:
        for pair in preset.eval_needles:
            print(
                f"NIAH {run.name} {pair} @ {preset.niah_len}: "
                + " ".join(f"{mode} {evals[(run.name, pair, mode)]:.2f}" for mode in EVAL_MODES),
                flush=True,
            )
    for run in runs:
        print(
            f"ICL {run.name} {preset.eval_icl_classes} intents: "
            + " ".join(f"{k} shots {icl[(run.name, k)]:.2f}" for k in preset.eval_icl_shots),
            flush=True,
        )
    write_cards(runs, preset, args.preset, args.seed, steps, tokens, evals, icl, out)
    for run in runs:
        print(
            f"{run.name}: {n_params(run.model):,} params, train {run.seconds / 60:.1f} min, "
            f"break step {run.break_step}, folder {folder_mb(out / run.name):.2f} MB"
        )
    if args.parallel:
        for run in runs:
            shutil.rmtree(child_dir(out, run.name), ignore_errors=True)
        shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
