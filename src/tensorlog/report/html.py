"""The HTML report of a :class:`Comparison`: one self-contained page (no script, style or font from outside)."""

from __future__ import annotations

import html
import math

from ..compare.metrics import Column, columns
from ..compare.results import Comparison, ModuleResult
from .text import cell, clean, fmt, headline, module_cell, verdict_text

__all__ = ["render_html"]


_COLORS = {"match": "#2ca02c", "born": "#d62728", "contains": "#ff7f0e", "inherited": "#9467bd"}


def _plot_svg(mods: list[ModuleResult], step: int) -> str:
    """Scale-free relative difference of each module's outputs along the execution order (log scale)."""
    pts = [m for m in mods if m.worst_rel_diff is not None]
    w, h, pad = 900, 260, 50
    if not pts:
        return f'<p class="noplot">step {step}: no tensor data to plot</p>'
    floor = 1e-12
    ys = [math.log10(max(m.worst_rel_diff or 0.0, floor)) for m in pts]
    lo, hi = min(ys + [-8.0]), max(ys + [0.0])
    n = max(len(pts) - 1, 1)

    def xy(i: int, y: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * i / n, h - pad - (h - 2 * pad) * (y - lo) / ((hi - lo) or 1)

    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(ys)))
    dots = "".join(
        f'<circle cx="{xy(i, v)[0]:.1f}" cy="{xy(i, v)[1]:.1f}" r="4" fill="{_COLORS.get(m.verdict, "#7f7f7f")}">'
        f"<title>{html.escape(clean(m.module))}: rel diff {fmt(m.worst_rel_diff)}, max rel {fmt(m.worst_max_rel)} ({m.verdict})</title></circle>"
        for i, (m, v) in enumerate(zip(pts, ys))
    )
    ticks = "".join(
        f'<text x="{pad - 6}" y="{xy(0, t)[1] + 4:.1f}" text-anchor="end" font-size="11">1e{t}</text>'
        f'<line x1="{pad}" x2="{w - pad}" y1="{xy(0, t)[1]:.1f}" y2="{xy(0, t)[1]:.1f}" stroke="#eee"/>'
        for t in range(math.floor(lo), math.ceil(hi) + 1, max(1, math.ceil((hi - lo) / 6)))
    )
    return (
        f'<svg class="plot" id="plot-step-{step}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
        f'<rect width="{w}" height="{h}" fill="white"/>{ticks}'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>{dots}'
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle" font-size="12">module, in execution order (step {step})</text>'
        f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle" font-size="12">rel diff of outputs</text>'
        "</svg>"
    )


def _heads(cols: list[Column]) -> str:
    return "".join(f"<th>{html.escape(c.header)}</th>" for c in cols)


def _td(col: Column, text: str) -> str:
    """A cell; its text is already clean (no control characters), only HTML's own characters are escaped."""
    return f"<td class=num>{html.escape(text)}</td>" if col.numeric else f"<td>{html.escape(text)}</td>"


def render_html(c: Comparison, *, verbose: bool = False) -> str:
    """One self-contained page: no external script, style or font."""

    def e(x: object) -> str:
        return html.escape(clean(x))

    s = c.summary
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tensorlog comparison</title><style>",
        "body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 24px}",
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}",
        ".born{background:#fde0e0;font-weight:bold}.contains{background:#fff0d9}.inherited{background:#efe6f7}.only_in_1,.only_in_2{color:#888}",
        "h1{font-size:22px}.headline{font-size:17px;padding:10px;background:#f6f6f6;border-left:4px solid #d62728}code{font-size:12px}",
        "</style></head><body>",
        "<h1>tensorlog comparison</h1>",
        f"<p class='headline'>{e(headline(c)).replace('`', '')}</p>",
        f"<p>dir1: <code>{e(c.dir1)}</code><br>dir2: <code>{e(c.dir2)}</code><br>tolerance: {e(c.tolerance_text)}</p>",
        *([f"<p>requests: {e(c.requests.summary())}</p>"] if c.requests is not None else []),
        "<table id='summary'><tr><th>pairs compared</th><th>matched</th><th>mismatched</th><th>only in dir1</th><th>only in dir2</th><th>unreadable</th></tr>",
        f"<tr><td class=num>{s.pairs_compared}</td><td class=num>{s.matched}</td><td class=num>{s.mismatched}</td><td class=num>{s.only_in_1}</td>"
        f"<td class=num>{s.only_in_2}</td><td class=num>{s.unreadable}</td></tr></table>",
    ]
    parts += [f"<p>note: {e(n)}</p>" for n in [*c.problems, *c.incomplete, *c.notes]]
    for step in c.steps:
        mods = [m for m in c.modules if m.step == step]
        parts.append(f"<h2>Step {step}</h2>")
        parts.append(_plot_svg(mods, step))
        cols = columns("modules")
        parts.append(
            f"<table class='modules' id='modules-step-{step}'><tr><th>#</th><th>module</th><th>verdict</th>{_heads(cols)}</tr>"
        )
        for m in mods:
            parts.append(
                f"<tr class='{m.verdict}'><td class=num>{m.position}</td><td><code>{e(m.module)}</code></td><td>{e(verdict_text(m, md=False))}</td>"
                + "".join(_td(c, module_cell(c, m)) for c in cols)
                + "</tr>"
            )
        parts.append("</table>")
        if verbose:
            cols = columns("tensors_brief")
            parts.append("<details open><summary>tensors</summary><table class='tensors'>")
            parts.append(f"<tr><th>module</th><th>tensor</th><th>status</th>{_heads(cols)}<th>note</th></tr>")
            for m in mods:
                for t in m.tensors:
                    mt = t.metrics
                    parts.append(
                        f"<tr><td><code>{e(m.module)}</code></td><td>{e(t.name)}</td><td>{t.status}</td>"
                        + "".join(_td(c, cell(c, mt) if mt is not None else "") for c in cols)
                        + f"<td>{e(t.note or '')}</td></tr>"
                    )
            parts.append("</table></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
