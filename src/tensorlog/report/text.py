"""What every renderer shares: number formatting, escaping of untrusted text, and the headline.

Module names, notes and paths come from files on disk and may hold anything:
:func:`clean` turns control characters (terminal escape sequences among them)
into visible ``\\xNN`` escapes before any renderer prints them.
"""

from __future__ import annotations

import math
import re

from ..compare.metrics import Column, TensorMetrics
from ..compare.results import Comparison, ModuleResult

__all__ = ["cell", "clean", "fmt", "headline", "judged", "module_cell", "verdict_text", "VERDICT_TEXT"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Control characters, lone surrogates, and the bidirectional controls that make a name read otherwise than it is."""


def clean(text: object) -> str:
    """``text`` with every control character shown as ``\\xNN`` (``\\n``, ``\\t``), and every byte that
    was not UTF-8 in a file name (a lone surrogate) as ``\\udcNN``, so any terminal or encoding can print it."""
    return _CONTROL.sub(lambda m: {"\n": "\\n", "\t": "\\t"}.get(m.group(), _escape(m.group())), str(text))


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


VERDICT_TEXT = {
    "match": "match",
    "born": "**DIVERGES HERE** (inputs match, outputs differ)",
    "contains": "differs (explained by {explained_by})",
    "inherited": "differs (inputs already differed upstream)",
    "only_in_1": "only in dir1",
    "only_in_2": "only in dir2",
    "unreadable": "unreadable",
    "not_comparable": "NOT COMPARED (its outputs could not be lined up)",
}


def fmt(v: float | str | None, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    return f"{v:.{digits}g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.{digits - 1}e}"


def cell(col: Column, m: TensorMetrics) -> str:
    """A tensor pair's value in a table, as its column says to write it (empty where a registered metric was not
    computed: the comparison was made before it was registered)."""
    v = getattr(m, col.field, None)
    if col.style == "outside":
        return f"{m.num_outside} ({m.frac_outside:.2%})"
    if col.style == "worst":
        a, b = m.worst_values or (None, None)
        return f"{v} ({fmt(a, col.digits)}, {fmt(b, col.digits)})" if v is not None and m.worst_values else ""
    if col.style == "text":
        return clean(v if v is not None else "")
    if col.style == "integer":
        return "" if v is None else str(v)
    return fmt(v, col.digits)


def module_cell(col: Column, m: ModuleResult) -> str:
    """A module call's worst value of a column over its outputs (empty for a column with none)."""
    return fmt(getattr(m, col.module), col.digits) if col.module else ""


def headline(c: Comparison) -> str:
    """The one line a person reads first (plus the replay's verdict when there is one).

    Unreadable data comes first: a comparison that could not read everything never reads as a match.
    """
    text = _divergence_line(c)
    if c.summary.modules_not_comparable and not (c.unreadable or c.incomplete):
        first = next(m for m in c.modules if m.verdict == "not_comparable")
        reason = next((t.note or "" for t in first.tensors if t.status == "not_comparable" and t.note), "")
        text = (
            f"NOT COMPARED: {c.summary.modules_not_comparable} module call(s) whose outputs could not be lined up "
            f"(first: `{clean(first.module)}`, step {first.step}: {clean(reason)[:200]}); the verdict does not cover them. "
            + text
        )
    if c.incomplete and not c.unreadable:
        text = (
            f"INCOMPLETE RUN: {clean('; '.join(c.incomplete))[:400]}. A verdict needs whole runs "
            "(whole_steps / --whole-steps compares only the steps both runs finished). Of what was written: " + text
        )
    if c.unreadable:
        bad = [m for m in c.modules if m.verdict == "unreadable"]
        what = []
        if c.problems:
            what.append(f"{len(c.problems)} file(s) of the runs could not be read (first: {clean(c.problems[0])[:200]})")
        if bad:
            why = next((t.note for t in bad[0].tensors if t.status == "unreadable" and t.note), None)
            what.append(
                f"{len(bad)} module call(s) hold unreadable data (first: `{clean(bad[0].module)}`, step {bad[0].step}"
                + (f": {clean(why)[:300]}" if why else "")
                + ")"
            )
        text = (
            "UNREADABLE DATA: "
            + "; ".join(what)
            + ". The results are incomplete. "
            + (
                text
                if c.summary.mismatched or c.first_divergence
                else f"Of what could be read, {c.summary.pairs_compared} pairs match."
            )
        )
    elif c.summary.pairs_compared == 0:
        why = (
            "no request of one run is in the other"
            if c.requests is not None and c.requests.how == "prompt" and not c.requests.matched
            else "no tensor of one run has a counterpart in the other (the table lists each side's modules)"
        )
        text = _requests_line(c) + f"NOTHING COMPARED: {why}."
    replayed = [m for m in c.modules if m.added_error is not None]
    top = max(replayed, key=lambda m: m.added_excess if m.added_excess is not None else m.added_error or 0.0, default=None)
    if top is not None and top.added_excess is not None:
        text += (
            f" Replay: `{clean(top.module)}` adds the most beyond its precision floor (excess {fmt(top.added_excess)}, "
            f"isolated {fmt(top.added_error)}, floor {fmt(top.added_floor)}; step {top.step})."
        )
    elif top is not None and top.added_share:
        text += f" Replay: `{clean(top.module)}` adds {top.added_share:.0%} of the error by itself (step {top.step})."
    return text


def _requests_line(c: Comparison) -> str:
    """What the reader must know before any verdict: the runs had different inputs, or could not be paired by request."""
    r = c.requests
    if r is None:
        return ""
    if r.different_prompts:
        more = f" (and {len(r.different_prompts) - 1} more)" if len(r.different_prompts) > 1 else ""
        return f"DIFFERENT PROMPTS: {clean(r.different_prompts[0].describe())}{more}. "
    if r.how != "prompt":
        return f"REQUESTS NOT PAIRED BY PROMPT: {clean(r.why or '')}. "
    return ""


def judged(c: Comparison) -> str:
    """How the matches were judged, in words: ``12 bit-exact, 40 within rounding of float32``."""
    if c.tolerance == "allclose":
        return f"rtol={c.rtol:g}, atol={c.atol:g}"
    if c.tolerance == "exact":
        return "bit-exact"
    kinds: dict[str, int] = {}
    for m in c.modules:
        for t in m.tensors:
            j = t.metrics.judged_by if t.status == "match" and t.metrics is not None else None
            if j and j.startswith("rounding of "):
                dtype = j.removeprefix("rounding of ").split(" ")[0]
                kinds[dtype] = kinds.get(dtype, 0) + 1
    rest = ", ".join(f"{n} within rounding of {d}" for d, n in sorted(kinds.items()))
    return f"{c.summary.matched_exact} bit-exact" + (f", {rest}" if rest else "")


def _divergence_line(c: Comparison) -> str:
    return _requests_line(c) + _verdict_line(c)


def _verdict_line(c: Comparison) -> str:
    if not c.first_divergence:
        if c.summary.mismatched == 0:
            return f"All {c.summary.pairs_compared} compared tensor pairs match ({judged(c)})."
        first = min((m for m in c.modules if m.verdict == "inherited"), key=lambda m: (m.step, m.position), default=None)
        if first is not None:
            return (
                f"No logged module is where the difference is born: the inputs of `{clean(first.module)}` (step {first.step}), "
                "the first logged module to see it, already differ."
            )
        return "Tensors differ, but no module has matching inputs and differing outputs (see the table)."
    parts = []
    for d in c.first_divergence:
        rank = f" (rank {d.rank})" if d.rank is not None else ""
        note = f"; {clean(d.note).lower()}" if d.note else ""
        beyond = f"; beyond {clean(d.judged_by)}" if d.judged_by and d.judged_by != "exact" else ""
        parts.append(
            f"step {d.step}: `{clean(d.module)}`{rank} (max abs diff {fmt(d.max_abs)}, max rel diff {fmt(d.max_rel)}{beyond}{note})"
        )
    if c.tolerance == "exact" and c.requests is not None and c.requests.rebatched:
        return "Batch dependence: the first module whose output for a request differs when it is served in another batch: " + (
            "; ".join(parts)
        )
    return "First divergence: " + "; ".join(parts)


def verdict_text(m: ModuleResult, md: bool = True) -> str:
    text = VERDICT_TEXT[m.verdict].format(explained_by=f"`{clean(m.explained_by)}`" if md else clean(m.explained_by))
    if m.note:
        text += f": {clean(m.note)}"
    return text if md else text.replace("**", "")
