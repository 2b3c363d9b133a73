"""The results store: one run directory that reports and plots read, and runs resume from.

Layout: `run.json` (the run record: resolved config, task descriptions, model identities,
versions; `RunRecord`), `metrics.csv` (tidy: one row per
task x setting x metric x model), `samples/<task>/<model>.jsonl` (one scored sample per line,
appended and flushed as scored), `report.md` and `figures/`, and `.diffbench.lock`, held by the one
process that writes the run (rank 0 of a data-parallel run).

A data-parallel run's rank R appends to `samples/<task>/rank<R>/<model>.jsonl` instead, and rank 0
merges those files into the model's own file once every rank is done (`merge_ranks`). A run killed
before that leaves them behind; readers read them after the model's file, and the next run's
lock holder merges them before anything is scored, so rank files only ever hold samples newer
than the model's file and the ranks of one run never share an id.

A sample line counts once its newline is written: readers skip a torn last line (a run killed
mid-write) without touching the file, and the writer drops it before appending. A later line for
the same (model, id) supersedes an earlier one (a resume re-scores a sample whose inputs changed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pandas as pd
from diffbench.api import INPUT_KEY, METRIC_COLUMNS, ModelInfo, Sample
from diffbench.errors import DiffbenchError
from filelock import FileLock, Timeout

log = logging.getLogger("diffbench")

LOCK_FILE = ".diffbench.lock"
RANK_DIR = re.compile(r"rank(\d+)")

# The shape of run.json that this code writes, and the newest it reads; run.json holds it under
# VERSION_KEY. 1: config, versions, git_revision, command, started, models, finished. 2: adds
# task_info (task_order and world_size came later without a bump: readers default them). Bump it
# only when the written shape changes, and teach `RunRecord.from_json` to read the older shapes.
RUN_RECORD_VERSION = 2
VERSION_KEY = "diffbench_run"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _malformed(source: str, what: str) -> DiffbenchError:
    return DiffbenchError(f"{source} is not a valid diffbench run record: {what}")


def _typed(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    """data[key], refused in one line unless it is a `kind` (a bool is no int here)."""
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise _malformed(source, f"{key!r} is {type(value).__name__} {value!r}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _str_map(data: Mapping[str, Any], key: str, source: str) -> dict[str, str]:
    value = _typed(data, key, dict, source)
    if not all(isinstance(v, str) for v in value.values()):
        raise _malformed(source, f"{key!r} holds a value that is not text")
    return dict(value)


def _str_list(data: Mapping[str, Any], key: str, source: str) -> tuple[str, ...]:
    value = _typed(data, key, list, source)
    if not all(isinstance(v, str) for v in value):
        raise _malformed(source, f"{key!r} holds an entry that is not text")
    return tuple(value)


# ModelInfo's fields and the JSON types run.json holds them as (every version recorded them all).
_MODEL_FIELDS: dict[str, type] = {
    "label": str,
    "spec": str,
    "backend": str,
    "path": str,
    "architecture": str,
    "n_parameters": int,
    "dtype": str,
    "max_context": int,
    "has_chat_template": bool,
    "fingerprint": str,
}


def _model_info(label: str, data: Any, source: str) -> ModelInfo:
    """One entry of run.json's `models`, typed."""
    where = f"{source} model {label!r}"
    if not isinstance(data, dict):
        raise _malformed(source, f"model {label!r} is {type(data).__name__}, not an object")
    missing = [k for k in _MODEL_FIELDS if k not in data]
    if missing:
        raise _malformed(source, f"model {label!r} lacks {', '.join(missing)}")
    values = {k: _typed(data, k, kind, where) for k, kind in _MODEL_FIELDS.items()}
    return ModelInfo(**values)


@dataclass(frozen=True)
class RunRecord:
    """run.json: what a run was asked to do, what ran it, and what it describes about its tasks
    and models, so that readers need neither the command nor the plugins.

    `config` is the resolved run definition (`runner.identity`: tasks' options, models, seed,
    limit), which a resume must match; `task_info` maps each task to the dict form that
    `api.TaskInfo.from_json` reads. Fields that older runs lack read as their defaults.
    """

    config: Mapping[str, Any]
    task_info: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    task_order: tuple[str, ...] = ()  # the run's task order (run.json's keys are sorted)
    models: Mapping[str, ModelInfo] = field(default_factory=dict)  # by label, once loaded
    versions: Mapping[str, str] = field(default_factory=dict)  # python, platform, packages
    git_revision: str | None = None
    command: tuple[str, ...] = ()  # the command line that started (or last resumed) the run
    world_size: int = 1  # data-parallel ranks
    started: str = ""
    finished: str | None = None  # None: running, or stopped before the end
    version: int = RUN_RECORD_VERSION  # the shape this record was written in

    @property
    def model_labels(self) -> tuple[str, ...]:
        """The configured models' labels, in the run's order."""
        return tuple(m["label"] for m in self.config.get("models", ()))

    @property
    def task_names(self) -> tuple[str, ...]:
        """The configured tasks."""
        return tuple(self.config.get("tasks", {}))

    @property
    def seed(self) -> int | None:
        """The run's seed (None if the config does not record one)."""
        seed = self.config.get("seed")
        return seed if isinstance(seed, int) else None

    def to_json(self) -> dict[str, Any]:
        """The record as run.json stores it."""
        out: dict[str, Any] = {
            VERSION_KEY: self.version,
            "config": dict(self.config),
            "task_info": {k: dict(v) for k, v in self.task_info.items()},
            "task_order": list(self.task_order),
            "models": {k: dataclasses.asdict(v) for k, v in self.models.items()},
            "versions": dict(self.versions),
            "git_revision": self.git_revision,
            "command": list(self.command),
            "world_size": self.world_size,
            "started": self.started,
        }
        if self.finished is not None:  # absent until the run ends, as runs always wrote it
            out["finished"] = self.finished
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "run.json") -> RunRecord:
        """The record read back from run.json's parsed JSON (any version up to
        RUN_RECORD_VERSION); one-line DiffbenchError, naming `source`, for anything else."""
        if not isinstance(data, dict):
            raise _malformed(source, f"a JSON {type(data).__name__}, not an object")
        if VERSION_KEY not in data:
            raise _malformed(source, f"no {VERSION_KEY!r} version")
        version = _typed(data, VERSION_KEY, int, source)
        if version > RUN_RECORD_VERSION:
            raise DiffbenchError(
                f"{source} was written by a newer diffbench (run record version {version}; "
                f"this one reads up to {RUN_RECORD_VERSION}): upgrade diffbench"
            )
        if version < 1:
            raise _malformed(source, f"version {version}")
        if "config" not in data:
            raise _malformed(source, "no 'config'")
        config = _typed(data, "config", dict, source)
        models = _typed(config, "models", list, source) if "models" in config else []
        if not all(isinstance(m, dict) and isinstance(m.get("label"), str) for m in models):
            raise _malformed(source, "a configured model without a text 'label'")
        if "tasks" in config:
            _typed(config, "tasks", dict, source)
        task_info = _typed(data, "task_info", dict, source) if "task_info" in data else {}
        if not all(isinstance(v, dict) for v in task_info.values()):
            raise _malformed(source, "a 'task_info' entry that is not an object")
        recorded = _typed(data, "models", dict, source) if "models" in data else {}
        has = data.__contains__
        return cls(
            config=config,
            task_info=task_info,
            task_order=_str_list(data, "task_order", source) if has("task_order") else (),
            models={k: _model_info(k, v, source) for k, v in recorded.items()},
            versions=_str_map(data, "versions", source) if has("versions") else {},
            git_revision=_typed(data, "git_revision", (str, type(None)), source)
            if has("git_revision")
            else None,
            command=_str_list(data, "command", source) if has("command") else (),
            world_size=_typed(data, "world_size", int, source) if has("world_size") else 1,
            started=_typed(data, "started", str, source) if has("started") else "",
            finished=_typed(data, "finished", (str, type(None)), source)
            if has("finished")
            else None,
            version=version,
        )


def natural_key(column: pd.Series) -> pd.Series:
    """Sort key putting numbers in numeric order before any text (e.g. depth 0, 25, 100, all)."""
    numbers = pd.to_numeric(column, errors="coerce")
    return pd.Series(
        [
            (0, n, "") if pd.notna(n) else (1, 0.0, str(v))
            for n, v in zip(numbers, column, strict=True)
        ],
        index=column.index,
    )


def _repair_tail(path: Path) -> None:
    """Drop a torn last line left by a crash mid-write, so appends start on a fresh line.

    Only the writer (holding the run's lock) calls this; readers skip the line instead.
    """
    if not path.exists():
        return
    with path.open("rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)
            return
        start = data.rfind(b"\n", 0, len(data) - 1) + 1
        last = data[start:]
        if last.strip():
            try:
                json.loads(last)
            except (UnicodeDecodeError, json.JSONDecodeError):
                fh.truncate(start)


def read_samples(path: Path) -> list[Sample]:
    """The complete sample lines of one samples file, in file order; a torn last line is skipped.

    Only the last line can be torn (the writer drops it before appending), so a bad line anywhere
    else is damage, not an interrupted write, and is an error.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    # After the last newline: empty for a complete file, else a line whose newline never landed.
    torn = lines.pop()
    if torn.strip():
        log.warning("%s: skipping a torn last line (a run stopped mid-write)", path)
    out: list[Sample] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if number == len(lines) and not torn.strip():
                log.warning("%s: skipping an unreadable last line (%s)", path, err)
                continue
            raise DiffbenchError(
                f"{path} line {number} is not a JSON sample ({err}); the file is damaged"
            ) from None
        if not isinstance(sample, dict) or "id" not in sample:
            raise DiffbenchError(f"{path} line {number} is not a sample (no 'id')")
        out.append(sample)
    return out


class RunStore:
    """Read and write one run directory; `rank` set: a data-parallel rank's writer, which appends
    to its own sample files."""

    def __init__(self, root: Path, rank: int | None = None) -> None:
        self.root = root
        self.rank = rank
        self._handles: dict[tuple[str, str], IO[str]] = {}

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def samples_file(self, task: str, model: str) -> Path:
        """Where one model's samples of one task are kept."""
        return self.root / "samples" / task / f"{model}.jsonl"

    def rank_file(self, task: str, model: str, rank: int) -> Path:
        """Where data-parallel rank `rank` appends one model's samples of one task."""
        return self.root / "samples" / task / f"rank{rank}" / f"{model}.jsonl"

    def _rank_dirs(self, task: str) -> list[Path]:
        """The task's rank folders, in rank order."""
        folder = self.root / "samples" / task
        if not folder.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in folder.iterdir()
            if p.is_dir() and (m := RANK_DIR.fullmatch(p.name))
        ]
        return [p for _, p in sorted(found)]

    def _sample_paths(self, task: str, model: str) -> list[Path]:
        """Every file holding (task, model) samples, oldest lines first: the model's file, then
        the rank files a run stopped before merging."""
        ranks = [d / f"{model}.jsonl" for d in self._rank_dirs(task)]
        return [self.samples_file(task, model), *(p for p in ranks if p.exists())]

    @classmethod
    def open_existing(cls, root: Path) -> RunStore:
        """A store for a directory that must already hold a run."""
        if not root.is_dir():
            raise DiffbenchError(f"{root} is not a directory")
        if not (root / "run.json").exists():
            raise DiffbenchError(f"{root} is not a diffbench run directory (no run.json)")
        return cls(root)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for one writer; a second one gets a one-line error."""
        if self.root.exists() and not self.root.is_dir():
            raise DiffbenchError(
                f"{self.root} is a file, not a run directory; choose another --output"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DiffbenchError(
                f"cannot create run directory {self.root}: {err.strerror}"
            ) from None
        # An OS lock (flock) is released by the kernel when its holder dies, so a killed run never
        # leaves a stale lock behind; the file itself stays, which is harmless.
        lock = FileLock(self.root / LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise DiffbenchError(
                f"{self.root} is being written by another diffbench process; wait for it to "
                "finish or choose another --output"
            ) from None
        except OSError as err:
            raise DiffbenchError(f"cannot lock run directory {self.root}: {err.strerror}") from None
        try:
            yield
        finally:
            lock.release()

    # ---- run.json --------------------------------------------------------------------------

    def read_record(self) -> RunRecord:
        """The run record; a one-line error when it is unreadable, malformed or too new."""
        try:
            data = json.loads(self.run_file.read_text(encoding="utf-8"))
        except OSError as err:
            raise DiffbenchError(f"cannot read {self.run_file}: {err.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DiffbenchError(f"{self.run_file} is not valid JSON ({err})") from None
        return RunRecord.from_json(data, str(self.run_file))

    def write_record(self, record: RunRecord) -> None:
        """Write the run record atomically (keys sorted: byte-reproducible)."""
        text = json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n"
        write_atomic(self.run_file, text)

    def read_run(self) -> dict[str, Any]:
        """The run record as run.json's dict, for readers not yet moved to `read_record`."""
        return self.read_record().to_json()

    # ---- samples ---------------------------------------------------------------------------

    def scored_ids(self, task: str, model: str) -> set[str]:
        """Ids already scored for (task, model)."""
        return set(self.scored_inputs(task, model))

    def scored_inputs(self, task: str, model: str) -> dict[str, str | None]:
        """Id -> input digest of the sample in force (the last line) for (task, model).

        None where the sample has no digest (written before digests were recorded).
        """
        out: dict[str, str | None] = {}
        for path in self._sample_paths(task, model):
            for sample in read_samples(path):
                digest = sample.get(INPUT_KEY)
                out[str(sample["id"])] = digest if isinstance(digest, str) else None
        return out

    def append(self, task: str, model: str, sample: Sample) -> None:
        """Append one scored sample (to this rank's file, for a rank) and flush it to disk."""
        key = (task, model)
        fh = self._handles.get(key)
        if fh is None:
            path = (
                self.samples_file(task, model)
                if self.rank is None
                else self.rank_file(task, model, self.rank)
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            _repair_tail(path)
            fh = self._handles[key] = path.open("a", encoding="utf-8")
        fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

    def close(self) -> None:
        """Close the open sample files."""
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def merge_ranks(self) -> int:
        """Move the rank files' samples into each model's own file; return the lines moved.

        Only the lock holder calls this, with no rank writing. A line equal to the sample already
        in force is not copied again, so a merge killed between copying and deleting a rank file
        leaves no duplicate behind when it is redone.
        """
        moved = 0
        for task in self.sample_tasks():
            rank_dirs = self._rank_dirs(task)
            models = sorted({p.stem for d in rank_dirs for p in d.glob("*.jsonl")})
            for model in models:
                main = self.samples_file(task, model)
                in_force = {str(s["id"]): s for s in read_samples(main)}
                new = []
                for d in rank_dirs:
                    for sample in read_samples(d / f"{model}.jsonl"):
                        if in_force.get(str(sample["id"])) != sample:
                            in_force[str(sample["id"])] = sample
                            new.append(sample)
                if new:
                    _repair_tail(main)
                    with main.open("a", encoding="utf-8") as fh:
                        for sample in new:
                            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())
                    moved += len(new)
                for d in rank_dirs:
                    (d / f"{model}.jsonl").unlink(missing_ok=True)
            for d in rank_dirs:
                if not any(d.iterdir()):
                    d.rmdir()
        return moved

    def sample_tasks(self) -> list[str]:
        """Tasks that have a samples folder."""
        root = self.root / "samples"
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []

    def samples(self, task: str) -> pd.DataFrame:
        """All models' samples of one task, one row per sample, sorted by model and id."""
        folder = self.root / "samples" / task
        models = {p.stem for p in folder.glob("*.jsonl")}
        models |= {p.stem for d in self._rank_dirs(task) for p in d.glob("*.jsonl")}
        rows: list[Sample] = []
        for model in sorted(models):
            for path in self._sample_paths(task, model):
                rows.extend(read_samples(path))
        frame = pd.DataFrame(rows)
        if frame.empty:
            return frame
        # One row per (model, id): the last line, which a resume writes when it re-scores a
        # sample whose inputs changed.
        frame = frame.drop_duplicates(subset=["model", "id"], keep="last")
        return frame.sort_values(["model", "id"], kind="stable").reset_index(drop=True)

    # ---- metrics ---------------------------------------------------------------------------

    def write_metrics(self, metrics: pd.DataFrame, setting_order: list[str]) -> None:
        """Write metrics.csv atomically, rows and columns in a fixed order (byte-reproducible)."""
        settings = [c for c in setting_order if c in metrics.columns]
        extra = sorted(c for c in metrics.columns if c not in METRIC_COLUMNS and c not in settings)
        columns = [*METRIC_COLUMNS, *settings, *extra]
        frame = metrics.reindex(columns=columns)
        sort_keys = ["task", *settings, *extra, "metric", "model"]
        frame = frame.sort_values(sort_keys, key=natural_key, kind="stable").reset_index(drop=True)
        write_atomic(self.metrics_file, frame.to_csv(index=False, float_format="%.10g"))

    def metrics(self) -> pd.DataFrame:
        """metrics.csv as a frame (settings kept as text)."""
        if not self.metrics_file.exists():
            raise DiffbenchError(f"{self.root} has no metrics.csv; run or resume it first")
        return pd.read_csv(self.metrics_file, dtype=str, keep_default_na=False).pipe(_numeric)


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    for col in ("value", "stderr"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame["n"] = pd.to_numeric(frame["n"], errors="coerce").astype("Int64")
    return frame
