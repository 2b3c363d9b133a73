"""One paper style for every figure: serif font, a fixed colour per model, PNG and PDF; and the
figures every report gets whatever its tasks declare: each metric against a swept option, and
each model's differences from the reference. A task's declared figures are
`diffbench.render.figures`'."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PALETTE = ("#1f4e9c", "#c0392b", "#2e8b57", "#8e44ad", "#d68910", "#566573")
STYLE: dict[str, Any] = {
    "font.family": "serif",
    "font.serif": ["DejaVu Serif", "Times New Roman", "Times"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "figure.dpi": 120,
    "savefig.dpi": 160,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}


def model_colors(models: Iterable[str]) -> dict[str, str]:
    """A colour per model label, stable for a given sorted set of labels."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(sorted(set(models)))}


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 3.4, height: float = 2.8) -> Figure:
    """A figure of `ncols` x `nrows` panels in the paper style."""
    plt.style.use(STYLE)
    fig = plt.figure(figsize=(width * ncols, height * nrows))
    return fig


def integer_ticks(ax: Axes, axis: str = "x") -> None:
    """Ticks at whole numbers only: seeds, draws and orders are counted, not measured."""
    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))


def _order(text: str) -> tuple[bool, float, str]:
    """Sort key of setting and option values: numbers by value, before other text."""
    try:
        return (False, float(text), text)
    except ValueError:
        return (True, 0.0, text)


def sweep_figures(task: str, metrics: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Each metric against a swept backend option (`run --sweep`: models labelled
    LABEL@KEY=VALUE), one line per base model, as the paper's Figure 8 draws accuracy against
    logit bits. Drawn from the labels alone, so any task gets it, plugin or not: per swept key
    and metric one figure, with a panel per setting among the rows averaged over the most
    settings (at most 12 panels)."""
    from diffbench.api import METRIC_COLUMNS, WILDCARDS
    from diffbench.config import split_variant

    rows = metrics[metrics["task"] == task]
    variants = {m: split_variant(str(m)) for m in rows["model"].unique()}
    keys = sorted({v[1] for v in variants.values() if v is not None})
    paths: list[Path] = []
    for key in keys:
        chosen = {m: v for m, v in variants.items() if v is not None and v[1] == key}
        sub = rows[rows["model"].isin(list(chosen))].copy()
        sub["base"] = [chosen[m][0] for m in sub["model"]]
        sub["swept"] = [chosen[m][2] for m in sub["model"]]
        values = sorted(set(sub["swept"]), key=_order)
        position = {v: i for i, v in enumerate(values)}
        settings = [c for c in rows.columns if c not in (*METRIC_COLUMNS, "base", "swept")]
        for metric, mrows in sub.groupby("metric", sort=True):
            text = mrows[settings].fillna("").astype(str)
            used = [c for c in settings if (text[c] != "").any()]
            wild = text[used].isin(WILDCARDS).sum(axis=1)
            mrows, text = mrows[wild == wild.max()], text[wild == wild.max()]
            varying = [c for c in used if not text[c].isin(WILDCARDS).all()]
            panel_of = [tuple(r) for r in text[varying].itertuples(index=False)]
            panels = sorted(set(panel_of), key=lambda t: [_order(v) for v in t])[:12]
            colors = model_colors(mrows["base"])
            fig = new_figure(ncols=len(panels))
            axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
            for ax, panel in zip(axes, panels, strict=True):
                in_panel = mrows[[p == panel for p in panel_of]]
                for base, line in in_panel.groupby("base", sort=True):
                    line = line.assign(x=line["swept"].map(position)).sort_values("x")
                    err = pd.to_numeric(line["stderr"], errors="coerce").fillna(0)
                    ax.errorbar(
                        line["x"], pd.to_numeric(line["value"]), yerr=err, marker="o", ms=3,
                        capsize=2, color=colors[str(base)], label=str(base),
                    )  # fmt: skip
                ax.set_xticks(range(len(values)), values)
                ax.set_xlabel(key)
                ax.set_title(", ".join(f"{c}={v}" for c, v in zip(varying, panel, strict=True)))
                ax.legend(fontsize=7)
            axes[0].set_ylabel(metric)
            fig.suptitle(f"{task}: {metric} vs {key}", y=1.02)
            paths += save(fig, out_dir, f"{task}_sweep_{key}_{metric}")
    return paths


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write `stem`.png and `stem`.pdf; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.=+-]", "_", stem)  # portable names (lm-eval:NAME, LABEL@K=V)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    plt.close(fig)
    return paths


def differences(
    labels: list[str],
    series: dict[str, list[tuple[float, float, float]]],
    reference: str,
    out_dir: Path,
    stem: str,
    colors: dict[str, str] | None = None,
) -> list[Path]:
    """A forest plot: per row label, each model's (delta, low, high) against `reference`."""
    colors = colors or model_colors([reference, *series])
    fig = new_figure(width=5.6, height=0.32 * len(labels) * max(1, len(series)) + 1.2)
    ax = fig.add_subplot()
    step = 0.7 / max(1, len(series))
    for k, (model, points) in enumerate(series.items()):
        ys = [len(labels) - 1 - i + (k - (len(series) - 1) / 2) * step for i in range(len(labels))]
        for y, (_, low, high) in zip(ys, points, strict=True):
            if math.isfinite(low) and math.isfinite(high):
                ax.plot([low, high], [y, y], color=colors[model], lw=1.4, solid_capstyle="butt")
        ax.plot(
            [p[0] for p in points],
            ys,
            "o",
            color=colors[model],
            ms=4,
            label=f"{model} − {reference}",
        )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), list(reversed(labels)))
    ax.set_xlabel(f"difference from {reference} (95% CI)")
    ax.set_title("Differences between models")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save(fig, out_dir, stem)
