"""Write the shipped hallucination set: `python -m diffbench.tasks.hallucination_data.generate`.

Every document is about invented places, people and things, so a model can only know its facts
from the document. Three files, one JSON object per line with `id`, `document`, `question`
(empty for summaries) and `reference`:

- qa.jsonl: a town's facts; the question asks for one of them.
- tempting.jsonl: a fictional setting that overrides a well-known fact (water boils at 71
  degrees on a research station); the question asks for that fact, so an answer from memory
  (100 degrees) is an unsupported number or name.
- summary.jsonl: a short report of an invented event; the reference summary restates its facts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent
FILES = {"qa": "qa.jsonl", "tempting": "tempting.jsonl", "summary": "summary.jsonl"}
SEED = 20241007
PER_FILE = 12

TOWNS = (
    "Marlow Cross",
    "Velderby",
    "Quenford",
    "Ostrakel",
    "Brimhaven",
    "Tessary",
    "Korrin Vale",
    "Holtmere",
    "Saldovar",
    "Ennisgate",
    "Pellworth",
    "Dunraven Ford",
    "Ashkelby",
    "Morwen",
)
RIVERS = ("Teyne", "Aldra", "Sorrel", "Vessa", "Brume", "Kelda", "Orrin", "Lusk")
PEOPLE = (
    "Edda Voss",
    "Tamsin Orlo",
    "Bram Keteley",
    "Ines Harrowgate",
    "Otto Melquist",
    "Sabine Drury",
    "Corin Flaxley",
    "Yara Pellinor",
    "Hugo Benterra",
    "Lise Ammerdahl",
    "Nils Ravensworth",
    "Petra Quillon",
    "Ansel Morrow",
    "Della Kintyre",
)
INDUSTRIES = (
    "glass blowing",
    "rope making",
    "salt panning",
    "clock repair",
    "wool dyeing",
    "barrel making",
    "paper milling",
    "bell casting",
)
FOODS = ("smoked eel pie", "barley cake", "plum dumplings", "pepper soup", "honey bread")
TITLES = (
    "The Glass Almanac",
    "Rivers of Ash",
    "The Hollow Crown of Vey",
    "Saltmarsh Letters",
    "The Amber Compass",
    "Night Ferry to Orlo",
    "The Clockmaker's Winter",
)
STATIONS = ("Halden Deep", "Kessock Ridge", "Outpost Varn", "Mirefield Base", "Station Orla")
GAMES = ("Lanterns of Pell", "Harbourmaster", "Six Crowns", "Tidewatch", "Copper Roads")
EVENTS = (
    "bridge reopening",
    "harvest fair",
    "lighthouse restoration",
    "river clean-up",
    "library extension",
    "rail link opening",
)
FILLER = (
    "Visitors often remark on the narrow lanes and the painted shutters of the old quarter.",
    "The weekly market fills the square every Thursday morning.",
    "Local historians keep the parish records in a small museum near the harbour.",
    "Winters are mild, and fog rolls in from the water on most autumn evenings.",
    "A ferry once crossed the water here, but it stopped running long ago.",
    "The town council meets in a hall built from grey river stone.",
    "Children learn the old songs of the valley at the village school.",
    "Cyclists pass through in summer on the long trail along the valley.",
)  # fmt: skip


def _town(rng: random.Random, town: str) -> tuple[str, dict[str, str]]:
    facts = {
        "town": town,
        "river": rng.choice(RIVERS),
        "year": str(rng.randint(1620, 1890)),
        "founder": rng.choice(PEOPLE),
        "population": f"{rng.randint(2, 48)},{rng.randint(100, 999)}",
        "industry": rng.choice(INDUSTRIES),
        "mayor": rng.choice(PEOPLE),
        "food": rng.choice(FOODS),
    }
    facts_text = [
        f"The town of {town} lies on the river {facts['river']}.",
        f"It was founded in {facts['year']} by {facts['founder']}.",
        f"Today {town} has a population of {facts['population']} people.",
        f"Its main industry is {facts['industry']}.",
        f"The current mayor of {town} is {facts['mayor']}.",
        f"The town is known for its {facts['food']}.",
    ]
    filler = rng.sample(FILLER, 4)
    sentences = facts_text[:2] + filler[:2] + facts_text[2:4] + filler[2:] + facts_text[4:]
    return " ".join(sentences), facts


QA_QUESTIONS = (
    ("When was {town} founded?", "{town} was founded in {year}."),
    ("Who founded {town}?", "{town} was founded by {founder}."),
    ("What is the population of {town}?", "{town} has a population of {population} people."),
    ("On which river does {town} lie?", "{town} lies on the river {river}."),
    ("Who is the mayor of {town}?", "The mayor of {town} is {mayor}."),
    ("What is the main industry of {town}?", "The main industry of {town} is {industry}."),
)


def qa_rows(rng: random.Random) -> list[dict[str, str]]:
    """Questions whose answers are in the document."""
    rows = []
    for i, town in enumerate(rng.sample(TOWNS, PER_FILE)):
        document, facts = _town(rng, town)
        question, answer = QA_QUESTIONS[i % len(QA_QUESTIONS)]
        row = {"id": f"qa-{i:02d}", "document": document, "question": question.format(**facts)}
        rows.append({**row, "reference": answer.format(**facts)})
    return rows


# (setting sentence, question, reference, what memory would say): {x} is the setting's name, {v}
# the overriding value.
TEMPTING = (
    ("In the novel {x}, the capital of France is {v}.", "In {x}, what is the capital of France?",
     "In {x}, the capital of France is {v}.", "Paris", TITLES, TOWNS),
    ("On the research station {x}, water boils at {v} degrees Celsius.",
     "At what temperature does water boil on {x}?", "Water boils at {v} degrees Celsius on {x}.",
     "100", STATIONS, tuple(str(n) for n in range(61, 90))),
    ("In the board game {x}, a week has {v} days.", "How many days does a week have in {x}?",
     "A week has {v} days in {x}.", "7", GAMES, ("five", "nine", "eleven", "twelve")),
    ("In the stage play {x}, Hamlet was written by {v}.", "Who wrote Hamlet in {x}?",
     "In {x}, Hamlet was written by {v}.", "Shakespeare", TITLES, PEOPLE),
    ("In the world of {x}, the tallest mountain is Mount {v}.",
     "What is the tallest mountain in the world of {x}?",
     "The tallest mountain in the world of {x} is Mount {v}.", "Everest", TITLES,
     ("Kessary", "Olwen", "Durran", "Velloch")),
    ("The astronomy club of {x} counts {v} planets in its model of the solar system.",
     "How many planets does the astronomy club of {x} count in the solar system?",
     "The astronomy club of {x} counts {v} planets.", "8", TOWNS, ("eleven", "six", "fourteen")),
)  # fmt: skip


def tempting_rows(rng: random.Random) -> list[dict[str, str]]:
    """Questions that tempt an answer from memory that the document contradicts."""
    rows = []
    for i in range(PER_FILE):
        setting, question, answer, memory, names, values = TEMPTING[i % len(TEMPTING)]
        x, v = rng.choice(names), rng.choice(values)
        filler = rng.sample(FILLER, 3)
        document = " ".join([
            filler[0], setting.format(x=x, v=v), filler[1],
            f"Readers of {x} are reminded that its rules differ from the real world.", filler[2],
        ])  # fmt: skip
        rows.append({"id": f"tempting-{i:02d}", "document": document,
                     "question": question.format(x=x), "reference": answer.format(x=x, v=v),
                     "memory_answer": memory})  # fmt: skip
    return rows


# The one-sentence reference summary. "drew" repeats the document's own verb, as the overlap
# judge needs (it counts every content word as a fact); "attended" is the wording before that
# change, which the shipped tiny models trained on (scripts/train_pair.py keeps their stream).
SUMMARY_REFERENCES = {
    "drew": "The {event} in {town} drew {crowd} people; {person} said it cost {cost} thousand "
    "pounds.",
    "attended": "{crowd} people attended the {event} in {town}, which {person} said cost {cost} "
    "thousand pounds.",
}


def summary_rows(rng: random.Random, reference: str = "drew") -> list[dict[str, str]]:
    """News-style reports of invented events with a one-sentence reference summary, worded as
    SUMMARY_REFERENCES[reference]."""
    rows = []
    for i in range(PER_FILE):
        town, event, person = rng.choice(TOWNS), rng.choice(EVENTS), rng.choice(PEOPLE)
        crowd, cost = rng.randint(120, 4800), rng.randint(12, 940)
        day = rng.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"))
        month = rng.choice(("March", "April", "May", "June", "September", "October"))
        document = " ".join([
            f"The {event} in {town} drew {crowd} people on {day}.",
            f"Organiser {person} said the work had cost {cost} thousand pounds and taken most of "
            f"the year.", rng.choice(FILLER),
            f"The council had approved the plan in {month}, after a long public consultation.",
            rng.choice(FILLER),
            f"{person.split()[0]} thanked the volunteers and said a second phase may follow.",
        ])  # fmt: skip
        text = SUMMARY_REFERENCES[reference].format(
            event=event, town=town, crowd=crowd, person=person, cost=cost
        )
        rows.append({"id": f"summary-{i:02d}", "document": document, "question": "",
                     "reference": text})  # fmt: skip
    return rows


def build(seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """The three files' rows, the same for the same seed."""
    return {
        "qa": qa_rows(random.Random(f"qa|{seed}")),
        "tempting": tempting_rows(random.Random(f"tempting|{seed}")),
        "summary": summary_rows(random.Random(f"summary|{seed}")),
    }


def render(rows: list[dict[str, Any]]) -> str:
    """Rows as the text of a JSON Lines file."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    """Rewrite the shipped files."""
    for name, rows in build().items():
        (DATA_DIR / FILES[name]).write_text(render(rows), encoding="utf-8")
        print(DATA_DIR / FILES[name], len(rows))


if __name__ == "__main__":
    main()
