"""Terminal rendering of runs (``tensorlog inspect``). Reads reader objects; computes nothing."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..formats.tensorlog import Run

__all__ = ["render_run", "fmt_num"]


def fmt_num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def render_run(run: Run, console: Console, *, steps: list[int] | None = None, modules: list[str] | None = None) -> None:
    m = run.manifest
    status = "complete" if run.complete else f"INCOMPLETE ({run.incomplete_reason})"
    console.print(f"[bold]{escape(str(run.path))}[/]  layout={run.layout}  {status}", highlight=False)
    facts = [f"{k}={m[k]}" for k in ("model_class", "torch_version", "vllm_version", "world_size", "mode") if m.get(k)]
    if facts:
        console.print("  " + "  ".join(facts), highlight=False)
    pats = [re.compile(p) for p in modules] if modules else None
    for problem in run.problems:
        console.print(f"[red]problem:[/] {escape(problem)}", highlight=False)
    for index, step in run.steps.items():
        if steps is not None and index not in steps:
            continue
        table = Table(title=f"step {index}: {len(step.calls)} module calls", title_justify="left", show_lines=False)
        for col in ("#", "module", "tensor", "shape", "dtype", "min", "max", "mean", "abs max", "nan/inf"):
            table.add_column(col, justify="right" if col in ("#", "min", "max", "mean", "abs max") else "left", no_wrap=col != "module")
        for call in step.calls:
            if pats and not any(p.search(call.module) for p in pats):
                continue
            label = escape(call.dirname) + (f" [rank {call.rank}]" if call.rank is not None else "")
            first = True
            for t in call.tensors:
                st = t.stats or {}
                bad = (st.get("nan_count") or 0, st.get("inf_count") or 0)
                shape = "x".join(map(str, t.shape)) if t.shape is not None else t.meta.get("type", "")
                note = f" ({t.meta['skipped']})" if t.meta.get("skipped") else ""
                table.add_row(
                    str(call.position) if first else "",
                    label if first else "",
                    escape(t.name + note),
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
                table.add_row(str(call.position) if first else "", label if first else "", f"[red]{escape(err)}[/]", *[""] * 7)
                first = False
        console.print(table)
