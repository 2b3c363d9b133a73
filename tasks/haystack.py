"""Procedural haystack text and needles for retrieval tasks (no bundled essays).

The generator writes plausible, topic-free English sentences from small word lists with a seeded
RNG, so any length of haystack is reproducible from `(seed, index)` and never contains a magic
number: every 7-digit number in a prompt is one a task put there (a needle, or a score-mode
decoy: the same sentence for a city that is never asked about).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

SUBJECTS = (
    "The old bridge",
    "A quiet river",
    "The village market",
    "Our neighbour",
    "The morning train",
    "A tall lighthouse",
    "The library",
    "An autumn storm",
    "The school garden",
    "A small boat",
    "The mountain road",
    "The bakery",
    "A young painter",
    "The city council",
    "The night sky",
    "A patient teacher",
    "The harbour",
    "An empty field",
    "The kitchen window",
    "A travelling band",
    "The forest path",
    "A curious child",
    "The clock tower",
    "The orchard",
    "A wooden fence",
)
VERBS = (
    "waits beside",
    "looks over",
    "drifts past",
    "leans toward",
    "stands near",
    "turns away from",
    "remembers",
    "circles around",
    "follows",
    "rests under",
    "opens onto",
    "hides behind",
    "shines across",
    "reaches",
    "returns to",
    "wanders through",
    "faces",
    "settles by",
)
OBJECTS = (
    "the sleepy harbour",
    "a field of barley",
    "the northern hills",
    "the crowded square",
    "an abandoned mill",
    "the edge of the lake",
    "a row of chestnut trees",
    "the railway station",
    "the stone chapel",
    "a narrow alley",
    "the open sea",
    "the town hall",
    "a quiet meadow",
    "the winding canal",
    "an old farmhouse",
    "the evening fog",
    "the fish market",
    "a sunny porch",
)
TAILS = (
    "",
    "",
    "",
    " every morning",
    " after the rain",
    " in the late afternoon",
    " without a sound",
    " as the bells ring",
    " while the wind rises",
    " before the shops open",
    " in early spring",
    " long after dark",
    " as it always has",
    " under a grey sky",
)
ASIDES = (
    "Nobody seems to mind.",
    "It has been this way for years.",
    "Some say it brings luck.",
    "The locals hardly notice anymore.",
    "Visitors often stop to watch.",
    "It is a calm place.",
    "Time moves slowly here.",
    "The air smells of salt and pine.",
    "Children like to play there.",
)

# Needle keys: city names, single words so that questions stay short and unambiguous.
CITIES = (
    "Amsterdam",
    "Berlin",
    "Cairo",
    "Denver",
    "Edinburgh",
    "Florence",
    "Geneva",
    "Havana",
    "Istanbul",
    "Jakarta",
    "Kyoto",
    "Lisbon",
    "Madrid",
    "Nairobi",
    "Oslo",
    "Prague",
    "Quito",
    "Riga",
    "Santiago",
    "Tokyo",
    "Utrecht",
    "Vienna",
    "Warsaw",
    "Yerevan",
    "Zurich",
    "Athens",
    "Bangkok",
    "Chicago",
    "Dublin",
    "Helsinki",
    "Lima",
    "Manila",
    "Montreal",
    "Mumbai",
    "Seoul",
    "Sydney",
    "Toronto",
    "Valencia",
    "Budapest",
    "Copenhagen",
)

NEEDLE = "The special magic {city} number is: {number}."
QUESTION = "What is the special magic number for {city}?"
QUESTION_MANY = "What are the special magic numbers for {cities}?"
ANSWER_PREFIX = "The special magic number for {city} is:"


def sentence(rng: random.Random) -> str:
    """One haystack sentence, starting with a capital and ending with a full stop."""
    if rng.random() < 0.12:
        return rng.choice(ASIDES)
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}."


def sentences(seed: int) -> Iterator[str]:
    """An endless, reproducible stream of haystack sentences."""
    rng = random.Random(seed)
    while True:
        yield sentence(rng)


def procedural_text(seed: int, n_chars: int) -> str:
    """At least `n_chars` characters of haystack, whole sentences joined by single spaces."""
    parts: list[str] = []
    total = 0
    for s in sentences(seed):
        parts.append(s)
        total += len(s) + 1
        if total >= n_chars:
            break
    return " ".join(parts)


def magic_number(rng: random.Random) -> str:
    """A 7-digit number with no leading zero, as in the LWM multi-needle protocol."""
    return str(rng.randrange(1_000_000, 10_000_000))


def join_cities(cities: list[str]) -> str:
    """'A', 'A and B', 'A, B, and C' — the question's list of query cities."""
    if len(cities) == 1:
        return cities[0]
    if len(cities) == 2:
        return f"{cities[0]} and {cities[1]}"
    return ", ".join(cities[:-1]) + f", and {cities[-1]}"
