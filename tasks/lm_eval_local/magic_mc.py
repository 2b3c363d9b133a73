"""Data of the shipped offline lm-eval task `diffbench_magic_mc` (magic_mc.yaml).

`load` is the task's `custom_dataset`: it reads magic_mc.jsonl next to this file (a `split`
field says test or fewshot), so the task runs wherever the folder is, with nothing downloaded.
`python magic_mc.py` regenerates the JSONL (seeded, so byte-identical): each document is a
short passage of haystack sentences holding two key-value facts in the NIAH needle format, a
question about one of them, and four seven-digit choices (both numbers of the passage and two
that appear nowhere), so a model that retrieves scores near 1 and chance is 0.25. The few-shot
documents use cities no test document uses.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("magic_mc.jsonl")
N_TEST = 200
N_FEWSHOT = 5
FEWSHOT_CITIES = 10  # the last cities of the haystack's list, kept for the few-shot documents


def load(**kwargs: Any) -> Any:
    """The task's splits (`test`, `fewshot`) as a datasets.DatasetDict."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list([r for r in rows if r["split"] == split])
            for split in ("test", "fewshot")
        }
    )


def document(rng: random.Random, cities: list[str], split: str, i: int) -> dict[str, Any]:
    """One passage with two facts, the question about one of them and four choices."""
    from diffbench.tasks.haystack import NEEDLE, magic_number, sentence

    pair = rng.sample(cities, 2)
    numbers = [magic_number(rng), magic_number(rng)]
    parts = [sentence(rng) for _ in range(3)]
    for city, number in zip(pair, numbers, strict=True):
        parts.insert(rng.randint(0, len(parts)), NEEDLE.format(city=city, number=number))
    asked = rng.randrange(2)
    choices = [*numbers, magic_number(rng), magic_number(rng)]
    rng.shuffle(choices)
    return {
        "id": f"{split}-{i}",
        "split": split,
        "passage": " ".join(parts),
        "city": pair[asked],
        "choices": choices,
        "gold": choices.index(numbers[asked]),
    }


def generate(seed: int = 0) -> list[dict[str, Any]]:
    """Every row of magic_mc.jsonl."""
    from diffbench.tasks.haystack import CITIES

    rng = random.Random(f"diffbench-magic-mc|{seed}")
    test_cities, shot_cities = list(CITIES[:-FEWSHOT_CITIES]), list(CITIES[-FEWSHOT_CITIES:])
    rows = [document(rng, shot_cities, "fewshot", i) for i in range(N_FEWSHOT)]
    rows += [document(rng, test_cities, "test", i) for i in range(N_TEST)]
    return rows


if __name__ == "__main__":
    DATA.write_text("".join(json.dumps(r) + "\n" for r in generate()), encoding="utf-8")
