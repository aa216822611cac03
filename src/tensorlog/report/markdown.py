"""The markdown report of a :class:`Comparison` (``tensorlog compare``'s default)."""

from __future__ import annotations

from ..compare.metrics import Column, columns
from ..compare.results import Comparison, ModuleResult, TensorResult
from .text import cell, clean, fmt, headline, module_cell, verdict_text

__all__ = ["render_markdown"]


def render_markdown(c: Comparison, *, verbose: bool = False) -> str:
    s = c.summary
    out = [
        "# tensorlog comparison",
        "",
        f"**{headline(c)}**",
        "",
        f"- dir1: `{clean(c.dir1)}`",
        f"- dir2: `{clean(c.dir2)}`",
        f"- tolerance: {c.tolerance_text}; steps: {', '.join(map(str, c.steps)) or 'none'}",
        *([f"- requests: {clean(c.requests.summary())}"] if c.requests is not None else []),
        "",
        "## Summary",
        "",
        "| pairs compared | matched | mismatched | only in dir1 | only in dir2 | unreadable | modules compared | modules differing |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s.pairs_compared} | {s.matched} | {s.mismatched} | {s.only_in_1} | {s.only_in_2} | {s.unreadable} | {s.modules_compared} | {s.modules_mismatched} |",
        "",
    ]
    if c.notes or c.problems or c.incomplete:
        out += ["Notes:", ""] + [f"- {clean(n)}" for n in [*c.problems, *c.incomplete, *c.notes]] + [""]
    out += _requests(c)
    for step in c.steps:
        mods = [m for m in c.modules if m.step == step]
        replayed = any(m.added_error is not None for m in mods)
        cols = columns("modules")
        head = "| # | module | verdict | " + " | ".join(c.header for c in cols) + " |"
        rule = "|---:|---|---|" + _rule(cols)
        if replayed:
            head += " added error (isolated) | floor | excess | share |"
            rule += "---:|---:|---:|---:|"
        out += [f"## Step {step}", "", head, rule]
        for m in mods:
            rank = f" [rank {m.rank}]" if m.rank is not None else ""
            cells = [str(m.position), f"`{clean(m.module)}`{rank}", verdict_text(m), *(module_cell(c, m) for c in cols)]
            row = "| " + " | ".join(cells) + " |"
            if replayed:
                share = "" if m.added_share is None else f"{m.added_share:.0%}"
                row += f" {fmt(m.added_error)} | {fmt(m.added_floor)} | {fmt(m.added_excess)} | {share} |"
            out.append(row)
        out.append("")
        if verbose:
            out += _tensor_table(mods)
    return "\n".join(out) + "\n"


def _requests(c: Comparison) -> list[str]:
    """Which request of run 1 is which of run 2, and the tokens only one run logged: never dropped in silence."""
    r = c.requests
    if r is None or (
        r.how == "prompt" and not (r.different_prompts or r.only_in_1 or r.only_in_2 or r.tokens_only_1 or r.tokens_only_2)
    ):
        return []
    out = ["## Requests", ""]
    if r.why:
        out += [f"Paired by {r.how}: {clean(r.why)}.", ""]
    out += [f"- {clean(d.describe())}" for d in r.different_prompts]
    if r.only_in_1:
        out.append(f"- only in run 1 (not compared): {', '.join(clean(i) for i in r.only_in_1[:20])}")
    if r.only_in_2:
        out.append(f"- only in run 2 (not compared): {', '.join(clean(i) for i in r.only_in_2[:20])}")
    if r.matched:
        out += [
            "",
            "| request (run 1) | request (run 2) | prompt tokens | sample | tokens in both | only in run 1 | only in run 2 |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for p in r.matched:
            one = f"{p.tokens_only_1} ({p.only_1})" if p.tokens_only_1 else "0"
            two = f"{p.tokens_only_2} ({p.only_2})" if p.tokens_only_2 else "0"
            out.append(f"| {clean(p.id1)} | {clean(p.id2)} | {p.prompt_len} | {p.sample} | {p.tokens_both} | {one} | {two} |")
    return [*out, ""]


def _rule(cols: list[Column]) -> str:
    return "".join("---:|" if c.numeric else "---|" for c in cols)


def _tensor_table(mods: list[ModuleResult]) -> list[str]:
    cols = columns("tensors")
    out = [
        "| module | tensor | status | method | shape | dtype | " + " | ".join(c.header for c in cols) + " | note |",
        "|---|---|---|---|---|---|" + _rule(cols) + "---|",
    ]
    for m in mods:
        for t in m.tensors:
            out.append(_tensor_row(m, t, cols))
    return out + [""]


def _tensor_row(m: ModuleResult, t: TensorResult, cols: list[Column]) -> str:
    shape = (
        "x".join(map(str, t.shape1 or t.shape2 or []))
        if (t.shape1 == t.shape2 or not (t.shape1 and t.shape2))
        else f"{t.shape1} vs {t.shape2}"
    )
    dtype = (
        (t.dtype1 or t.dtype2 or "").replace("torch.", "")
        if t.dtype1 == t.dtype2 or not (t.dtype1 and t.dtype2)
        else f"{t.dtype1} vs {t.dtype2}".replace("torch.", "")
    )
    mt = t.metrics
    cells = [f"`{clean(m.module)}`", clean(t.name), t.status, t.method, shape, dtype]
    if mt is not None:
        cells += [cell(c, mt) for c in cols]
    elif t.stat_rel:  # compared by statistics: their worst relative error stands in the max rel column
        worst = fmt(max(t.stat_rel.values()))
        cells += [worst if c.field == "max_rel" else "" for c in cols]
    else:
        cells += [""] * len(cols)
    cells.append(clean(t.note or "").replace("|", "\\|"))
    return "| " + " | ".join(cells) + " |"
