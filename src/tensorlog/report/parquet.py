"""``tensorlog export RUN --parquet DIR``: any run's statistics as Parquet, the columns a live run writes.

A statistics or checksum run already holds every statistic in its step
indexes; a tensor run's are computed from its files (a file that cannot be
read gives a row with null statistics, and a problem). The rows are exactly
those of ``parquet_window`` (see :mod:`tensorlog.schema.columns`), so a live
run's files and an export of the same run hold the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..formats import ModuleCall, Run, RunSource, load_run
from ..schema.columns import Columns, parquet_file
from ..storage.atomic import make_dir
from ..storage.parquet import require_pyarrow, write_parquet

__all__ = ["export_parquet", "Export"]


@dataclass
class Export:
    files: list[Path] = field(default_factory=list)
    rows: int = 0
    problems: list[str] = field(default_factory=list)


def export_parquet(
    run: Run | RunSource, dest: str | Path, *, window: int = 1000, progress: Callable[[int, int], None] | None = None
) -> Export:
    """Write ``run``'s statistics to ``dest`` as Parquet: per rank, one file per ``window`` steps.

    Args:
        progress: called with (steps done, steps in total).

    Raises:
        DependencyError: pyarrow is missing.
        RunReadError: ``run`` is not a run.
    """
    require_pyarrow()
    r = run if isinstance(run, Run) else load_run(run)
    out = Export(problems=list(r.problems))
    dest = Path(dest).expanduser()
    make_dir(dest)
    ranks = sorted({c.rank for c in r.calls()}, key=lambda k: -1 if k is None else k)
    steps = sorted(r.steps)
    total = len(steps) * max(1, len(ranks))
    done = 0
    for rank in ranks:
        cols, first, last = Columns(), None, None
        for s in steps:
            step = r.steps[s]
            if first is not None and s // window != first // window:
                out.files.append(_write(dest, rank, first, last, cols, out))
                first = None
            calls = [_call_doc(c, out) for c in step.calls if c.rank == rank]
            if calls:
                cols.add_step(s, rank, calls, step.info.model_dump() if step.info else None)
                first = s if first is None else first
                last = s
            done += 1
            if progress:
                progress(done, total)
        if first is not None:
            out.files.append(_write(dest, rank, first, last, cols, out))
    return out


def _write(dest: Path, rank: int | None, first: int, last: int | None, cols: Columns, out: Export) -> Path:
    path = dest / parquet_file(rank, first, last if last is not None else first)
    write_parquet(path, cols)
    out.rows += len(cols)
    cols.clear()
    return path


def _call_doc(c: ModuleCall, out: Export) -> dict[str, Any]:
    tensors = []
    for rec in c.tensors:
        d = rec.entry.model_dump(include={"name", "kind", "key", "tensor", "shape", "dtype", "numel", "checksum"})
        d["stats"] = rec.stats if rec.is_tensor else None
        if rec.is_tensor and d["stats"] is None and rec.has_data:
            out.problems.append(f"step {c.step} {c.dirname} {rec.name}: no statistics ({rec.error or 'its data cannot be read'})")
        tensors.append(d)
    return {
        "module": c.module,
        "dirname": c.dirname,
        "class_name": c.cls,
        "call_index": c.call_index,
        "seq_start": c.seq_start,
        "seq_end": c.seq_end,
        "tensors": tensors,
    }
