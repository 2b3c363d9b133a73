"""NIAH figures from metrics rows: the paper's depth x length heatmap and bars per N/R."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from diffbench.api import ALL
from diffbench.figures import model_colors, new_figure, save
from matplotlib.figure import Figure


def figures(metrics: pd.DataFrame) -> dict[str, Figure]:
    """Every NIAH figure by file stem: a heatmap per mode and N/R, bars per mode."""
    rows = metrics[(metrics["task"] == "niah") & (metrics["metric"] == "accuracy")].copy()
    out: dict[str, Figure] = {}
    rows["length"] = rows["length"].astype(int)
    for (mode, n, r), grid in rows.groupby(["mode", "needles", "queries"], sort=True):
        out[f"niah_heatmap_{mode!s}_n{n!s}r{r!s}"] = heatmap(grid, f"N={n!s}, R={r!s}, {mode!s}")
    for mode, grid in rows[rows["depth"] == ALL].groupby("mode", sort=True):
        out[f"niah_bars_{mode!s}"] = bars(grid, str(mode))
    attn = metrics[(metrics["task"] == "niah") & metrics["metric"].isin(ALLOCATION)]
    for (length, n, r), grid in attn.groupby(["length", "needles", "queries"], sort=True):
        size = int(float(str(length)))
        out[f"niah_attention_L{size}_n{n!s}r{r!s}"] = allocation(
            grid, f"{_k(size)}, N={n!s}, R={r!s}"
        )
    return out


ALLOCATION = ("attention_answer", "attention_noise")


def allocation(rows: pd.DataFrame, title: str) -> Figure:
    """The paper's Table 3 as a figure: attention on the answer and on the noise per depth."""
    models = sorted(rows["model"].unique())
    colors = model_colors(models)
    depths = sorted((d for d in rows["depth"].unique() if d != ALL), key=_depth_key)
    fig = new_figure(ncols=2)
    axes = fig.subplots(1, 2, squeeze=False, sharey=True)[0]
    for ax, metric in zip(axes, ALLOCATION, strict=True):
        for model in models:
            sub = rows[(rows["model"] == model) & (rows["metric"] == metric)].set_index("depth")
            vals = [float(sub["value"].get(d, np.nan)) for d in depths]
            errs = np.nan_to_num([float(sub["stderr"].get(d, np.nan)) for d in depths])
            ax.errorbar(range(len(depths)), vals, yerr=errs, marker="o", ms=3, capsize=2,
                        color=colors[model], label=model)  # fmt: skip
        ax.set_xticks(range(len(depths)), [f"{float(d):g}%" for d in depths])
        ax.set_xlabel("answer needle depth")
        ax.set_title(metric.removeprefix("attention_"))
    axes[0].set_ylabel("attention mass (mean over heads, layers)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Attention allocation ({title})", y=1.02)
    return fig


def draw(metrics: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every NIAH figure as PNG and PDF; return the files written."""
    return [p for stem, fig in figures(metrics).items() for p in save(fig, out_dir, stem)]


def _depth_key(d: str) -> float:
    return float("inf") if d == ALL else float(d)


def heatmap(rows: pd.DataFrame, title: str) -> Figure:
    """Depth on y, length on x, the mean over depths as the bottom row; a panel per model, the
    panels sharing their axes and colour scale."""
    models = sorted(rows["model"].unique())
    lengths = sorted(rows["length"].unique())
    depths = sorted((d for d in rows["depth"].unique() if d != ALL), key=_depth_key)
    fig = new_figure(ncols=len(models), width=0.55 * len(lengths) + 2.2, height=2.9)
    axes = fig.subplots(1, len(models), squeeze=False, sharex=True, sharey=True)[0]
    image = None
    for k, (ax, model) in enumerate(zip(axes, models, strict=True)):
        sub = rows[rows["model"] == model]
        grid = np.full((len(depths) + 1, len(lengths)), np.nan)
        for i, d in enumerate([*depths, ALL]):
            for j, length in enumerate(lengths):
                v = sub[(sub["depth"] == d) & (sub["length"] == length)]["value"]
                if len(v):
                    grid[i, j] = float(v.iloc[0])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.axhline(len(depths) - 0.5, color="black", lw=1.2)
        ax.set_xticks(range(len(lengths)), [_k(x) for x in lengths])
        ticks = [f"{float(d):g}%" for d in depths] + ["mean"]
        ax.set_yticks(range(len(depths) + 1), ticks)  # shared: inner panels hide the labels
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("answer needle depth")
        ax.set_title(model)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.85, label="accuracy")
    fig.suptitle(f"Needle in a haystack ({title})", y=1.02)
    return fig


def bars(rows: pd.DataFrame, mode: str) -> Figure:
    """Accuracy averaged over depths, grouped by N/R (and length), one bar per model."""
    rows = rows.assign(
        group=[
            f"{n}/{r}" + (f"\n{_k(length)}" if rows["length"].nunique() > 1 else "")
            for n, r, length in zip(rows["needles"], rows["queries"], rows["length"], strict=True)
        ]
    )
    groups = list(dict.fromkeys(rows.sort_values(["needles", "queries", "length"])["group"]))
    models = sorted(rows["model"].unique())
    colors = model_colors(models)
    fig = new_figure(width=max(3.4, 0.5 * len(groups) * len(models) + 1.5))
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for k, model in enumerate(models):
        sub = rows[rows["model"] == model].set_index("group")
        vals = [float(sub["value"].get(g, np.nan)) for g in groups]
        errs = [float(sub["stderr"].get(g, np.nan)) for g in groups]
        xs = np.arange(len(groups)) + (k - (len(models) - 1) / 2) * width
        ax.bar(
            xs, vals, width, yerr=np.nan_to_num(errs), color=colors[model], label=model, capsize=2
        )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("needles N / queried R")
    ax.set_ylabel("accuracy (mean over depths)")
    ax.set_title(f"Multi-needle retrieval ({mode})")
    ax.legend()
    return fig


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)
