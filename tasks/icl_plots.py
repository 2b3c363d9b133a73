"""ICL figures from metrics rows: accuracy vs demonstrations, and accuracy per order seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from diffbench.api import ALL
from diffbench.figures import integer_ticks, model_colors, new_figure, save
from matplotlib.figure import Figure


def figures(metrics: pd.DataFrame) -> dict[str, Figure]:
    """Every ICL figure by file stem: per dataset and arrangement, accuracy against shots and
    accuracy per seed."""
    rows = metrics[metrics["task"] == "icl"].copy()
    out: dict[str, Figure] = {}
    if rows.empty:
        return out
    rows["shots"] = rows["shots"].astype(int)
    for (dataset, arrangement), grid in rows.groupby(["dataset", "arrangement"], sort=True):
        name = Path(str(dataset)).stem
        title = f"{name}, {arrangement!s} order"
        out[f"icl_shots_{name}_{arrangement!s}"] = shots_curve(grid, title)
        seeds = per_seed(grid, title)
        if seeds is not None:
            out[f"icl_seeds_{name}_{arrangement!s}"] = seeds
    return out


def draw(metrics: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every ICL figure as PNG and PDF; return the files written."""
    return [p for stem, fig in figures(metrics).items() for p in save(fig, out_dir, stem)]


def shots_curve(rows: pd.DataFrame, title: str) -> Figure:
    """Accuracy vs number of demonstrations (log x), one curve per model, min-max shaded."""
    summary = rows[(rows["draw"] == ALL) & (rows["order"] == ALL)]
    fig = new_figure()
    ax = fig.add_subplot()
    colors = model_colors(summary["model"])
    for model, sub in summary.groupby("model", sort=True):
        wide = sub.pivot_table(index="shots", columns="metric", values="value", sort=True)
        color = colors[str(model)]
        ax.plot(wide.index, wide["accuracy"], marker="o", ms=3, color=color, label=str(model))
        ax.fill_between(wide.index, wide["accuracy_min"], wide["accuracy_max"], color=color,
                        alpha=0.18, lw=0)  # fmt: skip
    ax.set_xscale("log", base=2)
    shots = sorted(summary["shots"].unique())
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("number of demonstrations")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    return fig


def per_seed(rows: pd.DataFrame, title: str) -> Figure | None:
    """Accuracy of each prompt (draw x order seed) at the largest shot count, best and worst
    dashed and the margin written on the panel; one panel per model, on one shared y scale
    (paper Fig. 7)."""
    runs = rows[(rows["draw"] != ALL) & (rows["metric"] == "accuracy")]
    runs = runs[runs["shots"] == runs["shots"].max()]
    models = sorted(runs["model"].unique())
    if not models:
        return None
    colors = model_colors(models)
    fig = new_figure(ncols=len(models), width=3.0)
    axes = fig.subplots(1, len(models), squeeze=False, sharey=True)[0]
    for ax, model in zip(axes, models, strict=True):
        sub = runs[runs["model"] == model].sort_values(["draw", "order"], key=_as_int)
        acc = sub["value"].to_numpy(dtype=float)
        ax.plot(np.arange(len(acc)), acc, marker="o", ms=3, color=colors[model])
        best, worst = float(acc.max()), float(acc.min())
        for y in (best, worst):
            ax.axhline(y, ls="--", lw=0.8, color="grey")
        ax.text(0.98, 0.04, f"margin {100 * (best - worst):.1f} pts", transform=ax.transAxes,
                ha="right", va="bottom")  # fmt: skip
        integer_ticks(ax)
        ax.set_xlabel("seed (draw x order)")
        ax.set_title(f"{model}, {int(sub['shots'].iloc[0])} shots")
    axes[0].set_ylabel("accuracy")
    fig.suptitle(title, y=1.03)
    return fig


def _as_int(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce")
