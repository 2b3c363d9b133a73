"""What a report shows, as typed data: its lines (a metric row with every model's estimate and
difference), task sections and paper tables. `diffbench.report` computes it from the store and
`diffbench.render.report` lays it out; neither imports the other's module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffbench.api import ALL, PaperRef
from diffbench.results import Results
from diffbench.stats import LEVEL, Difference, Estimate


@dataclass(frozen=True)
class Line:
    """One row of a report table: a task metric in one setting, every model, every difference."""

    task: str
    metric: str
    setting: tuple[tuple[str, str], ...]
    lower_is_better: bool
    estimates: dict[str, Estimate]
    differences: dict[str, Difference]
    chance: float | None = None  # a uniform guess's expected value, where the samples record it
    better: str = "higher"  # "higher", "lower" or "none" (no verdict either way)
    unit: str = "sample"  # the metric's unit of independence
    # model -> the model its difference is taken against: the reference, or under a sweep the
    # reference's variant at the same value (or, for the reference's own, its first value)
    against: dict[str, str] = field(default_factory=dict)
    # model -> its difference from its own variant at the sweep's first value (swept models)
    sweep_differences: dict[str, Difference] = field(default_factory=dict)
    sweep_against: dict[str, str] = field(default_factory=dict)

    def label(self, summary: bool = True) -> str:
        """`key=value, ...`; settings averaged over are left out of a summary's label."""
        return ", ".join(f"{k}={v}" for k, v in self.setting if not (summary and v == ALL))

    def verdict(self, model: str) -> str:
        """'better' or 'worse' when `model` differs significantly from the reference (turned the
        right way for a lower-is-better metric), else ''."""
        d = self.differences.get(model)
        return _verdict(d, self.better)

    def sweep_verdict(self, model: str) -> str:
        """`verdict` for the difference from the model's own first swept value."""
        return _verdict(self.sweep_differences.get(model), self.better)

    def tested(self) -> list[Difference]:
        """Every difference of the line that carries a test."""
        found = [*self.differences.values(), *self.sweep_differences.values()]
        return [d for d in found if d.p_value is not None]


def _verdict(d: Difference | None, better: str) -> str:
    """'better' or 'worse' for a significant difference (after multiplicity control) on a
    metric with a direction, else ''."""
    if d is None or not d.significant or better == "none":
        return ""
    gain = -d.delta if better == "lower" else d.delta
    return "better" if gain > 0 else "worse" if gain < 0 else ""


@dataclass(frozen=True)
class TaskSection:
    """A task's part of the report."""

    name: str
    description: str
    headline_note: str  # which of its rows the summary shows, in words
    lines: tuple[Line, ...]
    figures: tuple[Path, ...]


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper table: the run's estimate per column, and the paper's numbers."""

    label: str  # the row key, with the settings that tell apart rows sharing it
    estimates: dict[str, Estimate]  # column (model or base label) -> the run's value
    transformer: str  # the paper's number as text, or "" where it gives none
    diff: str
    chance: float | None = None  # a uniform guess's expected value, where the task defines one
    # column -> its difference from the reference column in this row, Holm-adjusted over the
    # paper section
    differences: dict[str, Difference] = field(default_factory=dict)
    better: str = "higher"

    def verdict(self, column: str) -> str:
        """'better' or 'worse' where the column differs significantly from the reference."""
        return _verdict(self.differences.get(column), self.better)


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's tables beside the run's rows of the same metric and settings."""

    task: str
    ref: PaperRef
    lower_is_better: bool
    columns: tuple[str, ...]
    rows: tuple[PaperRow, ...]
    run_setting: tuple[tuple[str, str], ...]  # the settings every row shares that `where` chose


@dataclass(frozen=True)
class Report:
    """Everything a report shows, computed once and rendered as Markdown or HTML."""

    results: Results
    reference: str
    summary: tuple[Line, ...]
    tasks: tuple[TaskSection, ...]
    summary_figure: Path | None
    level: float = LEVEL
    paper: tuple[PaperTable, ...] = ()

    @property
    def others(self) -> list[str]:
        """The models compared against the reference."""
        return [m for m in self.results.models if m != self.reference]
