"""The cells and tables that templates lay out: numbers kept apart from their qualifiers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffbench.stats import Difference, Estimate

# A significant difference, turned the right way for the metric's direction.
MARKERS = {"better": "▲", "worse": "▼", "": ""}
MISSING = "—"
AT_CHANCE = "at chance"
# Interval bounds print to three decimals: a chance level this close to one lies on it.
PRINTED_HALF_STEP = 5e-4


@dataclass(frozen=True)
class Cell:
    """One number of a table with what qualifies it: its interval, p-value, a note and a verdict
    ('better'/'worse' when significant, else '')."""

    value: float | None
    interval: tuple[float, float] | None = None
    p: float | None = None
    signed: bool = False  # a difference: printed with its sign
    note: str = ""
    verdict: str = ""
    p_adjusted: float | None = None  # a difference's p after multiplicity control

    @classmethod
    def of_estimate(cls, e: Estimate | None, chance: float | None = None) -> Cell:
        """A model's value with its interval, noted "at chance" where the interval holds
        `chance` (a uniform guess's expected value)."""
        if e is None:
            return cls(None)
        if e.interval is None:
            return cls(e.value)
        bounds = (e.interval.low, e.interval.high)
        near = (
            chance is not None
            and bounds[0] - PRINTED_HALF_STEP <= chance <= bounds[1] + PRINTED_HALF_STEP
        )
        return cls(e.value, bounds, note=AT_CHANCE if near else "")

    @classmethod
    def of_difference(cls, d: Difference | None, verdict: str = "") -> Cell:
        """A difference with its interval, p-value and verdict."""
        if d is None:
            return cls(None, signed=True)
        bounds = None if d.interval is None else (d.interval.low, d.interval.high)
        if d.test == "none":
            note = "no test: " + (d.reason or "untested")
        elif not d.can_reach:
            note = f"{d.n_clusters} units: p≥{d.p_min:.3g}"
        else:
            note = ""
        if d.n_reference is not None:
            note = ", ".join(filter(None, (note, f"{d.n_pairs} of {d.n_reference}/"
                                           f"{d.n_candidate} paired")))  # fmt: skip
        adjusted = d.p_adjusted if d.adjustment != "none" else None
        return cls(d.delta, bounds, d.p_value, True, note, verdict, adjusted)

    def _format(self, v: float) -> str:
        return f"{v:+.3f}" if self.signed else f"{v:.3f}"

    @property
    def number(self) -> str:
        """The value to three decimals (signed for a difference), or a dash."""
        if self.value is None or not math.isfinite(self.value):
            return MISSING
        return self._format(self.value)

    @property
    def bounds(self) -> str:
        """The interval as `[low, high]`, or ''."""
        if self.interval is None:
            return ""
        return f"[{self._format(self.interval[0])}, {self._format(self.interval[1])}]"

    @property
    def p_value(self) -> str:
        """The p-value to three significant digits (two would print 0.0496 as 0.05), or ''."""
        return self.p_text(self.p)

    @staticmethod
    def p_text(p: float | None) -> str:
        """A p-value to three significant digits, or ''."""
        return "" if p is None else f"{p:.3g}"

    @property
    def strong(self) -> bool:
        """Whether the cell stands out: a significant difference."""
        return bool(self.verdict)

    @property
    def marker(self) -> str:
        """▲ or ▼ for a significant difference, else ''."""
        return MARKERS[self.verdict]

    @property
    def detail(self) -> str:
        """What qualifies the number: `[low, high] p=... (note)`."""
        parts = [self.bounds, f"p={self.p_value}" if self.p_value else ""]
        if self.p_adjusted is not None:
            parts.append(f"adj. {self.p_text(self.p_adjusted)}")
        parts.append(f"({self.note})" if self.note else "")
        return " ".join(p for p in parts if p)

    def __str__(self) -> str:
        return " ".join(p for p in (self.number, self.detail, self.marker) if p)


@dataclass(frozen=True)
class Text:
    """A text cell that may stand out (a status the gate fails on)."""

    text: str
    strong: bool = False

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Table:
    """A header and rows of text and Cells; `wrap` names the text columns that may wrap."""

    head: tuple[str, ...]
    rows: tuple[tuple[str | Text | Cell, ...], ...]
    wrap: frozenset[str] = frozenset()
