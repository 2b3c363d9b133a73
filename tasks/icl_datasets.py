"""Classification datasets for many-shot ICL, behind one adapter interface.

Hub datasets (TREC, TREC-fine, Banking-77, Clinic-150) load with `datasets` where the hub or its
cache holds them, with the label names and prompt formats of Bertsch et al. 2024. A local JSONL,
CSV or Parquet file works with any text and label columns. `synthetic` is a deterministic
intent-classification set generated here (dozens of classes), for offline runs and tests.

Whatever the source, a demonstration pool never holds a test example's text: every adapter's
pools go through `_separate`, which keeps the first row of each text (whitespace-normalised) and
drops demonstrations whose text is a test example's. The dropped rows are counted in
`IclDataset.dropped` and logged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from diffbench.errors import DiffbenchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Dropped:
    """Rows left out so that no text repeats and no test text is a demonstration."""

    duplicates: int = 0  # rows whose text an earlier row of the same pool already has
    conflicting: int = 0  # of those, rows whose label differs from the kept row's
    test_overlap: int = 0  # demonstration rows whose text is a test example's

    @property
    def total(self) -> int:
        """Rows dropped in all."""
        return self.duplicates + self.test_overlap

    def as_meta(self) -> dict[str, int]:
        """The counts as sample metadata keys."""
        return {
            "dropped_duplicates": self.duplicates,
            "dropped_conflicting": self.conflicting,
            "dropped_test_overlap": self.test_overlap,
        }


@dataclass(frozen=True)
class IclDataset:
    """A demonstration pool, a test pool, the label set and the prompt's field names."""

    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    labels: tuple[str, ...]
    input_name: str = "utterance"
    label_name: str = "intent"
    dropped: Dropped = field(default_factory=Dropped)


def text_key(text: str) -> str:
    """What makes two texts the same example: equal after collapsing whitespace."""
    return " ".join(text.split())


def _deduplicated(examples: Iterable[Example]) -> tuple[tuple[Example, ...], int, int]:
    """The first row of each text, in order; and how many rows (and conflicting ones) went."""
    first: dict[str, Example] = {}
    dropped = conflicting = 0
    for ex in examples:
        kept = first.setdefault(text_key(ex.text), ex)
        if kept is not ex:
            dropped += 1
            conflicting += kept.label != ex.label
    return tuple(first.values()), dropped, conflicting


def _separate(
    train: Iterable[Example], test: Iterable[Example], earlier: Dropped | None = None
) -> tuple[tuple[Example, ...], tuple[Example, ...], Dropped]:
    """Pools without repeated texts, and demonstrations without any test example's text.

    A text repeated with different labels keeps its first row's label (file order); a text in
    both pools stays a test example and leaves the demonstrations.
    """
    test_kept, test_dup, test_conf = _deduplicated(test)
    train_kept, train_dup, train_conf = _deduplicated(train)
    test_keys = {text_key(ex.text) for ex in test_kept}
    demos = tuple(ex for ex in train_kept if text_key(ex.text) not in test_keys)
    earlier = earlier or Dropped()
    return (
        demos,
        test_kept,
        Dropped(
            earlier.duplicates + test_dup + train_dup,
            earlier.conflicting + test_conf + train_conf,
            earlier.test_overlap + len(train_kept) - len(demos),
        ),
    )


@dataclass(frozen=True)
class PromptNames:
    """How a hub dataset's prompt names its input and its label."""

    input_name: str
    label_name: str


# The hub datasets (their sources: bench/sources.py) and their prompt field names.
HUB = {
    "trec": PromptNames("Question", "Type"),
    "trec-fine": PromptNames("Question", "Type"),
    "banking77": PromptNames("query", "intent"),
    "clinic150": PromptNames("utterance", "intent"),
}
TREC_COARSE = {
    "ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
    "LOC": "location", "NUM": "numeric",
}  # fmt: skip


def _label_name(dataset: str, raw: str) -> str:
    """A label as the prompt shows it (TREC codes spelled out, underscores as spaces)."""
    if dataset == "trec":
        return TREC_COARSE.get(raw, raw)
    if dataset == "trec-fine":
        coarse, _, fine = raw.partition(":")
        return f"{TREC_COARSE.get(coarse, coarse)} {fine}".strip()
    return raw.replace("_", " ")


def _from_hub(name: str) -> IclDataset:
    """Hub dataset `name` from its pinned parquet source (the hub cache when offline)."""
    from diffbench import sources

    source = sources.get(name)

    def rows(split: str) -> tuple[Example, ...]:
        table = sources.read(source, split)
        names = table.label_names.get("label")
        out = []
        for i, row in enumerate(table.rows):
            raw = row["label"]
            if names is not None:
                raw = names[int(raw)]
            if not str(row["text"] or "").strip() or raw is None or not str(raw).strip():
                raise DiffbenchError(
                    f"dataset {name} ({source.repo}, split {split}): row {i + 1} has no "
                    f"{'text' if not str(row['text'] or '').strip() else 'label'}"
                )
            out.append(Example(str(row["text"]).strip(), _label_name(name, str(raw))))
        return tuple(out)

    train, test, dropped = _separate(rows("train"), rows(source.split))
    labels = tuple(sorted({e.label for e in train}))
    _check_test_labels(name, labels, test)
    names = HUB[name]
    return IclDataset(name, train, test, labels, names.input_name, names.label_name, dropped)


def _check_test_labels(name: str, labels: tuple[str, ...], test: tuple[Example, ...]) -> None:
    """Refuse test examples whose label no demonstration has: it could never be answered."""
    unknown = sorted({e.label for e in test} - set(labels))
    if unknown:
        raise DiffbenchError(
            f"test examples of {name} use {len(unknown)} label(s) never seen in its "
            f"demonstrations, e.g. {unknown[0]!r}"
        )


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DiffbenchError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except ValueError as err:
        raise DiffbenchError(f"cannot read dataset file {path}: {err}") from None
    raise DiffbenchError(f"dataset file {path}: use .jsonl, .json, .csv or .parquet")


def _examples(path: Path, text_field: str, label_field: str) -> tuple[Example, ...]:
    table = _read_table(path)
    for column in (text_field, label_field):
        if column not in table.columns:
            raise DiffbenchError(
                f"dataset file {path} has no field {column!r} (fields: {', '.join(table.columns)})"
            )
    out = []
    for i, (text, label) in enumerate(zip(table[text_field], table[label_field], strict=True)):
        for column, value in ((text_field, text), (label_field, label)):
            missing = value is None or (isinstance(value, float) and pd.isna(value))
            if missing or not str(value).strip():
                raise DiffbenchError(f"dataset file {path}: row {i + 1} has no {column!r}")
        out.append(Example(str(text).strip(), str(label).strip()))
    return tuple(out)


def _from_files(
    path: Path, test_file: str, text_field: str, label_field: str, test_size: int, seed: int
) -> IclDataset:
    rows = _examples(path, text_field, label_field)
    if test_file:
        train, test, dropped = _separate(rows, _examples(Path(test_file), text_field, label_field))
    else:  # hold out a seeded test split from the one file, once each text is there only once
        pool, duplicates, conflicting = _deduplicated(rows)
        order = list(range(len(pool)))
        random.Random(f"icl-split|{seed}").shuffle(order)
        n_test = min(test_size, len(pool) // 2)
        test = tuple(pool[i] for i in sorted(order[:n_test]))
        train = tuple(pool[i] for i in sorted(order[n_test:]))
        train, test, dropped = _separate(train, test, Dropped(duplicates, conflicting))
    labels = tuple(sorted({e.label for e in train}))
    if len(labels) < 2:
        raise DiffbenchError(f"dataset {path} needs at least two labels, found {len(labels)}")
    _check_test_labels(str(path), labels, test)
    return IclDataset(path.name, train, test, labels, dropped=dropped)


# ---- the generated default: intents with keyword-rich utterances -------------------------------

INTENTS: dict[str, tuple[str, ...]] = {
    "order pizza": ("I want to order a {x} pizza", "get me a large {x} pizza tonight",
                    "can you send a {x} pizza to my flat"),
    "book flight": ("book me a flight to {p}", "I need a plane ticket to {p}",
                    "find flights to {p} next week"),
    "check weather": ("will it rain in {p} tomorrow", "what is the weather like in {p}",
                      "is it sunny in {p} today"),
    "play music": ("play some {m} music", "put on a {m} playlist", "I want to hear {m} songs"),
    "set alarm": ("wake me up at {t}", "set an alarm for {t}", "alarm at {t} please"),
    "reset password": ("I forgot my password", "reset my password please",
                       "my password does not work anymore"),
    "track package": ("where is my package", "track my parcel from {p}",
                      "has my delivery from {p} shipped"),
    "cancel order": ("cancel my last order", "I want to cancel the order I made",
                     "please stop my order before it ships"),
    "find recipe": ("how do I cook {f}", "give me a recipe for {f}", "what can I bake with {f}"),
    "translate text": ("translate this into {l}", "how do you say hello in {l}",
                       "what is the {l} word for water"),
    "book table": ("reserve a table for {n} at eight", "book a restaurant for {n} people",
                   "get us a dinner table for {n}"),
    "call taxi": ("call me a taxi to {p}", "I need a cab to {p}", "order a ride to {p}"),
    "pay bill": ("pay my electricity bill", "settle the {u} bill today",
                 "I owe money on my {u} bill"),
    "check balance": ("how much money is in my account", "what is my bank balance",
                      "show my account balance"),
    "send money": ("send {n} dollars to my brother", "transfer money to {p}",
                   "wire {n} dollars to my landlord"),
    "report fraud": ("someone stole my card", "there is a charge I did not make",
                     "I think my account was hacked"),
    "card declined": ("my card was declined at the shop", "why was my card refused",
                      "the payment with my card failed"),
    "change address": ("update my home address", "I moved to {p}", "change my address to {p}"),
    "book hotel": ("find a hotel in {p}", "book a room in {p} for {n} nights",
                   "I need somewhere to stay in {p}"),
    "rent car": ("rent a car in {p}", "I need a rental car for {n} days",
                 "hire a car at the airport"),
    "tell joke": ("tell me a joke", "make me laugh", "say something funny"),
    "define word": ("what does {w} mean", "define the word {w}", "give me the meaning of {w}"),
    "set reminder": ("remind me to {d} at {t}", "set a reminder to {d}",
                     "don't let me forget to {d}"),
    "turn on lights": ("turn on the lights in the {r}", "switch the {r} lights on",
                       "lights on in the {r}"),
    "adjust thermostat": ("set the heating to {n} degrees", "make the {r} warmer",
                          "turn the thermostat down"),
    "find parking": ("where can I park near {p}", "find a parking spot in {p}",
                     "is there a car park close by"),
    "schedule meeting": ("set up a meeting with {q} at {t}", "book a call with {q}",
                         "schedule time with {q} tomorrow"),
    "read news": ("what is in the news today", "read me the headlines", "any news about {p}"),
    "order groceries": ("add {f} to my grocery order", "buy {f} from the supermarket",
                        "I need {f} delivered"),
    "return item": ("I want to return these shoes", "how do I send this item back",
                    "start a return for my jacket"),
    "find doctor": ("find a doctor near {p}", "I need to see a dentist", "book a doctor visit"),
    "check score": ("what was the score of the {s} game", "did my team win at {s}",
                    "show me the {s} results"),
}  # fmt: skip
FILLERS = {
    "x": ("pepperoni", "cheese", "veggie", "mushroom", "ham"),
    "p": ("Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Riga"),
    "m": ("jazz", "rock", "classical", "hip hop", "folk"),
    "t": ("six", "seven thirty", "noon", "nine", "five fifteen"),
    "f": ("chicken", "apples", "rice", "eggs", "pasta", "carrots"),
    "l": ("French", "Spanish", "German", "Italian", "Japanese"),
    "n": ("two", "three", "four", "five", "ten"),
    "u": ("water", "gas", "phone", "internet"),
    "w": ("serendipity", "ephemeral", "ubiquitous", "laconic"),
    "d": ("call mum", "water the plants", "buy milk", "take my pills"),
    "r": ("kitchen", "bedroom", "living room", "hallway"),
    "q": ("Anna", "the team", "my manager", "Doctor Lee"),
    "s": ("football", "tennis", "basketball", "hockey"),
}


# Openings and closings any utterance may take: they carry no label information, and with the
# fillers they give every intent hundreds of distinct utterances (the templates alone give some
# intents only three).
OPENINGS = ("", "hey, ", "hi, ", "hello, ", "okay, ", "um, ", "quick one: ", "so ")
CLOSINGS = ("", " please", " thanks", " thank you", " if you can", " for me")


def _utterance(templates: tuple[str, ...], rng: random.Random) -> str:
    text = rng.choice(templates)
    for key, words in FILLERS.items():
        text = text.replace("{" + key + "}", rng.choice(words))
    closing = rng.choice(CLOSINGS)
    if text.endswith(closing.strip()):
        closing = ""
    return rng.choice(OPENINGS) + text + closing


def class_subset(labels: Iterable[str], classes: int, seed: int, dataset: str) -> list[str]:
    """`classes` of the dataset's labels, drawn by the seed (all of them when `classes` is 0)."""
    labels = sorted(labels)
    if not classes:
        return labels
    if classes > len(labels):
        raise DiffbenchError(
            f"icl.classes={classes}: dataset {dataset} has only {len(labels)} classes"
        )
    return sorted(random.Random(f"icl-classes|{seed}").sample(labels, classes))


def synthetic(test_size: int, seed: int, per_class: int = 30, classes: int = 0) -> IclDataset:
    """The generated intent set: `per_class` distinct utterances for each intent (of a seeded
    subset of `classes` intents, when given), seeded."""
    keep = set(class_subset(INTENTS, classes, seed, "synthetic"))
    rng = random.Random(f"icl-synthetic|{seed}")
    pool, seen = [], set()
    for label, templates in INTENTS.items():
        if label not in keep:
            continue
        texts: list[str] = []
        for _ in range(1000 * per_class):
            text = _utterance(templates, rng)
            if text_key(text) not in seen:  # distinct across intents too
                seen.add(text_key(text))
                texts.append(text)
                if len(texts) == per_class:
                    break
        if len(texts) < per_class:
            raise RuntimeError(f"intent {label!r} cannot make {per_class} distinct utterances")
        pool += [Example(text, label) for text in texts]
    rng.shuffle(pool)
    n_test = min(test_size, len(pool) // 4)
    train, test, dropped = _separate(pool[n_test:], pool[:n_test])
    return IclDataset("synthetic", train, test, tuple(sorted(keep)), dropped=dropped)


def load(name: str, test_file: str, text_field: str, label_field: str, test_size: int,
         seed: int, classes: int = 0) -> IclDataset:  # fmt: skip
    """The dataset named by `icl.dataset`: synthetic, a hub name, or a local file path; with
    `classes`, only the examples of that many of its classes (drawn by the seed)."""
    path = Path(name).expanduser()
    if name == "synthetic":
        ds = synthetic(test_size, seed, classes=classes)
    elif name in HUB:
        ds = _from_hub(name)
    elif path.suffix or path.exists():
        ds = _from_files(path, test_file, text_field, label_field, test_size, seed)
    else:
        raise DiffbenchError(
            f"unknown dataset {name!r}: use synthetic, {', '.join(HUB)}, or a .jsonl/.csv/.parquet "
            "path"
        )
    if classes and name != "synthetic":
        keep = set(class_subset(ds.labels, classes, seed, ds.name))
        ds = IclDataset(
            ds.name, tuple(e for e in ds.train if e.label in keep),
            tuple(e for e in ds.test if e.label in keep),
            tuple(lab for lab in ds.labels if lab in keep), ds.input_name, ds.label_name,
            ds.dropped,
        )  # fmt: skip
    d = ds.dropped
    log.info(
        "icl dataset %s: %d demonstrations, %d test examples; dropped %d rows repeating an "
        "earlier row's text (%d with another label; the first row's label is kept) and %d "
        "demonstrations whose text is a test example's",
        ds.name, len(ds.train), len(ds.test), d.duplicates, d.conflicting, d.test_overlap,
    )  # fmt: skip
    return ds
