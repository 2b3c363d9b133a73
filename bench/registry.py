"""Plugin discovery through entry points: tasks (`diffbench.tasks`) and model backends
(`diffbench.backends`). The built-ins register there too; nothing is imported until asked for."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from diffbench.api import Backend, Task
from diffbench.errors import DiffbenchError

GROUP = "diffbench.tasks"
BACKENDS = "diffbench.backends"
# How to install a backend that is not registered here, by its spec prefix.
BACKEND_EXTRAS = {"vllm": "diffbench[vllm]"}


def available() -> dict[str, str]:
    """Registered task name -> entry-point target, without importing any task."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


# Task names under this prefix are lm-eval tasks or groups (`lm-eval:arc_easy`), built on demand.
LM_EVAL_PREFIX = "lm-eval:"
# `--set lm-eval.KEY=VALUE` (or `options: {lm-eval: ...}` in YAML) sets KEY of every lm-eval task.
LM_EVAL_GROUP = "lm-eval"


def installed(name: str) -> bool:
    """Whether task `name` can be loaded here (`lm-eval:NAME`: whether lm-eval is installed),
    without importing it."""
    if name.startswith(LM_EVAL_PREFIX):
        import importlib.util

        return importlib.util.find_spec("lm_eval") is not None
    return name in available()


def load(name: str) -> Task:
    """The task registered under `name`; `lm-eval:NAME` is lm-eval's task or group NAME."""
    if name.startswith(LM_EVAL_PREFIX):
        from diffbench.tasks.lm_eval_tasks import task_for

        return task_for(name[len(LM_EVAL_PREFIX) :])
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none (is diffbench installed?)"
        raise DiffbenchError(f"unknown task {name!r}; available tasks: {known}")
    task = eps[name].load()
    if not isinstance(task, Task):
        raise DiffbenchError(f"entry point {name!r} ({eps[name].value}) is not a diffbench Task")
    return task


def expand_sets(items: list[str], tasks: list[str]) -> list[str]:
    """`--set lm-eval.KEY=VALUE` as one `--set` per lm-eval task of the run (others unchanged)."""
    lm_tasks = [t for t in tasks if t.startswith(LM_EVAL_PREFIX)]
    out = []
    for item in items:
        head, dot, rest = item.partition(".")
        if dot and head.strip() == LM_EVAL_GROUP and lm_tasks:
            out += [f"{t}.{rest}" for t in lm_tasks]
        else:
            out.append(item)
    return out


def expand_options(
    options: dict[str, dict[str, Any]], tasks: list[str]
) -> dict[str, dict[str, Any]]:
    """Task options with an `lm-eval` entry copied under each lm-eval task of the run (a task's
    own entry wins)."""
    shared = options.get(LM_EVAL_GROUP)
    lm_tasks = [t for t in tasks if t.startswith(LM_EVAL_PREFIX)]
    if shared is None or not lm_tasks:
        return options
    out = {k: dict(v) for k, v in options.items() if k != LM_EVAL_GROUP}
    for t in lm_tasks:
        out[t] = {**shared, **out.get(t, {})}
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
