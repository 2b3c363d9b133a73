"""report.md from a run directory: per task, the models side by side with their differences."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from diffbench import registry
from diffbench.errors import DiffbenchError
from diffbench.store import METRIC_COLUMNS, RunStore, natural_key, write_atomic

SUMMARY_VALUE = "all"


def _fmt(v: float) -> str:
    return "" if pd.isna(v) else f"{v:.3f}"


def _table(rows: pd.DataFrame, models: list[str], settings: list[str]) -> str:
    """A Markdown table: settings, one column per model, then each model minus the first."""
    rows = rows.sort_values([*settings, "metric"], key=natural_key, kind="stable")
    wide = rows.pivot_table(
        index=[*settings, "metric"], columns="model", values="value", aggfunc="first", sort=False
    )
    present = [m for m in models if m in wide.columns]
    head = [*settings, "metric", *present]
    deltas = [(m, present[0]) for m in present[1:]]
    head += [f"{m} − {ref}" for m, ref in deltas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in wide.iterrows():
        cells = [str(k) for k in (key if isinstance(key, tuple) else (key,))]
        cells += [_fmt(row[m]) for m in present]
        cells += [
            _fmt(row[m] - row[ref]) if not pd.isna(row[m] - row[ref]) else "" for m, ref in deltas
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(store: RunStore) -> str:
    """The Markdown report of one run."""
    run = store.read_run()
    metrics = store.metrics()
    models = [m["label"] for m in run["config"]["models"]]
    out = ["# diffbench report", ""]
    out.append(
        f"Run `{store.root.name}`, seed {run['config']['seed']}, started {run.get('started', '?')}."
    )
    out.append("")
    out.append("| model | spec | architecture | parameters | dtype | max context |")
    out.append("|---|---|---|---|---|---|")
    for label in models:
        info = run.get("models", {}).get(label, {})
        out.append(
            f"| {label} | `{info.get('spec', '?')}` | {info.get('architecture', '?')} | "
            f"{info.get('n_parameters', 0):,} | {info.get('dtype', '?')} | "
            f"{info.get('max_context', '?')} |"
        )
    for task in sorted(metrics["task"].unique()):
        rows = metrics[metrics["task"] == task]
        settings = [c for c in rows.columns if c not in METRIC_COLUMNS and (rows[c] != "").any()]
        out += ["", f"## {task}", ""]
        try:
            out.append(registry.load(task).description)
            out.append("")
        except DiffbenchError:
            pass
        summary_cols = [c for c in settings if (rows[c] == SUMMARY_VALUE).any()]
        if summary_cols:
            summary = rows[(rows[summary_cols] == SUMMARY_VALUE).all(axis=1)]
            keep = [c for c in settings if c not in summary_cols]
            out.append(f"Averaged over {', '.join(summary_cols)}:")
            out.append("")
            out.append(_table(summary, models, keep))
            detail = rows[(rows[summary_cols] != SUMMARY_VALUE).all(axis=1)]
            out += ["", "<details><summary>Every setting</summary>", ""]
            out.append(_table(detail, models, settings))
            out += ["", "</details>"]
        else:
            out.append(_table(rows, models, settings))
        figures = sorted(store.figures_dir.glob(f"{task}_*.png"))
        if figures:
            out.append("")
            out += [f"![{f.stem}](figures/{f.name})" for f in figures]
    out += ["", "## Provenance", ""]
    versions = run.get("versions", {})
    out.append(", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    if run.get("git_revision"):
        out.append(f"\ndiffbench revision `{run['git_revision']}`.")
    return "\n".join(out) + "\n"


def write(run_dir: Path) -> Path:
    """Write report.md into a run directory; return its path."""
    store = RunStore.open_existing(run_dir)
    path = run_dir / "report.md"
    write_atomic(path, render(store))
    return path


def plot(run_dir: Path) -> list[Path]:
    """Draw every task's figures from the store; return the files written."""
    store = RunStore.open_existing(run_dir)
    metrics = store.metrics()
    paths: list[Path] = []
    for task_name in sorted(metrics["task"].unique()):
        task = registry.load(task_name)
        paths += task.figures(metrics, store.samples(task_name), store.figures_dir)
    return paths
