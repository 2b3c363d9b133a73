"""Plugin discovery through entry points: tasks (`diffbench.tasks`) and model backends
(`diffbench.backends`). The built-ins register there too; nothing is imported until asked for."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from diffbench.api import Task
from diffbench.errors import DiffbenchError

GROUP = "diffbench.tasks"
BACKENDS = "diffbench.backends"
# How to install a backend that is not registered here, by its spec prefix.
BACKEND_EXTRAS = {"vllm": "diffbench[vllm]"}


def available() -> dict[str, str]:
    """Registered task name -> entry-point target, without importing any task."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load(name: str) -> Task:
    """The task registered under `name`."""
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none (is diffbench installed?)"
        raise DiffbenchError(f"unknown task {name!r}; available tasks: {known}")
    task = eps[name].load()
    if not isinstance(task, Task):
        raise DiffbenchError(f"entry point {name!r} ({eps[name].value}) is not a diffbench Task")
    return task


def backends() -> dict[str, str]:
    """Registered backend name -> entry-point target, without importing any backend."""
    return {ep.name: ep.value for ep in entry_points(group=BACKENDS)}


def backend_class(name: str) -> Any:
    """The backend class registered under `name` (a model spec's prefix: hf, vllm, ...)."""
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
        return eps[name].load()
    except ImportError as err:
        how = f"; the {extra} extra provides what it needs" if extra else ""
        raise DiffbenchError(f"backend {name!r} cannot be imported ({err}){how}") from None
