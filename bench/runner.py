"""The runner: tasks' requests go to each model's backend in batches, scores go to the store.

A run is identified by its resolved configuration; rerunning the same configuration into the same
directory skips every sample already scored on the same inputs, so a killed run resumes where it
stopped. A resume refuses a model whose weights or tokenizer files changed, and re-scores a sample
whose request changed. One process at a time writes a run directory (the store's lock).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
from diffbench import registry
from diffbench.api import (
    INPUT_KEY,
    VERBS,
    Backend,
    Item,
    Request,
    Task,
    TaskInfo,
    answers,
    shared_text,
)
from diffbench.config import build_config, config_dict
from diffbench.errors import DiffbenchError
from diffbench.models import ModelSpec, check_spec, load_backend
from diffbench.store import RunStore
from tqdm import tqdm

log = logging.getLogger("diffbench")

RESULTS_DIR = Path("results")
PACKAGES = ("diffbench", "torch", "transformers", "tokenizers", "pandas", "numpy", "gguf")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; its hash names the default output directory."""

    tasks: tuple[str, ...]
    models: tuple[ModelSpec, ...]
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 1234
    limit: int | None = None
    output: Path | None = None


@dataclass(frozen=True)
class PreparedTask:
    task: Task
    config: Any


def prepare_tasks(cfg: RunConfig) -> dict[str, PreparedTask]:
    """Load each task plugin and build its config; all bad options fail before any model loads."""
    out = {}
    for name in cfg.tasks:
        task = registry.load(name)
        presets = getattr(task, "presets", {})
        out[name] = PreparedTask(
            task, build_config(name, task.config_type, presets, cfg.task_options.get(name, {}))
        )
    unknown = set(cfg.task_options) - set(cfg.tasks)
    if unknown:
        raise DiffbenchError(
            f"options given for tasks not in this run: {', '.join(sorted(unknown))}"
        )
    return out


def check_answers(spec: ModelSpec, prepared: dict[str, PreparedTask]) -> None:
    """Refuse, before any model loads, a model whose backend cannot answer a request kind that
    one of the run's tasks sends."""
    cls = registry.backend_class(spec.backend)
    for name, p in prepared.items():
        for kind in p.task.request_kinds:
            if not answers(cls, kind):
                raise DiffbenchError(
                    f"model {spec.label!r} ({spec.backend} backend) cannot answer "
                    f"{kind.__name__}, which task {name} sends"
                )


def identity(cfg: RunConfig, prepared: dict[str, PreparedTask]) -> dict[str, Any]:
    """The resolved, JSON-ready definition of a run (what must match for a resume)."""
    return {
        "tasks": {n: config_dict(p.config) for n, p in prepared.items()},
        "models": [
            {"label": m.label, "spec": m.spec, "options": dict(sorted(m.options.items()))}
            for m in cfg.models
        ],
        "seed": cfg.seed,
        "limit": cfg.limit,
    }


def default_output(cfg: RunConfig, ident: dict[str, Any]) -> Path:
    """results/<tasks>__<models>__<hash>: the same command always lands in the same place."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{'-'.join(cfg.tasks)}__{'-'.join(m.label for m in cfg.models)}__{digest}"
    return RESULTS_DIR / name


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


def _limited(items: list[Item], limit: int | None) -> list[Item]:
    """At most `limit` items per setting, in the task's order."""
    if limit is None:
        return items
    seen: dict[str, int] = {}
    out = []
    for it in items:
        key = json.dumps(it.setting, sort_keys=True, default=str)
        if seen.get(key, 0) < limit:
            seen[key] = seen.get(key, 0) + 1
            out.append(it)
    return out


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

    def __init__(self, desc: str, total: int, done: int) -> None:
        self.desc, self.total, self.count = desc, total, done
        self.bar = (
            tqdm(total=total, initial=done, desc=desc, unit="sample", leave=True)
            if sys.stderr.isatty()
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
        responses: list[Any] = getattr(backend, VERBS[type(requests[0])])(requests)
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
        frames.append(p.task.aggregate(p.config, samples))
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


def run(cfg: RunConfig) -> Path:
    """Run (or resume) every task on every model; return the run directory."""
    prepared = prepare_tasks(cfg)
    for spec in cfg.models:  # bad paths, options and request kinds fail before anything loads
        check_answers(spec, prepared)
        check_spec(spec)
    ident = identity(cfg, prepared)
    root = cfg.output or default_output(cfg, ident)
    store = RunStore(root)
    # One writer per run directory: two would each score and append every sample.
    with store.lock():
        _run_locked(cfg, prepared, ident, store)
    return root


def _run_locked(
    cfg: RunConfig, prepared: dict[str, PreparedTask], ident: dict[str, Any], store: RunStore
) -> None:
    """run()'s body, holding the run directory's lock."""
    root = store.root
    record: dict[str, Any] = {}
    resuming = store.run_file.exists()
    if resuming:
        record = store.read_run()
        if record.get("config") != json.loads(json.dumps(ident)):
            raise DiffbenchError(
                f"{root} holds a run with a different configuration; choose another --output "
                "or delete that directory"
            )
        log.info("resuming the run in %s", root)
    record.update(
        {
            "diffbench_run": 2,  # 2: run.json describes its tasks (`task_info`)
            "config": ident,
            "task_info": {n: TaskInfo.of(p.task).to_json() for n, p in prepared.items()},
            "versions": versions(),
            "git_revision": git_revision(),
            "command": sys.argv,
            "started": record.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
        }
    )
    record.setdefault("models", {})
    if not resuming:  # a resume rewrites run.json only once its first model is found unchanged
        store.write_run(record)
    try:
        for spec in cfg.models:
            t0 = time.perf_counter()
            backend = load_backend(spec)
            info = backend.info.__dict__.copy()
            old = record["models"].get(spec.label)
            change = old and fingerprint_change(str(old.get("fingerprint")), info["fingerprint"])
            if change:
                backend.close()
                raise DiffbenchError(
                    f"model {spec.label!r} has changed since this run started ({change}); "
                    "use a new --output"
                )
            record["models"][spec.label] = info
            store.write_run(record)
            log.info(
                "loaded %s (%s, %s parameters) in %.1fs",
                spec.label,
                info["architecture"],
                f"{info['n_parameters']:,}",
                time.perf_counter() - t0,
            )
            try:
                view = backend.tokenizer_view()
                for name, p in prepared.items():
                    items = _limited(list(p.task.items(p.config, view, cfg.seed)), cfg.limit)
                    ids = [it.id for it in items]
                    if len(set(ids)) != len(ids):
                        raise RuntimeError(f"task {name} produced duplicate sample ids")
                    todo = _unscored(store, name, spec.label, items)
                    bar = Progress(f"{name}/{spec.label}", len(items), len(items) - len(todo))
                    try:
                        score_items(backend, p, todo, store, spec.label, bar)
                    finally:
                        bar.close()
            finally:
                backend.close()
    finally:
        store.close()
    aggregate(store, prepared)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    store.write_run(record)


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
