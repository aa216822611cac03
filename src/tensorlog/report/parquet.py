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

from ..errors import UsageError
from ..formats import ModuleCall, Run, RunSource, iter_run
from ..schema.columns import Columns, parquet_file
from ..storage.atomic import make_dir
from ..storage.parquet import MAX_WINDOW_ROWS, require_pyarrow, write_parquet

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

    The run is read a step at a time and each rank's rows are written out by
    window (earlier once they reach :data:`MAX_WINDOW_ROWS` in all), so memory
    stays bounded however long the run is.

    Args:
        progress: called with (steps done, steps in total).

    Raises:
        DependencyError: pyarrow is missing.
        RunReadError: ``run`` is not a run.
        UsageError: ``dest`` cannot be written.
    """
    require_pyarrow()
    if isinstance(run, Run):
        shell, total, steps = run, len(run.steps), iter(run.steps.values())
    else:
        shell, total, steps = iter_run(run)
    dest = Path(dest).expanduser()
    out = Export()
    try:
        make_dir(dest)
        windows: dict[int | None, _Window] = {}
        for done, step in enumerate(steps, 1):
            by_rank: dict[int | None, list[dict[str, Any]]] = {}
            for c in step.calls:
                by_rank.setdefault(c.rank, []).append(_call_doc(c, out))
            for rank, calls in by_rank.items():
                w = windows.setdefault(rank, _Window())
                if w.first is not None and step.index // window != w.first // window:
                    out.files.append(w.write(dest, rank, out))
                w.add(step.index, rank, calls, step.info.model_dump() if step.info else None)
            if sum(len(w.cols) for w in windows.values()) >= MAX_WINDOW_ROWS:
                out.files += [w.write(dest, rank, out) for rank, w in windows.items() if w.first is not None]
            if progress:
                progress(done, total)
        out.files += [w.write(dest, rank, out) for rank, w in windows.items() if w.first is not None]
    except OSError as e:
        raise UsageError(f"cannot write Parquet files to {dest}: {e.strerror or e}") from None
    out.problems = list(shell.problems) + out.problems
    return out


class _Window:
    """One rank's rows of the current window."""

    def __init__(self) -> None:
        self.cols = Columns()
        self.first: int | None = None
        self.last: int | None = None

    def add(self, step: int, rank: int | None, calls: list[dict[str, Any]], info: dict[str, Any] | None) -> None:
        self.cols.add_step(step, rank, calls, info)
        self.first = step if self.first is None else self.first
        self.last = step

    def write(self, dest: Path, rank: int | None, out: Export) -> Path:
        assert self.first is not None and self.last is not None
        path = dest / parquet_file(rank, self.first, self.last)
        write_parquet(path, self.cols)
        out.rows += len(self.cols)
        self.cols.clear()
        self.first = self.last = None
        return path


def _call_doc(c: ModuleCall, out: Export) -> dict[str, Any]:
    tensors = []
    for rec in c.inputs + c.outputs + c.post_fwd_inputs:
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
