"""The runner: tasks' requests go to each model's backend in batches, scores go to the store.

A run is identified by its resolved configuration; rerunning the same configuration into the same
directory skips every sample already scored on the same inputs, so a killed run resumes where it
stopped. A resume refuses a model whose weights or tokenizer files changed, and re-scores a sample
whose request changed. One process at a time writes a run directory (the store's lock).

Under `torchrun --nproc_per_node K` (or any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK)
the same run is data parallel: every rank loads every model, scores its own share of the items
into its own sample files, and rank 0, which holds the lock and writes run.json, merges the ranks'
files and aggregates once all are done. Items are dealt to ranks one by one (a run of requests
sharing a prefix counts as one), never by batch, so scores do not depend on the world size; what
any rank scored counts for every later run, whatever its world size.

A task that declares `interleave_models = True` (throughput) runs after that loop, in another
order: every model that runs it is loaded at once, and its i-th item is answered on the first
model, the second, ... before any model answers item i + 1, so that drift in the machine's load
(or its clock) falls on every model alike and the items pair across models by id. Holding every
such model at once costs their weights together, in host or device memory: fine for the
benchmarking this is for, not for a long-context task. Such a task is never sharded: once every
rank's other work is done, rank 0 alone runs it while the others wait, since timings taken on
several devices at once would measure each against the others' load. Its requests are built on
every model before the first timed item, and also when a model loads for the per-model tasks, so
a length beyond a model's context stops the run before any task spends time on that model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from diffbench.api import (
    INPUT_KEY,
    VERBS,
    Backend,
    Item,
    ModelInfo,
    Request,
    Task,
    TaskInfo,
    TokenizerView,
    declared_metrics,
    respond,
    shared_text,
)
from diffbench.errors import DiffbenchError
from diffbench.models import ModelSpec
from diffbench.plan import (  # re-exported: scripts and tests build runs from these
    Plan,
    PlannedModel,
    PreparedTask,
    RunConfig,
    limited,
    resolve,
)
from diffbench.store import RunRecord, RunStore
from tqdm import tqdm

log = logging.getLogger("diffbench")

T = TypeVar("T")

PACKAGES = ("diffbench", "torch", "transformers", "tokenizers", "pandas", "numpy", "gguf")


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers, Python and the platform."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_revision() -> str | None:
    """The diffbench checkout's commit (with '+dirty' for local changes), when there is one."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _chunks(items: list[Item], size: int) -> Iterator[list[Item]]:
    """Runs of one request kind, cut after `size` items but never inside a run of requests that
    share a text (a choice request's prefix, whose cache the backend computes once)."""
    chunk: list[Item] = []
    for it in items:
        if chunk:
            prev, cur = chunk[-1].request, it.request
            same_kind = type(prev) is type(cur)
            shared = shared_text(prev)
            sharing = shared is not None and shared == shared_text(cur)
            if not same_kind or (len(chunk) >= size and not sharing):
                yield chunk
                chunk = []
        chunk.append(it)
    if chunk:
        yield chunk


class Progress:
    """A tqdm bar on a terminal; plain log lines (about every 10%) otherwise."""

    def __init__(self, desc: str, total: int, done: int, bar: bool = True) -> None:
        self.desc, self.total, self.count = desc, total, done
        self.bar = (
            tqdm(total=total, initial=done, desc=desc, unit="sample", leave=True)
            if bar and sys.stderr.isatty()
            else None
        )
        self._next_log = done + max(1, total // 10)
        if self.bar is None:
            log.info("%s: %d/%d already scored", desc, done, total)

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.count >= self._next_log or self.count == self.total:
            log.info("%s: %d/%d scored", self.desc, self.count, self.total)
            self._next_log = self.count + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def input_digest(request: Request) -> str:
    """sha256 (first 16 hex digits) of everything a request asks (its kind and every field):
    the inputs' identity, so a changed prompt, stop string or budget is re-scored on resume."""
    fields = {"kind": type(request).__name__, **dataclasses.asdict(request)}
    text = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def score_items(
    backend: Backend,
    prepared: PreparedTask,
    items: list[Item],
    store: RunStore,
    label: str,
    progress: Progress,
) -> None:
    """Send `items` to the backend in chunks; score and store each response as it arrives."""
    task, cfg = prepared.task, prepared.config
    chunk_size = 16
    for chunk in _chunks(items, chunk_size):
        requests = [it.request for it in chunk]
        responses = respond(backend, requests)
        for it, resp in zip(chunk, responses, strict=True):
            record = {"id": it.id, "task": task.name, "model": label, **it.setting}
            record[INPUT_KEY] = input_digest(it.request)
            scored = task.score(cfg, it, resp)
            for part in (it.meta, scored):
                clash = set(part) & set(record)
                if clash:
                    raise RuntimeError(f"task {task.name} reuses reserved keys {sorted(clash)}")
                record.update(part)
            store.append(task.name, label, record)
        progress.update(len(chunk))


def aggregate(store: RunStore, prepared: dict[str, PreparedTask]) -> pd.DataFrame:
    """Metric rows of every task from the stored samples (order-independent, so reproducible)."""
    frames, setting_order = [], []
    for name, p in prepared.items():
        samples = store.samples(name)
        if samples.empty:
            continue
        frame = p.task.aggregate(p.config, samples)
        # Statistics, reports and the gate read a metric through its declaration: one a task
        # emits without declaring it would be read with no direction, kind or unit.
        declared = {m.name for m in declared_metrics(p.task, p.config)}
        undeclared = sorted(set(frame["metric"]) - declared)
        if undeclared:
            raise RuntimeError(
                f"task {name} emitted metrics it does not declare: {', '.join(undeclared)}"
            )
        frames.append(frame)
        setting_order += [k for k in p.task.setting_keys if k not in setting_order]
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not metrics.empty:
        store.write_metrics(metrics, setting_order)
    return metrics


def fingerprint_change(old: str, new: str) -> str | None:
    """What differs between a model's recorded and current fingerprints, or None when nothing.

    A fingerprint is `kind:value` parts joined by ';' (weights `sha256`, `tokenizer`, hub
    `commit`, `hub` id). A part the recorded one lacks is not held against it: runs written before
    diffbench hashed tokenizer files stay resumable, and record the tokenizer from then on.
    """
    old_parts = dict(p.partition(":")[::2] for p in old.split(";"))
    new_parts = dict(p.partition(":")[::2] for p in new.split(";"))
    changed = [k for k in old_parts if new_parts.get(k) != old_parts[k]]
    if not changed:
        return None
    return ", ".join(
        f"{FINGERPRINT_PARTS.get(k, k)} {old_parts[k][:12]} -> {new_parts.get(k, 'none')[:12]}"
        for k in changed
    )


FINGERPRINT_PARTS = {"sha256": "weights", "tokenizer": "tokenizer files", "commit": "hub commit"}


# How long a rank waits for the others at a barrier: one whose share is done waits for the slowest,
# which on a long-context run (or a resume where one rank's share was lost) can take hours. A rank
# that dies ends the others through its launcher (torchrun stops the group), not through this.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run, from the launcher's environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """RANK, WORLD_SIZE and LOCAL_RANK as torchrun and accelerate set them; unset: 0 of 1."""
        values = {}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            raw = os.environ.get(name, "").strip()
            if not raw:
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise DiffbenchError(
                    f"environment variable {name}={raw!r} is not an integer; launch ranks with "
                    "torchrun or unset it"
                ) from None
        world = values.get("WORLD_SIZE", 1)
        rank = values.get("RANK", 0)
        local = values.get("LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world or local < 0:
            raise DiffbenchError(
                f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} is not a rank of a group; "
                "launch ranks with torchrun"
            )
        return cls(rank, world, local)


def main_rank() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes a run's report."""
    return Ranks.from_env().rank == 0


class Group:
    """The processes of one run and the few things they agree on (a one-process run needs none).

    The ranks exchange only small objects and barriers, so the process group is gloo even on
    GPUs: it needs no GPU memory or NCCL watchdog, and waits out a slow rank for hours.
    """

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self._dist: Any = None
        self._owned = False

    def __enter__(self) -> Group:
        if self.ranks.world_size == 1:
            return self
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise DiffbenchError(
                f"WORLD_SIZE={self.ranks.world_size} but {' and '.join(missing)} unset; "
                "launch ranks with torchrun"
            )
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            if self.ranks.local_rank >= torch.cuda.device_count():
                raise DiffbenchError(
                    f"LOCAL_RANK={self.ranks.local_rank} but this node has "
                    f"{torch.cuda.device_count()} GPUs; start at most that many ranks per node "
                    "(or hide the GPUs with CUDA_VISIBLE_DEVICES= for CPU ranks)"
                )
            # A model's device `cuda` (or `auto`) is then this rank's own GPU.
            torch.cuda.set_device(self.ranks.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
            self._owned = True
        self._dist = dist
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self._dist.destroy_process_group()

    def first(self, fn: Callable[[], T]) -> T:
        """`fn()` computed by rank 0 alone, returned on every rank once it is done; a
        DiffbenchError it raises is raised on every rank."""
        if self._dist is None:
            return fn()
        box: list[Any] = [None]
        failure: BaseException | None = None
        if self.ranks.rank == 0:
            try:
                box = [("ok", fn())]
            except DiffbenchError as err:
                box = [("error", str(err))]
            except BaseException as err:
                box, failure = [("failed", f"{type(err).__name__}: {err}")], err
        self._dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        status, value = box[0]
        if status == "error":
            raise DiffbenchError(value)
        if status == "failed":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order."""
        if self._dist is None:
            return [value]
        out: list[Any] = [None] * self.ranks.world_size
        self._dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self._dist is not None:
            self._dist.barrier()


def shard(items: list[Item], ranks: Ranks) -> list[Item]:
    """This rank's items: the task's items dealt round-robin in order, where a run of requests
    sharing a prefix is dealt as one (so its cache is still computed once)."""
    if ranks.world_size == 1:
        return items
    out: list[Item] = []
    unit, previous = -1, None
    for it in items:
        shared = shared_text(it.request)
        if shared is None or shared != previous:
            unit += 1
        previous = shared
        if unit % ranks.world_size == ranks.rank:
            out.append(it)
    return out


def _check_rank_device(spec: ModelSpec) -> None:
    """Refuse a model pinned to one GPU in a data-parallel run: every rank would share it."""
    device = str(spec.options.get("device", ""))
    if device.startswith("cuda:"):
        raise DiffbenchError(
            f"model {spec.label!r}: device={device} puts every rank on one GPU; under torchrun "
            "give device=cuda, and each rank takes cuda:LOCAL_RANK"
        )


def run(what: Plan | RunConfig) -> Path:
    """Run (or resume) a plan (a config is resolved first), every task on every model, as one
    rank of a data-parallel run when launched by torchrun; return the run directory."""
    plan = what if isinstance(what, Plan) else resolve(what)
    ranks = Ranks.from_env()
    if ranks.world_size > 1:
        for pm in plan.models:
            _check_rank_device(pm.spec)
    store = RunStore(plan.output, rank=ranks.rank if ranks.world_size > 1 else None)
    with Group(ranks) as group, ExitStack() as held:
        # One writer per run directory: two would each score and append every sample. Rank 0
        # holds it for the whole group; the other ranks append only to their own files.
        group.first(lambda: held.enter_context(store.lock()))
        _run_locked(plan, store, group)
    return plan.output


@dataclass
class RecordWriter:
    """Rank 0's run record, as last written to its store's run.json: a frozen `RunRecord`,
    replaced whole when a model is admitted and when the run finishes."""

    store: RunStore
    _record: RunRecord | None = None

    @property
    def record(self) -> RunRecord:
        """The record last written (or, on a resume, about to be)."""
        if self._record is None:
            raise RuntimeError("the run record is held by rank 0 once the run has started")
        return self._record

    def hold(self, record: RunRecord) -> None:
        """Take `record` as the run's record without writing it yet."""
        self._record = record

    def write(self, record: RunRecord) -> None:
        """Take `record` as the run's record and write it atomically."""
        self._record = record
        self.store.write_record(record)


def _admit(writer: RecordWriter, spec: ModelSpec, info: ModelInfo, fingerprints: list[str]) -> None:
    """Record a loaded model in run.json (rank 0); refuse one that changed since the run started
    or that another rank loaded from other files."""
    for rank, other in enumerate(fingerprints):
        change = fingerprint_change(info.fingerprint, other)
        if change:
            raise DiffbenchError(
                f"model {spec.label!r} differs between rank 0 and rank {rank} ({change}); "
                "every rank must load the same checkpoint"
            )
    record = writer.record
    old = record.models.get(spec.label)
    change = fingerprint_change(old.fingerprint, info.fingerprint) if old else None
    if change:
        raise DiffbenchError(
            f"model {spec.label!r} has changed since this run started ({change}); "
            "use a new --output"
        )
    writer.write(replace(record, models={**record.models, spec.label: info}))


def _run_locked(plan: Plan, store: RunStore, group: Group) -> None:
    """run()'s body, rank 0 holding the run directory's lock and alone writing run.json."""
    cfg, prepared, ident = plan.config, plan.tasks, plan.identity
    root = store.root
    ranks = group.ranks
    writer = RecordWriter(store)

    def start() -> None:
        old = store.read_record() if store.run_file.exists() else None
        if old is not None:
            if old.config != json.loads(json.dumps(ident)):
                raise DiffbenchError(
                    f"{root} holds a run with a different configuration; choose another --output "
                    "or delete that directory"
                )
            log.info("resuming the run in %s", root)
        # Before anyone reads what is scored: a stopped data-parallel run's samples count for
        # this run whatever its world size, and rank files then only hold this run's samples.
        moved = store.merge_ranks()
        if moved:
            log.info("merged %d samples that the ranks of a stopped run had scored", moved)
        record = RunRecord(
            config=ident,
            task_info={n: TaskInfo.of(p.task, p.config).to_json() for n, p in prepared.items()},
            task_order=tuple(prepared),
            models=old.models if old else {},
            versions=versions(),
            git_revision=git_revision(),
            command=tuple(sys.argv),
            world_size=ranks.world_size,
            started=old.started if old and old.started else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            finished=old.finished if old else None,
        )
        if old is None:
            writer.write(record)
        else:  # a resume rewrites run.json only once its first model is found unchanged
            writer.hold(record)

    group.first(start)
    interleaved = {n: p for n, p in prepared.items() if interleaves(p.task)}
    try:
        for pm in plan.models:
            spec = pm.spec
            if all(name in interleaved for name in prepared if spec.runs(name)):
                continue  # it loads with the others for its interleaved tasks
            backend = _load_model(pm, writer, group)
            try:
                # Every task's requests first (an interleaved task's too): a task that cannot run
                # on this model (a prompt beyond its context) stops the run before any other task
                # spends time on it.
                planned = _plan(prepared, spec, backend.tokenizer_view(), cfg)
                for name, items in planned.items():
                    if name in interleaved:
                        continue
                    mine = shard(items, ranks)
                    todo = _unscored(store, name, spec.label, mine)
                    desc = f"{name}/{spec.label}"
                    if ranks.world_size > 1:
                        desc += f" rank {ranks.rank}/{ranks.world_size}"
                    bar = Progress(desc, len(mine), len(mine) - len(todo), ranks.world_size == 1)
                    try:
                        score_items(backend, prepared[name], todo, store, spec.label, bar)
                    finally:
                        bar.close()
            finally:
                backend.close()
        if interleaved:
            group.barrier()  # no rank computes while rank 0 times
            if ranks.rank == 0:
                _run_interleaved(plan, interleaved, writer)
    finally:
        store.close()
    group.barrier()  # every rank's samples are on disk

    def finish() -> None:
        store.merge_ranks()
        aggregate(store, prepared)
        finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        writer.write(replace(writer.record, finished=finished))

    group.first(finish)


def interleaves(task: Task) -> bool:
    """Whether a task's items run on every model in turn (its optional `interleave_models`)."""
    return bool(getattr(task, "interleave_models", False))


def _load_model(pm: PlannedModel, writer: RecordWriter, group: Group) -> Backend:
    """The model's backend, loaded and recorded in run.json (every rank of `group` loads it)."""
    spec = pm.spec
    t0 = time.perf_counter()
    backend = pm.backend.load(spec)
    try:
        info = backend.info
        fingerprints = group.gather(info.fingerprint)
        group.first(partial(_admit, writer, spec, info, fingerprints))
    except BaseException:
        backend.close()
        raise
    log.info(
        "loaded %s (%s, %s parameters) in %.1fs",
        spec.label,
        info.architecture,
        f"{info.n_parameters:,}",
        time.perf_counter() - t0,
    )
    return backend


def _plan(
    prepared: dict[str, PreparedTask], spec: ModelSpec, view: TokenizerView, cfg: RunConfig
) -> dict[str, list[Item]]:
    """The items of every task of `prepared` that `spec` runs, limited as the run asks."""
    planned = {
        name: limited(list(p.task.items(p.config, view, cfg.seed)), cfg.limit)
        for name, p in prepared.items()
        if spec.runs(name)
    }
    for name, items in planned.items():
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"task {name} produced duplicate sample ids")
    return planned


def _run_interleaved(
    plan: Plan,
    interleaved: dict[str, PreparedTask],
    writer: RecordWriter,
) -> None:
    """Score the interleaved tasks: every model that runs one loaded at once, each item index
    answered on every model in turn (in the run's model order), each sample stored as it comes."""
    store = writer.store
    cfg = plan.config
    chosen = [pm for pm in plan.models if any(pm.spec.runs(name) for name in interleaved)]
    specs = [pm.spec for pm in chosen]
    alone = Group(Ranks())  # rank 0 by itself: no other rank loads these models
    with ExitStack() as loaded:
        backends: dict[str, Backend] = {}
        for pm in chosen:
            backends[pm.spec.label] = _load_model(pm, writer, alone)
            loaded.callback(backends[pm.spec.label].close)
        # Every model's requests before the first is timed (the context checks).
        plans = {
            s.label: _plan(interleaved, s, backends[s.label].tokenizer_view(), cfg) for s in specs
        }
        for name, p in interleaved.items():
            labels = [s.label for s in specs if s.runs(name)]
            items = {label: plans[label][name] for label in labels}
            todo = {
                label: {it.id for it in _unscored(store, name, label, items[label])}
                for label in labels
            }
            total = sum(len(v) for v in items.values())
            left = sum(len(v) for v in todo.values())
            bar = Progress(f"{name}/{len(labels)} models in turn", total, total - left)
            try:
                for i in range(max(len(v) for v in items.values())):
                    for label in labels:
                        if i < len(items[label]) and items[label][i].id in todo[label]:
                            score_items(backends[label], p, [items[label][i]], store, label, bar)
            finally:
                bar.close()


def _unscored(store: RunStore, task: str, label: str, items: list[Item]) -> list[Item]:
    """Items to score: new ones, and stored ones whose inputs differ from today's request.

    A re-scored sample is appended and supersedes its old line (readers take the last), so a
    changed prompt is never mixed with results for the old one.
    """
    scored = store.scored_inputs(task, label)
    todo = [it for it in items if scored.get(it.id, "") != input_digest(it.request)]
    stale = sum(it.id in scored for it in todo)
    if stale:
        log.warning(
            "%s/%s: re-scoring %d stored samples scored on other inputs (or recording none)",
            task,
            label,
            stale,
        )
    # Same-kind requests together, so each backend call gets a full batch.
    order = {kind: i for i, kind in enumerate(VERBS)}
    return sorted(todo, key=lambda it: order[type(it.request)])
