"""Plugin discovery through entry points: tasks (`diffbench.tasks`), task families
(`diffbench.task_families`) and model backends (`diffbench.backends`). The built-ins register
there too; nothing is imported until asked for, and nothing here names a concrete plugin.

A task family answers every task name under its prefix, built on demand from the rest of the
name: the entry point `lm-eval` of `diffbench.task_families` makes `lm-eval:arc_easy` lm-eval's
task arc_easy. A third-party family registers the same way:

    [project.entry-points."diffbench.task_families"]
    my-suite = "my_package.suite:FAMILY"  # FAMILY = TaskFamily(task=..., installed=...)

and `--set my-suite.KEY=VALUE` (or `options: {my-suite: ...}` in YAML) then sets KEY of every
`my-suite:` task of a run.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from diffbench.api import Backend, Task
from diffbench.errors import DiffbenchError

GROUP = "diffbench.tasks"
FAMILIES = "diffbench.task_families"
BACKENDS = "diffbench.backends"
# How to install a backend that is not registered here, by its spec prefix.
BACKEND_EXTRAS = {"vllm": "diffbench[vllm]"}
# The family of lm-eval's tasks (`lm-eval:arc_easy`), and its shared-options group
# (`--set lm-eval.include_path=DIR`): names kept for callers; the registry treats every family
# alike.
LM_EVAL_GROUP = "lm-eval"
LM_EVAL_PREFIX = LM_EVAL_GROUP + ":"


@dataclass(frozen=True)
class TaskFamily:
    """Tasks named `PREFIX:NAME`, built on demand: what a `diffbench.task_families` entry point
    (named PREFIX) points at. The module defining it must import without the family's own
    libraries, so that `installed` can answer where they are missing."""

    # The task called NAME; an unknown NAME raises DiffbenchError with a message a user can act on.
    task: Callable[[str], Task]
    # Whether this family's tasks can load here (its libraries are installed), answered cheaply.
    installed: Callable[[], bool]


def available() -> dict[str, str]:
    """Registered task name -> entry-point target, without importing any task."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def families() -> dict[str, str]:
    """Registered task-family prefix -> entry-point target, without importing any family."""
    return {ep.name: ep.value for ep in entry_points(group=FAMILIES)}


def family_name(name: str) -> tuple[str, str] | None:
    """(family prefix, name within the family) of a task name `PREFIX:NAME` whose prefix is a
    registered family; None for any other name."""
    prefix, sep, rest = name.partition(":")
    return (prefix, rest) if sep and prefix in families() else None


def family(prefix: str) -> TaskFamily:
    """The task family registered under `prefix`."""
    eps: dict[str, EntryPoint] = {ep.name: ep for ep in entry_points(group=FAMILIES)}
    if prefix not in eps:
        raise DiffbenchError(f"unknown task family {prefix!r}; installed: {', '.join(eps)}")
    try:
        found = eps[prefix].load()
    except ImportError as err:
        raise DiffbenchError(f"task family {prefix!r} cannot be imported ({err})") from None
    if not isinstance(found, TaskFamily):
        raise DiffbenchError(
            f"entry point {prefix!r} ({eps[prefix].value}) is not a diffbench TaskFamily"
        )
    return found


# `TASK#INSTANCE` runs task TASK a second time under its own name, options and rows (a suite's
# `icl#trec` beside `icl#banking77`, `niah#4k` beside `niah#64k`).
INSTANCE = "#"


def instance_of(name: str) -> str:
    """The task an instance name `TASK#INSTANCE` runs (any other name: itself)."""
    base, sep, instance = name.partition(INSTANCE)
    if sep and not re.fullmatch(r"[A-Za-z0-9_.=+-]+", instance):
        raise DiffbenchError(
            f"malformed task instance {name!r}: TASK#INSTANCE, INSTANCE of letters, digits, . _ - ="
        )
    return base


def installed(name: str) -> bool:
    """Whether task `name` can be loaded here (`PREFIX:NAME`: whether its family's libraries are
    installed), without building it."""
    name = instance_of(name)
    split = family_name(name)
    if split is None:
        return name in available()
    try:
        return family(split[0]).installed()
    except DiffbenchError:
        return False


def load(name: str) -> Task:
    """The task registered under `name`; `PREFIX:NAME` is task NAME of the family `PREFIX`;
    `TASK#INSTANCE` is task TASK under that name."""
    base = instance_of(name)
    if base != name:
        task = copy.copy(load(base))
        object.__setattr__(task, "name", name)  # a frozen dataclass plugin too
        return task
    split = family_name(name)
    if split is not None:
        # No isinstance(…, Task) here: on Python 3.11 that reads every attribute, and a family's
        # task may derive its metrics from lm-eval's (or another library's) definitions.
        return family(split[0]).task(split[1])
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none (is diffbench installed?)"
        prefixes = ", ".join(f"{p}:NAME" for p in sorted(families()))
        more = f"; task families: {prefixes}" if prefixes else ""
        raise DiffbenchError(f"unknown task {name!r}; available tasks: {known}{more}")
    task = eps[name].load()
    if not isinstance(task, Task):
        raise DiffbenchError(f"entry point {name!r} ({eps[name].value}) is not a diffbench Task")
    return task


def family_tasks(tasks: list[str]) -> dict[str, list[str]]:
    """Family prefix -> the tasks of `tasks` in that family (families with none left out)."""
    out: dict[str, list[str]] = {}
    for t in tasks:
        split = family_name(t)
        if split is not None:
            out.setdefault(split[0], []).append(t)
    return out


def expand_sets(items: list[str], tasks: list[str]) -> list[str]:
    """`--set PREFIX.KEY=VALUE` (a family's prefix: `lm-eval.include_path=DIR`) as one `--set`
    per task of that family in the run (others unchanged)."""
    members = family_tasks(tasks)
    out = []
    for item in items:
        head, dot, rest = item.partition(".")
        if dot and head.strip() in members:
            out += [f"{t}.{rest}" for t in members[head.strip()]]
        else:
            out.append(item)
    return out


def expand_options(
    options: dict[str, dict[str, Any]], tasks: list[str]
) -> dict[str, dict[str, Any]]:
    """Task options with a family's entry (`lm-eval: {...}`) copied under each task of that
    family in the run (a task's own entry wins)."""
    members = {p: ts for p, ts in family_tasks(tasks).items() if p in options}
    if not members:
        return options
    out = {k: dict(v) for k, v in options.items() if k not in members}
    for prefix, ts in members.items():
        for t in ts:
            out[t] = {**options[prefix], **out.get(t, {})}
    return out


def backends() -> dict[str, str]:
    """Registered backend name -> entry-point target, without importing any backend."""
    return {ep.name: ep.value for ep in entry_points(group=BACKENDS)}


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under `name` (a model spec's prefix: hf, vllm, ...): a
    subclass of `api.Backend` (a plugin class that only has its methods works as well)."""
    eps = {ep.name: ep for ep in entry_points(group=BACKENDS)}
    extra = BACKEND_EXTRAS.get(name)
    if name not in eps:
        if extra:
            raise DiffbenchError(
                f"backend {name!r} is not installed in this environment; the {extra} extra "
                "provides it"
            )
        known = ", ".join(sorted(eps)) or "none (is diffbench installed?)"
        raise DiffbenchError(f"unknown backend {name!r}; installed backends: {known}")
    try:
        cls: type[Backend] = eps[name].load()
    except ImportError as err:
        how = f"; the {extra} extra provides what it needs" if extra else ""
        raise DiffbenchError(f"backend {name!r} cannot be imported ({err}){how}") from None
    return cls
