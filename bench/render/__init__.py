"""Rendering of reports and comparisons: typed cells laid out by Jinja2 templates.

The templates (package data, `templates/`) receive structured tables (`diffbench.render.cells`):
each number with its interval, p-value and verdict kept apart, so that Markdown prints them on
one line and HTML sets the interval in small print, without either re-reading the other's text.
"""

from __future__ import annotations

import functools

import jinja2


def _md(text: object) -> str:
    """Text made safe for a Markdown table cell."""
    return str(text).replace("|", "\\|")


@functools.cache
def environment() -> jinja2.Environment:
    """The template environment: HTML templates autoescaped, Markdown ones not."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("diffbench.render", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = _md
    return env


def fill(template: str, **context: object) -> str:
    """The named template filled with `context`."""
    return environment().get_template(template).render(**context)
