"""Reading user-supplied JSON Lines files (datasets, outputs to judge) with one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffbench.errors import DiffbenchError


def read_objects(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of `path`; `what` names the file in errors."""
    if not path.is_file():
        raise DiffbenchError(f"{what} {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DiffbenchError(f"{path}: line {n} is not valid JSON") from None
            if not isinstance(row, dict):
                raise DiffbenchError(f"{path}: line {n} is not a JSON object")
            yield n, row
