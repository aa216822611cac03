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

from ..errors import UsageError
from ..formats import Run, RunSource, iter_run
from ..formats.model import step_docs
from ..storage.atomic import make_dir
from ..storage.parquet import MAX_WINDOW_ROWS, ParquetSink, require_pyarrow

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

    def written(first: int, last: int, path: Path, nbytes: int, rows: int) -> None:
        out.files.append(path)
        out.rows += rows

    try:
        make_dir(dest)
        sinks: dict[int | None, ParquetSink] = {}
        for done, step in enumerate(steps, 1):
            for rank, calls in step_docs(step, out.problems).items():
                if rank not in sinks:
                    sinks[rank] = ParquetSink(dest, rank, window, on_file=written)
                sinks[rank].add(step.index, calls, step.info.model_dump() if step.info else None)
            if sum(sink.rows for sink in sinks.values()) >= MAX_WINDOW_ROWS:  # every rank's rows together
                for sink in sinks.values():
                    sink.flush()
            if progress:
                progress(done, total)
        for sink in sinks.values():
            sink.flush()
    except OSError as e:
        raise UsageError(f"cannot write Parquet files to {dest}: {e.strerror or e}") from None
    out.problems = list(shell.problems) + out.problems
    return out
