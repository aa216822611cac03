"""Statistics as Parquet, one file per rank and window of steps, and retention for runs that never end.

:class:`ParquetSink` is fed each finished step's index by the finishing thread
and writes a file when a window of steps is full (or at the run's end): its
memory is one window's rows. Files are written whole and renamed into place,
so a reader (DuckDB on ``parquet/*.parquet``) never sees half of one.

:class:`Retention` keeps the newest steps of a run within a count or a byte
budget: each finished step directory, and each Parquet window once written,
is an item; the oldest go first.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DependencyError
from ..schema import names
from ..schema.columns import Columns, arrow_schema, parquet_file
from ..schema.records import RunManifest
from .atomic import make_dir, open_file, prune_dirs, remove_file, remove_matching, remove_tree, write_atomic

__all__ = ["ParquetSink", "Retention", "write_parquet", "arrow_table", "require_pyarrow", "tree_bytes"]

RUN_FILE_LIMIT = 16 << 20

MAX_WINDOW_ROWS = 1 << 16
"""A window is written early (as several files) once it holds this many rows: its Python lists stay within
about 50 MB whatever the window's length."""


def require_pyarrow() -> None:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DependencyError("Parquet needs pyarrow: pip install 'tensorlog[parquet]'") from None


def arrow_table(cols: Columns) -> Any:
    """The rows as a ``pyarrow.Table`` of :func:`arrow_schema`: what a Parquet file holds, and ``Run.to_pandas`` shows."""
    import pyarrow as pa

    return pa.table(cols.data, schema=arrow_schema())


def write_parquet(path: Path, cols: Columns) -> int:
    """Write the rows as one Parquet file, atomically; its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = arrow_table(cols)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    write_atomic(path, [memoryview(data)])
    return data.size


class ParquetSink:
    """One rank's Parquet files in ``directory``: a window of ``window`` steps per file. Used by one thread.

    ``on_file(first, last, path, nbytes, rows)`` is called for each file written.
    """

    def __init__(self, directory: Path, rank: int | None, window: int, on_file: Any = None) -> None:
        require_pyarrow()
        self.dir = directory
        self.rank = rank
        self.window = window
        self._on_file = on_file
        self._cols = Columns()
        self._first: int | None = None
        self._last: int | None = None

    def add(self, step: int, calls: Sequence[Mapping[str, Any]], info: Mapping[str, Any] | None) -> None:
        if self._first is not None and step // self.window != self._first // self.window:
            self.flush()
        self._cols.add_step(step, self.rank, calls, info)
        self._first = step if self._first is None else self._first
        self._last = step
        if len(self._cols) >= MAX_WINDOW_ROWS:
            self.flush()

    @property
    def rows(self) -> int:
        """Rows waiting for the current window's file."""
        return len(self._cols)

    def flush(self) -> None:
        if self._first is None or self._last is None:
            return
        make_dir(self.dir)
        path = self.dir / parquet_file(self.rank, self._first, self._last)
        size = write_parquet(path, self._cols) if len(self._cols) else 0
        if size and self._on_file is not None:
            self._on_file(self._first, self._last, path, size, len(self._cols))
        self._cols.clear()
        self._first = self._last = None


@dataclass
class Item:
    first: int
    last: int
    path: Path
    nbytes: int
    is_step: bool


class Retention:
    """Keep the last ``steps`` steps, and at most ``nbytes`` bytes, of step directories and Parquet windows.

    Removal is in two moves so that a kill between them never leaves a step that looks cut short:
    :meth:`add_step` / :meth:`add_file` say what goes and advance :attr:`removed_through` (which the
    caller writes into ``run.json``), then :meth:`delete` removes it. In a run directory that several
    ranks share, a rank removes only its own files of a step (its index first).
    """

    def __init__(self, steps: int | None, nbytes: int | None, rank: int | None) -> None:
        self.steps = steps
        self.nbytes = nbytes
        self.rank = rank
        self._items: deque[Item] = deque()
        self._total = 0
        self._step_items = 0
        self.removed_through: int | None = None
        """The last step whose data retention removed (None: nothing removed yet)."""
        self._unswept: list[tuple[int, Path]] = []

    def add_step(self, step: int, step_dir: Path) -> list[Item]:
        """A finished step's directory; what must now go (already counted as gone)."""
        return self._add(Item(step, step, step_dir, tree_bytes(step_dir, self.rank), True))

    def add_file(self, first: int, last: int, path: Path, nbytes: int) -> list[Item]:
        return self._add(Item(first, last, path, nbytes, False))

    def _add(self, item: Item) -> list[Item]:
        self._items.append(item)
        self._total += item.nbytes
        self._step_items += item.is_step
        gone: list[Item] = []
        while self._items and self._over():
            gone.append(self._forget(self._oldest()))
        if self.steps is not None and self._step_items:
            oldest_kept = min(i.first for i in self._items if i.is_step)
            gone += [self._forget(old) for old in [i for i in self._items if not i.is_step and i.last < oldest_kept]]
        return gone

    def _over(self) -> bool:
        too_many = self.steps is not None and self._step_items > self.steps
        too_big = self.nbytes is not None and self._total > self.nbytes and len(self._items) > 1
        return too_many or too_big

    def _oldest(self) -> Item:
        if self.steps is not None and self._step_items > self.steps:
            return min((i for i in self._items if i.is_step), key=lambda i: i.last)
        return min(self._items, key=lambda i: i.last)

    def _forget(self, item: Item) -> Item:
        self._items.remove(item)
        self._total -= item.nbytes
        self._step_items -= item.is_step
        self.removed_through = max(item.last, self.removed_through if self.removed_through is not None else -1)
        return item

    def delete(self, items: list[Item]) -> None:
        for item in items:
            if not item.is_step:
                with contextlib.suppress(OSError):
                    remove_file(item.path)
            elif self.rank is None:
                with contextlib.suppress(OSError):
                    remove_tree(item.path)
            else:
                _remove_rank_files(item.path, self.rank)
                self._unswept.append((item.last, item.path))

    def sweep(self, run_dir: Path, world_size: int) -> None:
        """In a shared run directory: remove the directories of removed steps once every rank has removed its
        files of them. Before that another rank may still be creating a directory there."""
        if not self._unswept:
            return
        done = min((_removed_through(run_dir, r) for r in range(world_size)), key=lambda x: -1 if x is None else x)
        if done is None:
            return
        keep = []
        for step, d in self._unswept:
            if step > done:
                keep.append((step, d))
                continue
            prune_dirs(d)  # only what is empty
        self._unswept = keep


def _removed_through(run_dir: Path, rank: int) -> int | None:
    try:
        with os.fdopen(open_file(run_dir / names.run_file(rank), os.O_RDONLY), "rb") as f:
            return RunManifest.model_validate_json(f.read(RUN_FILE_LIMIT).rstrip()).removed_through
    except (OSError, ValueError):
        return None


def _remove_rank_files(step_dir: Path, rank: int) -> None:
    """This rank's files of a shared step directory, its index first; the directories stay (see ``sweep``)."""
    with contextlib.suppress(OSError):
        remove_file(step_dir / names.index_file(rank))
    remove_matching(step_dir, lambda f: names.file_rank(f) != rank)


def tree_bytes(path: Path, rank: int | None = None) -> int:
    """Bytes of the files under ``path`` (a step directory: two levels, no links followed); with ``rank``,
    of that rank's files only."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False) and (rank is None or names.file_rank(e.name) == rank):
                        total += e.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total
