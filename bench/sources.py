"""The paper's datasets on the Hugging Face hub: one table of pinned parquet sources, and the
reader that loads them from huggingface_hub's cache, online or with `HF_HUB_OFFLINE=1`.

`datasets.load_dataset(REPO, revision=...)` does not read the hub cache in offline mode (it
raises OfflineModeIsEnabled with the snapshot cached), and `datasets` 4 and later refuse loading
scripts. So each source names parquet files at a pinned revision; `huggingface_hub`'s
`snapshot_download` finds (or fetches) that snapshot, and `datasets` reads its parquet files with
their features, so ClassLabel columns keep their names. docs/datasets.md says how each source was
checked.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffbench.errors import DiffbenchError

# The hub's parquet conversion of a repository (a branch every public dataset has).
PARQUET_BRANCH = "refs/convert/parquet"


@dataclass(frozen=True)
class Source:
    """Where one named dataset lives and what is read from it."""

    name: str
    task: str  # the task whose option names it: icl or hallucination
    repo: str
    revision: str
    config: str | None
    split: str  # the split scored (ICL: its test examples; hallucination: its documents)
    files: dict[str, str]  # split -> repo-relative glob of its parquet files
    columns: dict[str, str]  # role (text/label, document/summary, document/question/answers)
    # parquet; or "lines": one example per line of a text file per column (`columns` maps a role
    # to its file's suffix), for a repository that holds no parquet (multinews).
    format: str = "parquet"

    @property
    def prefetch(self) -> str:
        """The command that puts this source into the hub cache for offline runs."""
        globs = " ".join(f"--include '{g}'" for g in self.files.values())
        return f"hf download --repo-type dataset {self.repo} --revision {self.revision} {globs}"

    def as_json(self) -> dict[str, Any]:
        """The row `diffbench datasets --json` prints."""
        return {
            "name": self.name,
            "task": self.task,
            "repo": self.repo,
            "revision": self.revision,
            "config": self.config,
            "split": self.split,
            "columns": dict(self.columns),
            "files": dict(self.files),
            "prefetch": self.prefetch,
        }


SOURCES: dict[str, Source] = {}


def register(*sources: Source) -> None:
    """Add sources to the table (the built-in ones are added below)."""
    for s in sources:
        SOURCES[s.name] = s


def get(name: str) -> Source:
    """The source named `name`."""
    if name not in SOURCES:
        raise DiffbenchError(f"unknown dataset {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def cache_root() -> Path:
    """huggingface_hub's cache directory, as the environment says now ($HF_HUB_CACHE, else
    $HF_HOME/hub, else huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """Whether the hub is off limits ($HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download(source: Source, local_only: bool) -> Path:
    """huggingface_hub's snapshot of `source`'s files at its revision (from the cache only, with
    `local_only`)."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            source.repo,
            repo_type="dataset",
            revision=source.revision,
            allow_patterns=list(source.files.values()),
            cache_dir=cache_root(),
            local_files_only=local_only,
        )
    )


def cached(source: Source) -> Path | None:
    """The cached snapshot of `source` holding every split's files, or None."""
    try:
        folder = _download(source, local_only=True)
    except Exception:  # any miss means "not cached"
        return None
    return folder if all(_matching(folder, g) for g in source.files.values()) else None


def _matching(folder: Path, glob: str) -> list[Path]:
    """Files under `folder` whose repo-relative path matches `glob`, sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and fnmatch.fnmatch(p.relative_to(folder).as_posix(), glob)
    )


def snapshot(source: Source) -> Path:
    """The snapshot folder of `source`: from the cache, else downloaded (unless offline)."""
    folder = cached(source)
    if folder is not None:
        return folder
    where = f"{source.name} ({source.repo} at {source.revision})"
    if offline():
        raise DiffbenchError(
            f"dataset {where} is not in the hub cache {cache_root()} and HF_HUB_OFFLINE is set; "
            f"prefetch it: {source.prefetch}"
        )
    try:
        folder = _download(source, local_only=False)
    except Exception as err:  # the hub raises many types when unreachable
        raise DiffbenchError(
            f"dataset {where} is not cached and the hub cannot be reached "
            f"({type(err).__name__}); prefetch it where the hub is reachable: {source.prefetch}"
        ) from None
    for glob in source.files.values():
        if not _matching(folder, glob):
            raise DiffbenchError(f"dataset {where} has no files matching {glob!r}")
    return folder


@dataclass(frozen=True)
class Table:
    """One split as read: rows keyed by role (text, label, document, ...), and the label names
    of each role read from a ClassLabel column."""

    rows: list[dict[str, Any]]
    label_names: dict[str, list[str]]


def read(source: Source, split: str) -> Table:
    """Split `split` of `source` (a key of `source.files`), columns checked, labels named."""
    import datasets

    folder = snapshot(source)
    if source.format == "lines":
        return _read_lines(source, folder, split)
    paths = [str(p) for p in _matching(folder, source.files[split])]
    try:
        ds = datasets.Dataset.from_parquet(paths, keep_in_memory=True)
    except Exception as err:  # pyarrow's errors name the file
        raise DiffbenchError(f"dataset {source.name}: cannot read {paths[0]}: {err}") from None
    assert isinstance(ds, datasets.Dataset)
    wanted = [c for c in source.columns.values() if c]
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise DiffbenchError(
            f"dataset {source.name} ({source.repo}, split {split}) has no column "
            f"{missing[0]!r} (columns: {', '.join(ds.column_names)})"
        )
    names = {
        role: list(ds.features[c].names)
        for role, c in source.columns.items()
        if isinstance(ds.features[c], datasets.ClassLabel)
    }
    rows = [
        {role: row[c] for role, c in source.columns.items()}
        for row in ds.select_columns(wanted).to_list()
    ]
    return Table(rows, names)


# ICL (Bertsch et al. 2024's label sets): demonstrations from train, queries from test.
_TREC = "CogComp/trec", "65752bf53af25bc935a0dce92fb5b6c930728450"  # its refs/convert/parquet head
_TREC_FILES = {"train": "default/train/*.parquet", "test": "default/test/*.parquet"}
# LongBench as parquet, the copy lm-eval reads since its PR #3361 (THUDM/LongBench is a script).
_LONGBENCH = "Xnhyacinth/LongBench", "2e9ade51ebf45d98942056c0716234f9d5d257d5"
_QA = {"document": "context", "question": "question", "answers": "answers"}

register(
    Source("trec", "icl", *_TREC, "default", "test", _TREC_FILES,
           {"text": "text", "label": "coarse_label"}),
    Source("trec-fine", "icl", *_TREC, "default", "test", _TREC_FILES,
           {"text": "text", "label": "fine_label"}),
    Source("banking77", "icl", "legacy-datasets/banking77",
           "f54121560de48f2852f90be299010d1d6dc612ec", "default", "test",
           {"train": "data/train-*.parquet", "test": "data/test-*.parquet"},
           {"text": "text", "label": "label"}),
    Source("clinic150", "icl", "clinc/clinc_oos", "155b9c710419136e17307b80d0a13e68cd46b4ec",
           "plus", "test", {"train": "plus/train-*.parquet", "test": "plus/test-*.parquet"},
           {"text": "text", "label": "intent"}),
    Source("xsum", "hallucination", "EdinburghNLP/xsum",
           "30802a38d3f89b2fa8f19276008459e8c2b8b8e6", "default", "test",
           {"test": "data/test-*.parquet"}, {"document": "document", "summary": "summary"}),
    Source("cnndm", "hallucination", "abisee/cnn_dailymail",
           "96df5e686bee6baa90b8bee7c28b81fa3fa6223d", "3.0.0", "test",
           {"test": "3.0.0/test-*.parquet"}, {"document": "article", "summary": "highlights"}),
    Source("multinews", "hallucination", "alexfabbri/multi_news",
           "713d9814275decacf84b5b7dbe7a4cd3d21fc8d9", None, "test",
           {"test": "data/test.*"}, {"document": "src.cleaned", "summary": "tgt"},
           format="lines"),
    Source("qasper", "hallucination", *_LONGBENCH, "qasper", "test",
           {"test": "qasper/test-*.parquet"}, _QA),
    Source("hotpotqa", "hallucination", *_LONGBENCH, "hotpotqa", "test",
           {"test": "hotpotqa/test-*.parquet"}, _QA),
    Source("2wikimqa", "hallucination", *_LONGBENCH, "2wikimqa", "test",
           {"test": "2wikimqa/test-*.parquet"}, _QA),
)  # fmt: skip


def _read_lines(source: Source, folder: Path, split: str) -> Table:
    """A split kept as one text file per column, an example per line (Multi-News's raw files:
    articles joined by `|||||`, line breaks written NEWLINE_CHAR); blank examples dropped."""
    files = {p.name: p for p in _matching(folder, source.files[split])}
    columns: dict[str, list[str]] = {}
    for role, suffix in source.columns.items():
        name = next((n for n in files if n.endswith("." + suffix)), None)
        if name is None:
            raise DiffbenchError(
                f"dataset {source.name} ({source.repo}, split {split}) has no file *.{suffix}"
            )
        lines = files[name].read_text(encoding="utf-8").splitlines()
        columns[role] = [line.replace("NEWLINE_CHAR", "\n").strip() for line in lines]
    counts = {len(v) for v in columns.values()}
    if len(counts) != 1:
        raise DiffbenchError(f"dataset {source.name}: its files of split {split} differ in length")
    rows = [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]
    return Table([r for r in rows if all(r.values())], {})


def add_command(sub: Any) -> None:
    """Add `diffbench datasets` to the CLI's subcommands."""
    d = sub.add_parser(
        "datasets", help="the paper's datasets: pinned hub sources and how to prefetch them"
    )
    d.add_argument("--json", action="store_true", help="one JSON object per dataset")


def run_command(args: argparse.Namespace) -> int:
    """`diffbench datasets`: the source table, and whether each source is in the hub cache."""
    if args.json:
        print(json.dumps([s.as_json() for s in SOURCES.values()], indent=2))
        return 0
    print(f"hub cache: {cache_root()}{' (HF_HUB_OFFLINE is set)' if offline() else ''}")
    for s in SOURCES.values():
        state = "cached" if cached(s) is not None else "not cached"
        where = f"{s.repo}@{s.revision[:12]}" + (f" config {s.config}" if s.config else "")
        print(f"\n{s.name} ({s.task}, split {s.split}): {where} [{state}]")
        print("  columns: " + ", ".join(f"{role}={col}" for role, col in s.columns.items()))
        print(f"  prefetch: {s.prefetch}")
    return 0
