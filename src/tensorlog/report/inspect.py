"""Terminal rendering of runs (``tensorlog inspect``). Reads reader objects; computes nothing."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..config import compile_pattern
from ..formats import Run
from .text import clean

__all__ = ["render_run", "fmt_num"]


def fmt_num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def _t(x: object) -> str:
    """Text from disk, safe for rich markup and any terminal."""
    return escape(clean(x))


def render_run(run: Run, console: Console, *, steps: list[int] | None = None, modules: list[str] | None = None) -> None:
    m = run.manifest
    status = "complete" if run.complete else f"INCOMPLETE ({run.incomplete_reason})"
    console.print(f"[bold]{_t(run.path)}[/]  layout={run.layout}  {_t(status)}", highlight=False)
    data = {**m.model_dump(), "mode": m.config.get("mode")}
    facts = [
        f"{k}={data[k]}" for k in ("model_class", "torch_version", "vllm_version", "world_size", "mode", "layout") if data.get(k)
    ]
    if facts:
        console.print(_t("  " + "  ".join(facts)), highlight=False)
    if run.parts:
        console.print(_t(f"  {len(run.parts)} parts: " + ", ".join(map(str, run.parts))), highlight=False)
    if m.removed_through is not None:
        console.print(f"  steps up to {m.removed_through} were removed by retention", highlight=False)
    pats = [compile_pattern(p) for p in modules] if modules else None
    for problem in run.problems:
        console.print(f"[red]problem:[/] {_t(problem)}", highlight=False)
    for index, step in run.steps.items():
        if steps is not None and index not in steps:
            continue
        table = Table(title=f"step {index}: {len(step.calls)} module calls", title_justify="left", show_lines=False)
        for col in ("#", "module", "tensor", "shape", "dtype", "min", "max", "mean", "abs max", "nan/inf"):
            table.add_column(
                col, justify="right" if col in ("#", "min", "max", "mean", "abs max") else "left", no_wrap=col != "module"
            )
        for call in step.calls:
            if pats and not any(p.search(call.module) for p in pats):
                continue
            label = _t(call.dirname) + (f" [rank {call.rank}]" if call.rank is not None else "")
            first = True
            for t in call.tensors:
                st = t.stats or {}
                bad = (st.get("nan_count") or 0, st.get("inf_count") or 0)
                shape = "x".join(map(str, t.shape)) if t.shape is not None else (t.entry.value.type if t.entry.value else "")
                note = f" ({t.entry.skipped})" if t.entry.skipped else ""
                table.add_row(
                    str(call.position) if first else "",
                    label if first else "",
                    _t(t.name + note),
                    shape,
                    (t.dtype or "").removeprefix("torch."),
                    fmt_num(st.get("min")),
                    fmt_num(st.get("max")),
                    fmt_num(st.get("mean")),
                    fmt_num(st.get("abs_max")),
                    f"[red]{bad[0]}/{bad[1]}[/]" if any(bad) else "",
                )
                first = False
            for err in call.errors:
                table.add_row(str(call.position) if first else "", label if first else "", f"[red]{_t(err)}[/]", *[""] * 7)
                first = False
        console.print(table)
