"""Renderers for a :class:`Comparison`: markdown, JSON and self-contained HTML.

They read the result objects and format them; they compute nothing but
presentation (ordering, number formatting, plot coordinates).
"""

from __future__ import annotations

import html
import math
from typing import Callable

from ..compare.engine import Comparison, ModuleResult, TensorResult
from ..compare.replay import ReplayResult

__all__ = ["render", "render_markdown", "render_json", "render_html", "FORMATS", "headline"]

_VERDICT_TEXT = {
    "match": "match",
    "born": "**DIVERGES HERE** (inputs match, outputs differ)",
    "contains": "differs (explained by {explained_by})",
    "inherited": "differs (inputs already differed upstream)",
    "only_in_1": "only in dir1",
    "only_in_2": "only in dir2",
    "unreadable": "unreadable",
}


def _f(v: float | None, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    return f"{v:.{digits}g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.{digits - 1}e}"


def headline(c: Comparison) -> str:
    """The one line a person reads first (plus the replay's verdict when there is one)."""
    text = _divergence_line(c)
    top = max((m for m in c.modules if m.added_share is not None), key=lambda m: m.added_share or 0.0, default=None)
    if top is not None and top.added_share:
        text += f" Replay: `{top.module}` adds {top.added_share:.0%} of the error by itself (step {top.step})."
    return text


def _divergence_line(c: Comparison) -> str:
    if not c.first_divergence:
        if c.summary.mismatched == 0:
            return f"All {c.summary.pairs_compared} compared tensor pairs match (rtol={c.rtol:g}, atol={c.atol:g})."
        first = min((m for m in c.modules if m.verdict == "inherited"), key=lambda m: (m.step, m.position), default=None)
        if first is not None:
            return (f"No logged module is where the difference is born: the inputs of `{first.module}` (step {first.step}), "
                    "the first logged module to see it, already differ.")
        return "Tensors differ, but no module has matching inputs and differing outputs (see the table)."
    parts = []
    for d in c.first_divergence:
        rank = f" (rank {d.rank})" if d.rank is not None else ""
        parts.append(f"step {d.step}: `{d.module}`{rank} (max abs diff {_f(d.max_abs)}, max rel diff {_f(d.max_rel)})")
    return "First divergence: " + "; ".join(parts)


def _verdict(m: ModuleResult, md: bool = True) -> str:
    text = _VERDICT_TEXT[m.verdict].format(explained_by=f"`{m.explained_by}`" if md else m.explained_by)
    return text if md else text.replace("**", "")


def render_markdown(c: Comparison, *, verbose: bool = False) -> str:
    s = c.summary
    out = [
        "# tensorlog comparison",
        "",
        f"**{headline(c)}**",
        "",
        f"- dir1: `{c.dir1}`",
        f"- dir2: `{c.dir2}`",
        f"- tolerance: rtol={c.rtol:g}, atol={c.atol:g} (|a-b| <= atol + rtol*|b|); steps: {', '.join(map(str, c.steps)) or 'none'}",
        "",
        "## Summary",
        "",
        "| pairs compared | matched | mismatched | only in dir1 | only in dir2 | unreadable | modules compared | modules differing |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s.pairs_compared} | {s.matched} | {s.mismatched} | {s.only_in_1} | {s.only_in_2} | {s.unreadable} | {s.modules_compared} | {s.modules_mismatched} |",
        "",
    ]
    if c.notes:
        out += ["Notes:", ""] + [f"- {n}" for n in c.notes] + [""]
    for step in c.steps:
        mods = [m for m in c.modules if m.step == step]
        replayed = any(m.added_error is not None for m in mods)
        head = "| # | module | verdict | max abs | max rel | rel diff | cosine | SNR dB |"
        rule = "|---:|---|---|---:|---:|---:|---:|---:|"
        if replayed:
            head += " added error (isolated) | share |"
            rule += "---:|---:|"
        out += [f"## Step {step}", "", head, rule]
        for m in mods:
            rank = f" [rank {m.rank}]" if m.rank is not None else ""
            row = (f"| {m.position} | `{m.module}`{rank} | {_verdict(m)} | {_f(m.worst_max_abs)} | {_f(m.worst_max_rel)} | "
                   f"{_f(m.worst_rel_diff)} | {_f(m.min_cosine, 6)} | {_f(m.min_snr_db)} |")
            if replayed:
                row += f" {_f(m.added_error)} | {'' if m.added_share is None else f'{m.added_share:.0%}'} |"
            out.append(row)
        out.append("")
        if verbose:
            out += _tensor_table(mods)
    return "\n".join(out) + "\n"


def _tensor_table(mods: list[ModuleResult]) -> list[str]:
    out = [
        "| module | tensor | status | method | shape | dtype | max abs | mean abs | max rel | cosine | rel diff | SNR dB | outside tol | worst at (a, b) | min atol to pass | note |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for m in mods:
        for t in m.tensors:
            out.append(_tensor_row(m, t))
    return out + [""]


def _tensor_row(m: ModuleResult, t: TensorResult) -> str:
    shape = "x".join(map(str, t.shape1 or t.shape2 or [])) if (t.shape1 == t.shape2 or not (t.shape1 and t.shape2)) else f"{t.shape1} vs {t.shape2}"
    dtype = (t.dtype1 or t.dtype2 or "").replace("torch.", "") if t.dtype1 == t.dtype2 or not (t.dtype1 and t.dtype2) else f"{t.dtype1} vs {t.dtype2}".replace("torch.", "")
    mt = t.metrics
    cells = [f"`{m.module}`", t.name, t.status, t.method, shape, dtype]
    if mt is not None:
        worst = f"{mt.worst_index} ({_f(mt.worst_values[0], 6)}, {_f(mt.worst_values[1], 6)})" if mt.worst_index is not None and mt.worst_values else ""
        cells += [_f(mt.max_abs), _f(mt.mean_abs), _f(mt.max_rel), _f(mt.cosine, 6), _f(mt.rel_diff), _f(mt.snr_db),
                  f"{mt.num_outside} ({mt.frac_outside:.2%})", worst, _f(mt.min_atol)]
    elif t.stat_rel:
        cells += ["", "", _f(max(t.stat_rel.values())), "", "", "", "", "", ""]
    else:
        cells += [""] * 9
    cells.append((t.note or "").replace("|", "\\|"))
    return "| " + " | ".join(cells) + " |"


def render_json(c: Comparison, *, verbose: bool = True) -> str:
    """The stable JSON form: one ``Comparison`` object (schema in docs/compare-json.md)."""
    return c.model_dump_json(indent=1)


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
        f"<title>{html.escape(m.module)}: rel diff {_f(m.worst_rel_diff)}, max rel {_f(m.worst_max_rel)} ({m.verdict})</title></circle>"
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


def render_html(c: Comparison, *, verbose: bool = False) -> str:
    """One self-contained page: no external script, style or font."""
    e = html.escape
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
        f"<p>dir1: <code>{e(c.dir1)}</code><br>dir2: <code>{e(c.dir2)}</code><br>rtol={c.rtol:g}, atol={c.atol:g}</p>",
        "<table id='summary'><tr><th>pairs compared</th><th>matched</th><th>mismatched</th><th>only in dir1</th><th>only in dir2</th><th>unreadable</th></tr>",
        f"<tr><td class=num>{s.pairs_compared}</td><td class=num>{s.matched}</td><td class=num>{s.mismatched}</td><td class=num>{s.only_in_1}</td>"
        f"<td class=num>{s.only_in_2}</td><td class=num>{s.unreadable}</td></tr></table>",
    ]
    parts += [f"<p>note: {e(n)}</p>" for n in c.notes]
    for step in c.steps:
        mods = [m for m in c.modules if m.step == step]
        parts.append(f"<h2>Step {step}</h2>")
        parts.append(_plot_svg(mods, step))
        parts.append(f"<table class='modules' id='modules-step-{step}'><tr><th>#</th><th>module</th><th>verdict</th><th>max abs</th><th>max rel</th><th>rel diff</th><th>cosine</th><th>SNR dB</th></tr>")
        for m in mods:
            parts.append(
                f"<tr class='{m.verdict}'><td class=num>{m.position}</td><td><code>{e(m.module)}</code></td><td>{e(_verdict(m, md=False))}</td>"
                f"<td class=num>{_f(m.worst_max_abs)}</td><td class=num>{_f(m.worst_max_rel)}</td><td class=num>{_f(m.worst_rel_diff)}</td>"
                f"<td class=num>{_f(m.min_cosine, 6)}</td><td class=num>{_f(m.min_snr_db)}</td></tr>"
            )
        parts.append("</table>")
        if verbose:
            parts.append("<details open><summary>tensors</summary><table class='tensors'>")
            parts.append("<tr><th>module</th><th>tensor</th><th>status</th><th>max abs</th><th>max rel</th><th>cosine</th><th>note</th></tr>")
            for m in mods:
                for t in m.tensors:
                    mt = t.metrics
                    parts.append(
                        f"<tr><td><code>{e(m.module)}</code></td><td>{e(t.name)}</td><td>{t.status}</td>"
                        f"<td class=num>{_f(mt.max_abs) if mt else ''}</td><td class=num>{_f(mt.max_rel) if mt else ''}</td>"
                        f"<td class=num>{_f(mt.cosine, 6) if mt else ''}</td><td>{e(t.note or '')}</td></tr>"
                    )
            parts.append("</table></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


FORMATS: dict[str, Callable[..., str]] = {"md": render_markdown, "json": render_json, "html": render_html}


def render(c: Comparison, fmt: str = "md", *, verbose: bool = False) -> str:
    return FORMATS[fmt](c, verbose=verbose)


def render_replay(r: ReplayResult) -> str:
    """Markdown table of a replay: each module's own error on run A's inputs, worst first."""
    lines = [f"# tensorlog replay of {r.run}", ""]
    top = r.top()
    if top is not None and top.share:
        lines += [f"**`{top.module}` adds {top.share:.0%} of the error by itself (step {top.step}).**", ""]
    lines += ["| step | module | added error (rel L2) | share | max abs | note |", "|---:|---|---:|---:|---:|---|"]
    for m in sorted(r.modules, key=lambda m: (m.step, -(m.isolated_error or -1.0))):
        share = "" if m.share is None else f"{m.share:.0%}"
        lines.append(f"| {m.step} | `{m.module}` | {_f(m.isolated_error)} | {share} | {_f(m.isolated.max_abs) if m.isolated else ''} | {m.note or ''} |")
    return "\n".join(lines) + "\n"
