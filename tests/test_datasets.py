"""The paper's datasets from pinned hub sources, read offline from a real huggingface_hub cache
that the tests build (the hub's cache layout, small parquet files in each dataset's schema)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest
from conftest import models_arg
from diffbench import sources
from diffbench.errors import DiffbenchError
from test_cli_errors import assert_one_line_error

SHIPPED = Path(__file__).resolve().parents[1] / "bench" / "models"
PAIR = {"tiny-diff": SHIPPED / "tiny-diff", "tiny-base": SHIPPED / "tiny-base"}

TREC_COARSE = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
TREC_FINE = ["ABBR:abb", "ENTY:animal", "DESC:def", "HUM:ind", "LOC:city", "NUM:date"]
INTENTS = ["activate_my_card", "card_arrival", "exchange_rate", "lost_or_stolen_card"]
WORDS = ("card", "rate", "lost", "arrive", "money", "city", "when", "who", "what", "define")


def _texts(n: int, salt: str) -> list[str]:
    """`n` distinct short texts."""
    return [f"{salt} {WORDS[i % 10]} {WORDS[(i // 10) % 10]} number {i}?" for i in range(n)]


def _labelled(n: int, columns: dict[str, list[str]], salt: str) -> datasets.Dataset:
    """A classification split: a text column and ClassLabel columns cycling through names."""
    data: dict[str, Any] = {"text": _texts(n, salt)}
    features = {"text": datasets.Value("string")}
    for column, names in columns.items():
        data[column] = [i % len(names) for i in range(n)]
        features[column] = datasets.ClassLabel(names=names)
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def _documents(n: int, names: tuple[str, str], qa: bool) -> datasets.Dataset:
    """A summarisation or QA split in the source's own column names."""
    docs = [
        f"The river Aldra runs past the mill number {i}. Otto Melquist built it." for i in range(n)
    ]
    if qa:  # LongBench's parquet schema
        return datasets.Dataset.from_dict({
            "context": docs, "question": [f"Who built mill {i}?" for i in range(n)],
            "answers": [["Otto Melquist"] for _ in range(n)], "length": [12] * n,
            "dataset": ["x"] * n, "_id": [f"id{i}" for i in range(n)],
        })  # fmt: skip
    return datasets.Dataset.from_dict(
        {names[0]: docs, names[1]: ["Otto Melquist built a mill."] * n,
         "id": [str(i) for i in range(n)]}
    )  # fmt: skip


def _splits(name: str) -> dict[str, datasets.Dataset | list[str]]:
    """Each split of dataset `name` that its source reads, in its real schema."""
    if name in ("trec", "trec-fine"):
        columns = {"coarse_label": TREC_COARSE, "fine_label": TREC_FINE}
        return {"train": _labelled(48, columns, "train"), "test": _labelled(12, columns, "test")}
    if name in ("banking77", "clinic150"):
        column = "label" if name == "banking77" else "intent"
        return {
            "train": _labelled(40, {column: INTENTS}, "train"),
            "test": _labelled(8, {column: INTENTS}, "test"),
        }
    if name == "xsum":
        return {"test": _documents(4, ("document", "summary"), qa=False)}
    if name == "cnndm":
        return {"test": _documents(4, ("article", "highlights"), qa=False)}
    if name == "multinews":
        docs = [f"Article one {i} NEWLINE_CHAR ||||| Article two {i}" for i in range(3)]
        return {
            "test.src.cleaned": [*docs, ""],
            "test.tgt": [f"– Summary {i}" for i in range(3)] + [""],
        }
    return {"test": _documents(4, ("", ""), qa=True)}


def build_hub_cache(hub: Path, name: str, splits: dict[str, Any] | None = None) -> Path:
    """Dataset `name`'s pinned snapshot in huggingface_hub's cache layout under `hub`:
    datasets--ORG--NAME/{refs,snapshots/SHA}, the refs file naming SHA for a branch revision."""
    source = sources.get(name)
    repo = hub / f"datasets--{source.repo.replace('/', '--')}"
    sha = source.revision if len(source.revision) == 40 else "0" * 40
    if sha != source.revision:
        (repo / "refs" / source.revision).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / source.revision).write_text(sha)
    snapshot = repo / "snapshots" / sha
    for split, data in (splits or _splits(name)).items():
        if isinstance(data, list):  # a raw text file
            path = snapshot / "data" / split
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(data) + "\n", encoding="utf-8")
            continue
        glob = source.files[split]
        path = snapshot / glob.replace("*", "00000-of-00001" if "-*" in glob else "0000")
        path.parent.mkdir(parents=True, exist_ok=True)
        data.to_parquet(str(path))
    return snapshot


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that this test's reads use, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def test_every_source_pins_a_revision_and_names_parquet_files_per_split():
    for s in sources.SOURCES.values():
        assert len(s.revision) == 40 and int(s.revision, 16) >= 0, s.name
        assert s.split in s.files, s.name
        if s.task == "icl":
            assert set(s.files) == {"train", "test"} and set(s.columns) == {"text", "label"}
        else:
            assert set(s.columns) in ({"document", "summary"}, {"document", "question", "answers"})
        assert s.prefetch.startswith(f"hf download --repo-type dataset {s.repo} --revision ")


@pytest.mark.parametrize("name", sorted(sources.SOURCES))
def test_each_named_dataset_reads_offline_from_the_hub_cache(hub: Path, name: str):
    build_hub_cache(hub, name)
    source = sources.get(name)
    table = sources.read(source, source.split)
    assert table.rows and set(table.rows[0]) == set(source.columns)
    if source.task == "icl":  # ClassLabel columns come through with their names
        names = table.label_names["label"]
        assert names == {"coarse_label": TREC_COARSE, "fine_label": TREC_FINE}.get(
            source.columns["label"], INTENTS
        )
    if name == "multinews":  # raw lines: the blank pair is dropped, line breaks restored
        assert len(table.rows) == 3 and "\n" in table.rows[0]["document"]


def test_icl_labels_are_the_class_names_spelled_for_the_prompt(hub: Path):
    from diffbench.tasks import icl_datasets

    build_hub_cache(hub, "trec")
    ds = icl_datasets.load("trec", "", "text", "label", 12, 0)
    assert set(ds.labels) == {
        "abbreviation",
        "entity",
        "description",
        "human",
        "location",
        "numeric",
    }
    build_hub_cache(hub, "banking77")
    ds = icl_datasets.load("banking77", "", "text", "label", 8, 0)
    assert "activate my card" in ds.labels and len(ds.test) == 8


def test_a_test_label_no_demonstration_has_is_one_clear_line(hub: Path):
    from diffbench.tasks import icl_datasets

    train = _labelled(40, {"label": INTENTS}, "train")
    train = train.filter(lambda row: row["label"] != 3)  # no lost_or_stolen_card demonstration
    build_hub_cache(
        hub, "banking77", {"train": train, "test": _labelled(8, {"label": INTENTS}, "test")}
    )
    with pytest.raises(
        DiffbenchError,
        match=re.escape("never seen in its demonstrations, e.g. 'lost or stolen card'"),
    ):
        icl_datasets.load("banking77", "", "text", "label", 8, 0)


def test_a_source_missing_a_column_names_it(hub: Path):
    bad = _labelled(10, {"intent": INTENTS}, "x")  # banking77 reads `label`
    build_hub_cache(hub, "banking77", {"train": bad, "test": bad})
    with pytest.raises(DiffbenchError, match="has no column 'label' \\(columns: text, intent\\)"):
        sources.read(sources.get("banking77"), "train")


def test_runs_score_rows_from_the_offline_cache(hub: Path, cli, tmp_path: Path):
    build_hub_cache(hub, "banking77")
    build_hub_cache(hub, "xsum")
    res = cli("run", "--tasks", "icl", "--models", models_arg(PAIR), "--set",
              "icl.dataset=banking77", "--limit", "4", "--output", "icl")  # fmt: skip
    assert res.returncode == 0, res.stderr
    metrics = pd.read_csv(tmp_path / "icl" / "metrics.csv")
    assert set(metrics["model"]) == {"diff", "base"} and (metrics["dataset"] == "banking77").all()
    res = cli("run", "--tasks", "hallucination", "--models", models_arg(PAIR), "--set",
              "hallucination.datasets=xsum", "--limit", "2", "--output", "hal")  # fmt: skip
    assert res.returncode == 0, res.stderr
    metrics = pd.read_csv(tmp_path / "hal" / "metrics.csv")
    assert set(metrics["model"]) == {"diff", "base"} and (metrics["dataset"] == "xsum").all()


@pytest.mark.parametrize(
    ("task", "option", "repo"),
    [
        ("icl", "icl.dataset=banking77", "legacy-datasets/banking77"),
        ("hallucination", "hallucination.datasets=xsum", "EdinburghNLP/xsum"),
    ],
)
def test_an_uncached_dataset_offline_is_one_line_naming_the_prefetch_command(
    hub, cli, task, option, repo
):
    res = cli("run", "--tasks", task, "--models", models_arg(PAIR), "--set", option, "--limit", "2")
    assert_one_line_error(res, f"prefetch it: hf download --repo-type dataset {repo} --revision ")


def test_datasets_lists_the_table_as_json(cli):
    res = cli("datasets", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == list(sources.SOURCES)
    keys = {"name", "repo", "revision", "config", "split", "columns", "files", "prefetch"}
    assert all(keys <= set(r) for r in rows)
    text = cli("datasets")
    assert text.returncode == 0 and "legacy-datasets/banking77" in text.stdout
