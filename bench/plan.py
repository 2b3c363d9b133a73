"""A run resolved once into a plan: each task with its built config, each model with its backend
class, the run's identity and its directory. `diffbench run` resolves the plan and the runner
executes it; `diffbench run --dry-run` describes it (requests, tokens, longest prompt against each
model's context, datasets to prefetch) from tokenizers alone, loading no weights.

Every check that can fail before a model loads happens here, in one place: unknown tasks and
options, model specs whose files or options are bad, a request kind a model's backend cannot
answer.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from diffbench import registry
from diffbench.api import (
    Backend,
    ChoiceRequest,
    GenerateRequest,
    Item,
    Request,
    Task,
    ThroughputRequest,
    answers,
    request_kinds,
)
from diffbench.config import build_config, config_dict, split_variant
from diffbench.errors import DiffbenchError
from diffbench.models import ModelSpec

RESULTS_DIR = Path("results")
T = TypeVar("T")
NAME_ITEMS = 3  # names shown per part of a default run directory's name, then "+Nmore"
NAME_ITEM_MAX = 32  # characters of one name there


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
    """A task plugin and its built config."""

    task: Task
    config: Any


@dataclass(frozen=True)
class PlannedModel:
    """A model of the run and the backend class that loads it."""

    spec: ModelSpec
    backend: type[Backend]


@dataclass(frozen=True)
class Problem:
    """One reason a run cannot start: what it concerns and why."""

    task: str
    model: str
    message: str


@dataclass(frozen=True)
class Plan:
    """A run, resolved: what the runner executes and `--dry-run` describes."""

    config: RunConfig
    tasks: dict[str, PreparedTask]
    models: tuple[PlannedModel, ...]
    identity: dict[str, Any]
    output: Path
    # What stops the run, when resolved with keep_going (a dry run): (task or "", model or "",
    # message); the tasks and models named there are left out of the plan.
    problems: tuple[Problem, ...] = ()


def prepare_task(name: str, options: dict[str, Any]) -> PreparedTask:
    """Load a task plugin and build its config from `options` (bad options fail here)."""
    task = registry.load(name)
    presets = getattr(task, "presets", {})
    return PreparedTask(task, build_config(name, task.config_type, presets, options))


def check_task_options(cfg: RunConfig) -> None:
    """Refuse options given for a task the run does not have."""
    unknown = set(cfg.task_options) - set(cfg.tasks)
    if unknown:
        raise DiffbenchError(
            f"options given for tasks not in this run: {', '.join(sorted(unknown))}"
        )


def prepare_tasks(cfg: RunConfig) -> dict[str, PreparedTask]:
    """Load each task plugin and build its config; all bad options fail before any model loads."""
    out = {name: prepare_task(name, cfg.task_options.get(name, {})) for name in cfg.tasks}
    check_task_options(cfg)
    return out


def task_sources(p: PreparedTask) -> tuple[str, ...]:
    """The hub datasets (bench/sources.py) a task's config reads (its optional `sources`)."""
    return tuple(getattr(p.task, "sources", lambda _config: ())(p.config))


def check_answers(
    spec: ModelSpec, prepared: dict[str, PreparedTask], cls: type[Backend] | None = None
) -> None:
    """Refuse, before any model loads, a model whose backend cannot answer a request kind that
    one of the run's tasks sends (with the task's config: niah's attention mode sends one that
    its score mode does not)."""
    cls = cls or registry.backend_class(spec.backend)
    for name, p in prepared.items():
        if not spec.runs(name):
            continue
        for kind in request_kinds(p.task, p.config):
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
            {
                "label": m.label,
                "spec": m.spec,
                "options": dict(sorted(m.options.items())),
                **({"tasks": list(m.tasks)} if m.tasks else {}),  # runs before it had none
            }
            for m in cfg.models
        ],
        "seed": cfg.seed,
        "limit": cfg.limit,
    }


def _name_part(names: list[str]) -> str:
    """Names joined by `+`, at most NAME_ITEMS of them then `+Nmore`, in portable characters."""
    names = list(dict.fromkeys(names))
    shown = [re.sub(r"[^A-Za-z0-9_.=-]", "_", n)[:NAME_ITEM_MAX] for n in names[:NAME_ITEMS]]
    more = len(names) - len(shown)
    return "+".join(shown) + (f"+{more}more" if more else "")


def default_output(cfg: RunConfig, ident: dict[str, Any], suite: str | None = None) -> Path:
    """results/<suite or tasks>__<models>__<hash of the identity>: short, and the same command
    always lands in the same place (so rerunning it resumes)."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    # A sweep's variants (base@logit_bits=8) name their base model once; the hash tells sweeps
    # apart.
    labels = [(split_variant(m.label) or (m.label,))[0] for m in cfg.models]
    what = _name_part([suite]) if suite else _name_part(list(cfg.tasks))
    return RESULTS_DIR / f"{what}__{_name_part(labels)}__{digest}"


def resolve(cfg: RunConfig, suite: str | None = None, keep_going: bool = False) -> Plan:
    """The plan of `cfg`, refused (before any model loads) when the run cannot start; with
    `keep_going`, every problem is kept as one line of `Plan.problems` instead (a dry run) and
    what it concerns is left out of the plan."""
    problems: list[Problem] = []

    def attempt(task: str, model: str, check: Callable[[], T]) -> T | None:
        try:
            return check()
        except DiffbenchError as err:
            if not keep_going:
                raise
            problems.append(Problem(task, model, str(err)))
            return None

    if keep_going:
        prepared: dict[str, PreparedTask] = {}
        for name in cfg.tasks:
            one = attempt(name, "", partial(prepare_task, name, cfg.task_options.get(name, {})))
            if one is not None:
                prepared[name] = one
        attempt("", "", partial(check_task_options, cfg))
    else:
        prepared = prepare_tasks(cfg)
    for name, p in prepared.items():
        for source in task_sources(p):
            attempt(name, "", partial(_check_cached, source))
    models = []
    for spec in cfg.models:
        cls = attempt("", spec.label, partial(registry.backend_class, spec.backend))
        if cls is None or attempt("", spec.label, partial(_check, cls, spec)) is None:
            continue
        for name, p in prepared.items():
            attempt(name, spec.label, partial(check_answers, spec, {name: p}, cls))
        models.append(PlannedModel(spec, cls))
    ident = identity(cfg, prepared)
    output = cfg.output or default_output(cfg, ident, suite)
    return Plan(cfg, prepared, tuple(models), ident, output, tuple(problems))


def _check_cached(name: str) -> None:
    """Refuse, offline, a hub dataset that is not in the hub cache (one line: how to fetch it)."""
    from diffbench import sources

    source = sources.get(name)
    if sources.offline() and sources.cached(source) is None:
        raise DiffbenchError(
            f"dataset {name} is not in the hub cache {sources.cache_root()} and HF_HUB_OFFLINE "
            f"is set; prefetch it: {source.prefetch}"
        )


def _check(cls: type[Backend], spec: ModelSpec) -> bool:
    """`cls.check(spec)`, True when it passes (it raises otherwise)."""
    cls.check(spec)
    return True


def limited(items: list[Item], limit: int | None) -> list[Item]:
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


# ---- --dry-run: the plan described from tokenizers alone ----------------------------------------


@dataclass(frozen=True)
class TaskEstimate:
    """What one task asks of one model."""

    task: str
    model: str
    requests: int
    tokens: int  # prompt tokens, every request on its own
    tokens_shared: int  # prompt tokens to compute once requests sharing a prefix share it
    longest: int
    context: int


def _request_tokens(view: Any, request: Request) -> tuple[list[int], int]:
    """A request's prompt token ids (what prefix sharing may reuse) and the tokens it adds after
    them (its longest choice, its new tokens)."""
    if isinstance(request, ChoiceRequest):
        longest = max((view.count(c) for c in request.choices), default=0)
        return view.encode(request.prefix + request.query), longest
    if isinstance(request, ThroughputRequest):  # timed in full, never shared: dummy ids
        return [-1] * request.n_tokens, request.new_tokens
    if isinstance(request, GenerateRequest):
        return view.encode(request.prompt), request.max_new_tokens
    text = getattr(request, "prompt", None) or getattr(request, "text", "")
    return view.encode(str(text)), 0


def _trie_tokens(sequences: list[list[int]]) -> int:
    """Tokens to compute when sequences sharing a prefix compute it once (a prefix trie's size)."""
    total, previous = 0, list[int]()
    for seq in sorted(sequences):
        shared = 0
        for a, b in zip(previous, seq, strict=False):
            if a != b:
                break
            shared += 1
        total += len(seq) - shared
        previous = seq
    return total


def estimate(plan: Plan) -> tuple[list[TaskEstimate], list[Problem]]:
    """Each task's requests on each model, built from the model's tokenizer alone; and the
    problems that would stop the run (the plan's own, and a prompt beyond a model's context)."""
    rows: list[TaskEstimate] = []
    problems: list[Problem] = list(plan.problems)
    stopped = {(q.task, q.model) for q in problems}
    for pm in plan.models:
        try:
            view = pm.backend.tokenizer_only(pm.spec)
        except DiffbenchError as err:
            problems.append(Problem("", pm.spec.label, str(err)))
            continue
        for name, p in plan.tasks.items():
            label = pm.spec.label
            if not pm.spec.runs(name) or {(name, ""), (name, label)} & stopped:
                continue
            try:
                items = list(p.task.items(p.config, view, plan.config.seed))
            except DiffbenchError as err:
                problems.append(Problem(name, label, str(err)))
                continue
            items = limited(items, plan.config.limit)
            measured = [_request_tokens(view, it.request) for it in items]
            shared = [ids for ids, _ in measured if -1 not in ids[:1]]
            alone = sum(len(ids) for ids, _ in measured if -1 in ids[:1])
            longest = max((len(ids) + extra for ids, extra in measured), default=0)
            rows.append(
                TaskEstimate(
                    name, pm.spec.label, len(items), sum(len(ids) for ids, _ in measured),
                    _trie_tokens(shared) + alone, longest, view.max_context,
                )
            )  # fmt: skip
            if longest > view.max_context:
                problems.append(
                    Problem(
                        name, label, f"the longest prompt is {longest:,} tokens, beyond the "
                        f"model's {view.max_context:,}-token context",
                    )
                )  # fmt: skip
    return rows, problems


def dry_run(plan: Plan) -> int:
    """`diffbench run --dry-run`: print the plan and its estimates; 0 when the run can start,
    else 2 with one `diffbench: error:` line per problem."""
    rows, problems = estimate(plan)
    print(f"run directory: {plan.output}")
    print("models: " + ", ".join(f"{pm.spec.label}={pm.spec.spec}" for pm in plan.models))
    named = {s for p in plan.tasks.values() for s in task_sources(p)}
    if named:
        from diffbench import sources

        print("datasets: " + ", ".join(
            f"{n} ({'cached' if sources.cached(sources.get(n)) else 'to prefetch'})"
            for n in sorted(named)
        ))  # fmt: skip
    header = ("task", "model", "requests", "prompt tokens", "after prefix sharing", "longest")
    table = [header] + [
        (r.task, r.model, f"{r.requests:,}", f"{r.tokens:,}", f"{r.tokens_shared:,}",
         f"{r.longest:,} / {r.context:,}")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for line in problem_lines(problems):
        print(f"diffbench: error: {line}", file=sys.stderr)
    return 2 if problems else 0


def problem_lines(problems: list[Problem]) -> list[str]:
    """One line per problem, a problem shared by several models (a task that cannot load, a
    prompt too long for each) said once for all of them."""
    models: dict[tuple[str, str], list[str]] = {}
    for q in problems:
        models.setdefault((q.task, " ".join(q.message.split())), []).append(q.model)
    lines = []
    for (task, message), labels in models.items():
        named = ", ".join(m for m in dict.fromkeys(labels) if m)
        what = (
            f"{task} on {named}" if task and named else task or (f"model {named}" if named else "")
        )
        lines.append(f"{what}: {message}" if what else message)
    return lines
