"""Reports: renderers read result objects and format them; they compute nothing but presentation.

:mod:`.markdown`, :mod:`.html` and JSON (the result's own ``model_dump_json``) for a comparison;
:mod:`.compare_il` for ``tools/compare_il.py``; :mod:`.inspect` for a run in the terminal;
:mod:`.replay` for a replay.
"""

from __future__ import annotations

from collections.abc import Callable

from ..compare.results import Comparison
from .html import render_html
from .markdown import render_markdown
from .text import headline

__all__ = ["render", "render_markdown", "headline"]


def render_json(c: Comparison, *, verbose: bool = True) -> str:
    """The stable JSON form: one ``Comparison`` object (schema in docs/compare-json.md)."""
    return c.model_dump_json(indent=1)


FORMATS: dict[str, Callable[..., str]] = {"md": render_markdown, "json": render_json, "html": render_html}


def render(c: Comparison, fmt: str = "md", *, verbose: bool = False) -> str:
    return FORMATS[fmt](c, verbose=verbose)
