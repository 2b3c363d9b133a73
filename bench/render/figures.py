"""Every task figure, drawn from metrics.csv rows and the figure specs run.json records
(`TaskInfo.figures`): no task plugin is imported. One function per kind of `FigureSpec`; the
paper style, the model colours and the sweep figure are `diffbench.figures`'.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from diffbench.api import (
    ALL,
    LARGEST,
    METRIC_COLUMNS,
    WILDCARDS,
    FigureSpec,
    TaskInfo,
    setting_text,
)
from diffbench.figures import integer_ticks, model_colors, new_figure, save, sweep_figures
from diffbench.store import natural_key
from matplotlib.axes import Axes
from matplotlib.figure import Figure

log = logging.getLogger("diffbench")

Z95 = 1.96  # a row's 95% interval: value +- Z95 * stderr
LINE_STYLES = ("--", ":", "-.")  # a line per value of a spec's `style`; its wildcard: solid
CMAPS = {"higher": "RdYlGn", "lower": "RdYlGn_r", "none": "viridis"}  # green is better


def task_figures(info: TaskInfo, metrics: pd.DataFrame, out_dir: Path) -> list[Path]:
    """A task's declared figures and its sweep figures as PNG and PDF; the files written. A run
    that records no figure specs for the task (an older run): its sweep figures only, with a
    warning."""
    if info.figures is None:
        log.warning(
            "no figures of task %r: its run.json records no figure specs (a run written before "
            "tasks declared their figures, or a plugin that draws its own); its tables are "
            "complete",
            info.name,
        )
        drawn: dict[str, Figure] = {}
    else:
        drawn = figures(info, metrics)
    paths = [p for stem, fig in drawn.items() for p in save(fig, out_dir, stem)]
    return [*paths, *sweep_figures(info.name, metrics, out_dir)]


def figures(info: TaskInfo, metrics: pd.DataFrame) -> dict[str, Figure]:
    """Every figure a task declares, by file stem (`<task>_<stem>`), from its rows of `metrics`."""
    rows = metrics[metrics["task"] == info.name]
    colors = model_colors(rows["model"].astype(str))
    out: dict[str, Figure] = {}
    for spec in info.figures or ():
        for stem, title, grid in _split(info.name, spec, rows):
            out[stem] = KINDS[spec.kind](spec, info, grid, colors, title)
    return out


# ---- choosing a figure's rows --------------------------------------------------------------


class _Value(str):
    """A setting value in a stem or title template: `{key}`, or `{key.stem}` for a file name."""

    __slots__ = ()

    @property
    def stem(self) -> str:
        return PurePosixPath(self).stem


class _Values(dict[str, _Value]):
    def __missing__(self, key: str) -> _Value:
        return _Value("")


def _ordered(values: Sequence[str] | pd.Series) -> list[str]:
    """Distinct setting values in natural order (numbers as numbers, before text), wildcards
    left out."""
    real = {str(v) for v in values if str(v) not in WILDCARDS}
    numbers = {v: _number(v) for v in real}
    return sorted(real, key=lambda v: (numbers[v] is None, numbers[v] or 0.0, v))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _settings(rows: pd.DataFrame) -> list[str]:
    """The setting columns the rows use."""
    return [c for c in rows.columns if c not in METRIC_COLUMNS and (rows[c] != "").any()]


def _split(task: str, spec: FigureSpec, rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(file stem, title, rows) of each figure of a spec: its metrics' rows matching `where`,
    one figure per combination of the `per` settings (and of any other setting that varies)."""
    rows = rows[rows["metric"].isin([*spec.metrics, *spec.shade])]
    rows = rows.fillna({c: "" for c in rows.columns if c not in METRIC_COLUMNS})
    for key, value in spec.where.items():
        if value != LARGEST:
            column = rows[key].astype(str) if key in rows else pd.Series("", index=rows.index)
            rows = rows[column == setting_text(value)]
    if rows.empty:
        return []
    placed = {*spec.x, spec.y, spec.panels, spec.style, *spec.per, *spec.where}
    extra = [c for c in _settings(rows) if c not in placed and rows[c].nunique() > 1]
    per = [k for k in (*spec.per, *extra) if k in rows]
    out = []
    combos = rows[per].drop_duplicates() if per else pd.DataFrame(index=[0])
    combos = combos.sort_values(per, key=natural_key) if per else combos
    for combo in combos.itertuples(index=False):
        grid = rows
        for key, value in zip(per, combo, strict=True):
            grid = grid[grid[key] == value]
        for key in (k for k, v in spec.where.items() if v == LARGEST and k in grid):
            top = _ordered(grid[key])
            grid = grid[grid[key] == top[-1]] if top else grid
        values = _Values(
            {c: _Value(grid[c].iloc[0]) for c in _settings(grid) if grid[c].nunique() == 1}
        )
        values["task"] = _Value(task)
        stem = spec.stem.format_map(values)
        title = (spec.title or f"{task}: {', '.join(spec.metrics)}").format_map(values)
        for key, value in zip(per, combo, strict=True):
            if key not in spec.per:  # a setting the spec does not place
                stem, title = f"{stem}_{key}={value}", f"{title}, {key}={value}"
        out.append((f"{task}_{stem}", title, grid))
    return out


def _panels(spec: FigureSpec, rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(metric, panel title, rows) per panel of a line or bars figure."""
    if len(spec.metrics) > 1:
        return [(m, m, rows[rows["metric"] == m]) for m in spec.metrics]
    metric = spec.metrics[0]
    if not spec.panels or spec.panels not in rows:
        return [(metric, "", rows)]
    return [(metric, v, rows[rows[spec.panels] == v]) for v in _ordered(rows[spec.panels])]


def _numbers(values: Sequence[str]) -> list[float] | None:
    """The values as numbers, or None where one is not a number."""
    numbers = [_number(v) for v in values]
    return None if None in numbers else [n for n in numbers if n is not None]


def _interval(rows: pd.DataFrame) -> np.ndarray:
    """Each row's 95% half-width from its stderr (0 where it has none)."""
    return Z95 * np.nan_to_num(pd.to_numeric(rows["stderr"], errors="coerce").to_numpy(float))


def _values(rows: pd.DataFrame) -> np.ndarray:
    return pd.to_numeric(rows["value"], errors="coerce").to_numpy(float)


def _combos(spec: FigureSpec, rows: pd.DataFrame) -> tuple[pd.Series, list[str], str]:
    """For a bars or spread figure: each row's label (the values of the `x` settings that vary
    among the rows, joined with "/"; of all of them where none varies), the labels in natural
    order, and the axis label. Rows with a wildcard in an `x` setting: label ""."""
    keys = [k for k in spec.x if k in rows]
    shown = [k for k in keys if rows[k].nunique() > 1] or keys
    real = ~rows[keys].isin(WILDCARDS).any(axis=1)
    label = rows[shown].astype(str).agg("/".join, axis=1).where(real, "")
    ordered = rows[real].sort_values(keys, key=natural_key)
    labels = list(dict.fromkeys(label[ordered.index]))
    return label, labels, spec.x_label or " / ".join(shown)


def _value_label(spec: FigureSpec, metric: str) -> str:
    return spec.y_label or metric


# ---- the kinds -----------------------------------------------------------------------------


def line(
    spec: FigureSpec, info: TaskInfo, rows: pd.DataFrame, colors: dict[str, str], title: str
) -> Figure:
    """Each model's value against the `x` setting, a line per model (and `style` value), a panel
    per `panels` value or per metric."""
    key = spec.x[0]
    rows = rows[~rows[key].isin(WILDCARDS)] if key in rows else rows.iloc[:0]
    ticks = _ordered(rows[key]) if key in rows else []
    numbers = _numbers(ticks)
    position = dict(zip(ticks, numbers or range(len(ticks)), strict=True))
    styles = _ordered(rows[spec.style]) if spec.style in rows else []
    dash = {v: LINE_STYLES[i % len(LINE_STYLES)] for i, v in enumerate(styles)}
    panels = _panels(spec, rows[rows["metric"].isin(spec.metrics)])
    fig = new_figure(ncols=len(panels))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=spec.share_y)[0]
    for ax, (metric, panel, sub) in zip(axes, panels, strict=True):
        series = ["model", spec.style] if spec.style in sub else ["model"]
        for names, group in sub.groupby(series, sort=True):
            model, variant = (names, "") if len(series) == 1 else names
            model = str(model[0] if isinstance(model, tuple) else model)
            group = group.assign(x=group[key].map(position)).sort_values("x")
            y, err = _values(group), _interval(group)
            color, label = colors[model], model
            if variant not in WILDCARDS:
                label = f"{model} ({spec.style} {variant})"
            style = dash.get(str(variant), "-")
            if spec.errors == "bars" and err.any():
                ax.errorbar(group["x"], y, yerr=err, ls=style, marker="o", ms=3, capsize=2,
                            color=color, label=label)  # fmt: skip
            else:
                ax.plot(group["x"], y, ls=style, marker="o", ms=3, color=color, label=label)
            if spec.errors == "band" and err.any():
                ax.fill_between(group["x"], y - err, y + err, color=color, alpha=0.18, lw=0)
            if spec.shade:
                _shade(ax, spec, rows, group, model, position, color)
        _axis_ticks(ax, spec, ticks, position)
        _finish_panel(ax, spec, spec.x_label or key, panel, metric, first=ax is axes[0])
    fig.suptitle(title, y=1.02)
    return fig


def _shade(
    ax: Axes,
    spec: FigureSpec,
    rows: pd.DataFrame,
    line: pd.DataFrame,
    model: str,
    position: dict[str, float],
    color: str,
) -> None:
    """The band between the values of the `shade` metrics (low, high) under a model's line."""
    key = spec.x[0]
    bounds = []
    for metric in spec.shade:
        sub = rows[(rows["metric"] == metric) & (rows["model"] == model)]
        bounds.append(dict(zip(sub[key], _values(sub), strict=True)))
    xs = [x for x in line[key] if all(x in b for b in bounds)]
    if xs:
        low, high = ([b[x] for x in xs] for b in bounds)
        ax.fill_between([position[x] for x in xs], low, high, color=color, alpha=0.18, lw=0)


def _axis_ticks(ax: Axes, spec: FigureSpec, ticks: list[str], position: dict[str, float]) -> None:
    """Ticks at the settings' values (a dozen at most: else the axis's own), on a log2 axis
    where the spec asks for one."""
    if spec.log_x:
        ax.set_xscale("log", base=2)
    if len(ticks) <= 12:
        ax.set_xticks([position[t] for t in ticks], ticks)
        ax.minorticks_off()
    elif _numbers(ticks) is not None and all(float(t).is_integer() for t in ticks):
        integer_ticks(ax)


def bars(
    spec: FigureSpec, info: TaskInfo, rows: pd.DataFrame, colors: dict[str, str], title: str
) -> Figure:
    """A group of bars per combination of the `x` settings, a bar per model, with 95%
    intervals; a panel per `panels` value or per metric."""
    label, groups, x_label = _combos(spec, rows)
    rows = rows.assign(group=label)
    panels = _panels(spec, rows[rows["metric"].isin(spec.metrics)])
    models = sorted(rows["model"].astype(str).unique())
    width = max(3.4, 0.5 * len(groups) * len(models) + 1.5)
    fig = new_figure(ncols=len(panels), width=width)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=spec.share_y)[0]
    step = 0.8 / max(1, len(models))
    rotate = max((len(g) for g in groups), default=0) > 8
    for ax, (metric, panel, sub) in zip(axes, panels, strict=True):
        for k, model in enumerate(models):
            own = sub[(sub["model"] == model) & (sub["group"] != "")]
            own = own.drop_duplicates("group").set_index("group")
            present = [g for g in groups if g in own.index]
            xs = [groups.index(g) + (k - (len(models) - 1) / 2) * step for g in present]
            ax.bar(xs, _values(own.loc[present]), step, yerr=_interval(own.loc[present]),
                   color=colors[model], label=model, capsize=2, error_kw={"lw": 0.8})  # fmt: skip
        ax.set_xticks(range(len(groups)), groups, rotation=20 if rotate else 0,
                      ha="right" if rotate else "center")  # fmt: skip
        _finish_panel(ax, spec, x_label, panel, metric, first=ax is axes[0])
    fig.suptitle(title, y=1.02)
    return fig


def _finish_panel(
    ax: Axes, spec: FigureSpec, x_label: str, panel: str, metric: str, first: bool
) -> None:
    """A panel's labels, title, scale, limits and legend (the y label on the first panel only
    when panels share their axis)."""
    ax.set_xlabel(x_label)
    ax.set_title(panel)
    if spec.log_y:
        ax.set_yscale("log")
    if spec.limits:
        ax.set_ylim(*spec.limits)
    ax.legend(fontsize=7)
    if first or not spec.share_y:
        ax.set_ylabel(_value_label(spec, metric))


def heatmap(
    spec: FigureSpec, info: TaskInfo, rows: pd.DataFrame, colors: dict[str, str], title: str
) -> Figure:
    """The metric over `x` (columns) by `y` (rows), each value written in its cell; a panel per
    model, the panels sharing axes and colour scale; `y` = ALL last, under a rule, as "mean"."""
    metric, x_key, y_key = spec.metrics[0], spec.x[0], spec.y
    rows = rows[(rows["metric"] == metric) & ~rows[x_key].isin(WILDCARDS)]
    models = sorted(rows["model"].astype(str).unique())
    columns, lines = _ordered(rows[x_key]), _ordered(rows[y_key])
    mean = bool((rows[y_key] == ALL).any())
    kind = info.metric(metric).kind
    text = "{:.2f}" if kind == "proportion" else "{:.3g}"
    values = _values(rows)
    low, high = spec.limits or (float(np.nanmin(values)), float(np.nanmax(values)))
    fig = new_figure(ncols=len(models), width=0.55 * len(columns) + 2.2, height=2.9)
    axes = fig.subplots(1, len(models), squeeze=False, sharex=True, sharey=True)[0]
    image = None
    for k, (ax, model) in enumerate(zip(axes, models, strict=True)):
        sub = rows[rows["model"] == model]
        cells = dict(zip(zip(sub[y_key], sub[x_key], strict=True), _values(sub), strict=True))
        grid = np.array(
            [[cells.get((y, x), np.nan) for x in columns] for y in [*lines, *[ALL] * mean]]
        )
        image = ax.imshow(grid, vmin=low, vmax=high, cmap=CMAPS[info.better(metric)],
                          aspect="auto")  # fmt: skip
        for (i, j), v in np.ndenumerate(grid):
            if not math.isnan(v):
                ax.text(j, i, text.format(v), ha="center", va="center", fontsize=7)
        if mean:
            ax.axhline(len(lines) - 0.5, color="black", lw=1.2)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(lines) + mean), [*lines, *["mean"] * mean])
        ax.set_xlabel(spec.x_label or x_key)
        if k == 0:
            ax.set_ylabel(spec.y_label or y_key)
        ax.set_title(model)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.85, label=metric)
    fig.suptitle(title, y=1.02)
    return fig


def spread(
    spec: FigureSpec, info: TaskInfo, rows: pd.DataFrame, colors: dict[str, str], title: str
) -> Figure:
    """The metric of every combination of the `x` settings, in order, a panel per model on one
    y scale; the best and the worst dashed and the margin between them written."""
    metric = spec.metrics[0]
    rows = rows[rows["metric"] == metric]
    label, combos, x_label = _combos(spec, rows)
    rows = rows.assign(combo=label)[label != ""]
    models = sorted(rows["model"].astype(str).unique())
    points = "pts" if info.metric(metric).kind == "proportion" else ""
    fig = new_figure(ncols=len(models), width=3.0)
    axes = fig.subplots(1, len(models), squeeze=False, sharey=True)[0]
    for ax, model in zip(axes, models, strict=True):
        own = rows[rows["model"] == model].drop_duplicates("combo").set_index("combo")
        present = [c for c in combos if c in own.index]
        y = _values(own.loc[present])
        ax.plot(range(len(y)), y, marker="o", ms=3, color=colors[model])
        best, worst = float(np.nanmax(y)), float(np.nanmin(y))
        for level in (best, worst):
            ax.axhline(level, ls="--", lw=0.8, color="grey")
        margin = f"{100 * (best - worst):.1f} pts" if points else f"{best - worst:.3g}"
        ax.text(0.98, 0.04, f"margin {margin}", transform=ax.transAxes, ha="right",
                va="bottom")  # fmt: skip
        integer_ticks(ax)
        ax.set_xlabel(x_label)
        ax.set_title(model)
        if spec.limits:
            ax.set_ylim(*spec.limits)
    axes[0].set_ylabel(_value_label(spec, metric))
    fig.suptitle(title, y=1.03)
    return fig


Draw = Callable[[FigureSpec, TaskInfo, pd.DataFrame, dict[str, str], str], Figure]
# The one dispatch table: each kind of FigureSpec and the function that draws it.
KINDS: dict[str, Draw] = {"line": line, "bars": bars, "heatmap": heatmap, "spread": spread}
