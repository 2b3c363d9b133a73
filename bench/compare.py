"""The names `diffbench compare` used before the split, kept while bench/cli.py still imports them:
run loading lives in `diffbench.results`, the gate in `diffbench.gate`, its output in
`diffbench.render.gate`."""

from __future__ import annotations

from diffbench.gate import compare_models, compare_runs, parse_map, parse_tolerance
from diffbench.render.gate import RENDERERS
from diffbench.results import list_runs

__all__ = [
    "RENDERERS",
    "compare_models",
    "compare_runs",
    "list_runs",
    "parse_map",
    "parse_tolerance",
]
