"""The markdown report of a replay: each module's own error on run A's inputs, its floor, and the excess."""

from __future__ import annotations

from ..compare.replay import ReplayResult
from .text import clean, fmt

__all__ = ["render_replay", "replay_headline"]


def replay_headline(r: ReplayResult) -> str:
    """The replay's verdict in one sentence: the module that adds the most beyond its precision floor."""
    top = r.top()
    if top is None:
        return "No module could be replayed: see the notes in the table."
    share = f", {top.share:.0%} of the total" if top.share is not None else ""
    if top.excess is None:
        return (
            f"`{clean(top.module)}` adds the most error by itself: {fmt(top.isolated_error)} relative{share} (step {top.step})."
        )
    if not top.stands_out:
        return (
            f"No module adds error beyond its precision floor: the largest excess, {fmt(top.excess)} at "
            f"`{clean(top.module)}` (step {top.step}), is within what the precision change explains."
        )
    return (
        f"`{clean(top.module)}` adds the most error beyond its precision floor: excess {fmt(top.excess)} "
        f"(isolated {fmt(top.isolated_error)}, floor {fmt(top.floor_error)}){share} (step {top.step})."
    )


def render_replay(r: ReplayResult) -> str:
    """Markdown: the verdict, the self-check, and a row per module call, the largest excess first within a step."""
    lines = [
        f"# tensorlog replay of {clean(r.run)}",
        "",
        f"**{replay_headline(r)}**",
        "",
        f"- self-check: {clean(r.self_check)}",
        f"- precision floor: {clean(r.floor)}",
        "",
        "| step | module | isolated error (rel L2) | floor | excess | share | status | note |",
        "|---:|---|---:|---:|---:|---:|---|---|",
    ]
    order = {id(m): i for i, m in enumerate(r.ranked())}
    for m in sorted(r.modules, key=lambda m: (m.step, order.get(id(m), 1 << 30))):
        share = "" if m.share is None else f"{m.share:.0%}"
        status = m.status + (" (stands out)" if m.status == "ok" and m.stands_out else "")
        lines.append(
            f"| {m.step} | `{clean(m.module)}` | {fmt(m.isolated_error)} | {fmt(m.floor_error)} | {fmt(m.excess)} | "
            f"{share} | {status} | {clean(m.note or '')} |"
        )
    return "\n".join(lines) + "\n"
