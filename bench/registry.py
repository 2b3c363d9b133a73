"""Task discovery through the `diffbench.tasks` entry-point group; built-ins register there too."""

from __future__ import annotations

from importlib.metadata import entry_points

from diffbench.api import Task
from diffbench.errors import DiffbenchError

GROUP = "diffbench.tasks"


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
