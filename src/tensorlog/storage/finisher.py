"""Finishing a step, and ``run.json``: the work of the writer's one finishing thread.

A step is finished once all its calls are written: statistics are read back
(one device-to-host copy per step, made by capture at the step's end), tensors
logged twice are hard-linked, ``module_calls.txt`` and the step index are
written, and NaN/Inf are looked for. :class:`StepFinisher` is used by that
thread alone, so it owns the manifest's progress fields with no lock.

``run.json`` is rewritten at most once per :data:`MANIFEST_INTERVAL` while the
run is healthy (a file creation per step costs as much as the statistics of a
small model), at once when something a reader must know happens (logging
stopped, a step cut short, an anomaly, a drop), and always when the run ends.
The step indexes are what readers trust for which steps exist.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from ..schema import names
from ..schema.columns import PARQUET_DIR
from ..schema.records import Anomaly, Dropped, RunManifest, StepInfo
from . import stats as _stats
from .atomic import RunRoot, link_atomic, make_dir, open_file, process_alive, write_atomic, write_in_place
from .index import index_doc, index_json, origin
from .packed import PackedFile
from .parquet import Item, ParquetSink, Retention
from .records import StepEnd, TensorPlan
from .tensorfile import st_dtype_name

__all__ = ["StepFinisher", "derive", "MANIFEST_INTERVAL", "close_orphaned"]

MANIFEST_INTERVAL = 1.0
"""Seconds between rewrites of ``run.json`` while nothing but progress changes."""


def derive(s: TensorPlan) -> None:
    """What is taken from a host copy besides its file: small values, checksum."""
    r = s.result
    if r.host_copy is None:
        return
    if s.want_values:
        r.values = _stats.small_values(r.host_copy)
    if s.want_checksum:
        r.checksum = _stats.checksum(r.host_copy)


class StepFinisher:
    def __init__(
        self,
        run_dir: Path,
        manifest: RunManifest,
        *,
        rank: int | None,
        layout: str,
        detect_anomaly: bool,
        account: Callable[[int], None],
        bytes_written: Callable[[], int],
        parquet_window: int | None = None,
        retain_steps: int | None = None,
        retain_bytes: int | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.layout = layout
        self.detect_anomaly = detect_anomaly
        self._account = account
        self._bytes_written = bytes_written
        self._manifest = manifest
        self._steps_written: list[list[int]] = []
        """``[first, last]`` ranges: a run that logs every step for hours keeps a short list."""
        self._dropped: list[Dropped] = []
        self._incomplete: dict[int, str] = {}
        self._last_manifest = -MANIFEST_INTERVAL
        self._bad_info = False
        self.anomaly: Anomaly | None = None
        """The first NaN/Inf found; other threads read it (one reference, set once)."""
        self._retention = Retention(retain_steps, retain_bytes, rank) if retain_steps or retain_bytes else None
        self._gone: list[Item] = []
        """What retention decided to remove, deleted once ``run.json`` says so."""
        self._parquet = (
            ParquetSink(run_dir / PARQUET_DIR, rank, parquet_window, on_file=self._parquet_written)
            if parquet_window is not None
            else None
        )

    def finish(self, end: StepEnd, packed: PackedFile | None) -> None:
        """Write everything of ``end`` that is not yet on disk, the step index last."""
        for ev in end.ready:
            ev.synchronize()
        for given in (end.progress, end.manifest):
            if given is not None:
                self._manifest = RunManifest.model_validate({**self._manifest.model_dump(), **given})
        self._fill_in(end)
        step_dir = self.run_dir / names.step_dir(end.step)
        if self.layout == "reference":
            self._link_repeats(end, step_dir)
        packed_name = None
        if packed is not None:
            packed.close(_packed_entries(end))
            packed_name = names.packed_file(self.rank)
        if not end.calls and not end.dropped and end.complete:  # nothing was logged (no selected module ran)
            if end.manifest is not None:
                self.write_manifest(complete=False)
            return
        make_dir(step_dir)
        if self.layout == "reference" and end.order:
            data = "".join(f"{n}\n" for n in end.order).encode()
            self._account(len(data))
            write_atomic(step_dir / names.calls_file(self.rank), [data])
        if end.info:
            try:
                end.info = StepInfo.model_validate(end.info).model_dump(exclude_defaults=True)
            except ValueError as e:  # facts for alignment only: a layout that makes no sense is left out, said once
                if not self._bad_info:
                    self._bad_info = True
                    warnings.warn(
                        f"tensorlog: step {end.step}'s request layout is inconsistent, not recorded: {e}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                end.info = None
        doc = index_doc(end, rank=self.rank, layout=self.layout, packed=packed_name)
        data = index_json(doc)
        self._account(len(data))
        write_atomic(step_dir / names.index_file(self.rank), [data])
        news = bool(end.dropped) or not end.complete or end.manifest is not None
        if self._parquet is not None:
            self._parquet.add(end.step, doc["calls"], end.info)
        if self._retention is not None:
            self._gone += self._retention.add_step(end.step, step_dir)
            news |= bool(self._gone)
        self._dropped.extend(Dropped(**d) for d in end.dropped)
        if not end.complete:
            self._incomplete[end.step] = end.incomplete_reason or "cut short"
        if self.detect_anomaly and self.anomaly is None:
            news |= self._find_anomaly(end)
        _add_to_ranges(self._steps_written, end.step)
        self._journal(end.step)
        if news or time.monotonic() - self._last_manifest >= MANIFEST_INTERVAL:
            self.write_manifest(complete=False)
        self._delete_gone()

    def _delete_gone(self) -> None:
        if self._retention is None:
            return
        if self._gone:
            self._retention.delete(self._gone)
            self._gone = []
        if self.rank is not None:
            self._retention.sweep(self.run_dir, self._manifest.world_size or 1)

    def _parquet_written(self, first: int, last: int, path: Path, nbytes: int, rows: int) -> None:
        self._account(nbytes)
        if self._retention is not None:
            self._gone += self._retention.add_file(first, last, path, nbytes)

    def _journal(self, step: int) -> None:
        """One line per whole step, appended as the step ends: ``run.json`` is rewritten at most once a second, so
        after a kill -9 between steps this is what lists the steps run.json had no time to."""
        fd = open_file(self.run_dir / names.journal_file(self.rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:  # opened for each line: a file held open for writing would keep its file system from going read-only
            os.write(fd, names.journal_line(step))
        finally:
            os.close(fd)

    def close(self) -> None:
        """The run ends: the last Parquet window is written (before the final ``run.json``)."""
        if self._parquet is not None:
            self._parquet.flush()

    def after_final_manifest(self) -> None:
        self._delete_gone()

    def _fill_in(self, end: StepEnd) -> None:
        """Statistics from the step's one read-back; values of copies no writer thread took; repeats share."""
        partial = None
        if end.stats is not None:
            lengths, gathered = end.stats
            partial = _stats.split_rows(lengths, [(rows, t.tolist()) for rows, t in gathered])
        snaps = [s for rec in end.calls for s in rec.tensors]
        for s in snaps:
            r = s.result
            if r.host_copy is not None:
                derive(s)
                r.host_copy = None
            if r.stats_row is not None and partial is not None:
                r.stats = _stats.finish(partial[r.stats_row], s.numel or 0)
        for s in snaps:
            src = origin(s)
            if src is not s:
                r, first = s.result, src.result
                r.stats, r.values, r.checksum = first.stats, first.values, first.checksum

    def _link_repeats(self, end: StepEnd, step_dir: Path) -> None:
        """A tensor logged again unchanged (a module's input is the previous one's output) is a hard link."""
        for rec in end.calls:
            for s in rec.tensors:
                src = origin(s)
                if src is not s and s.file is not None and src.result.written is not None and s.skipped is None:
                    link_atomic(step_dir / src.result.written, step_dir / rec.dirname / s.file)
                    s.result.written = f"{rec.dirname}/{s.file}"

    def _find_anomaly(self, end: StepEnd) -> bool:
        """The first call, in completion order, whose outputs hold a NaN or Inf: where it was born."""
        for rec in sorted(end.calls, key=lambda r: r.seq_end if r.seq_end is not None else 1 << 62):
            bad_out = [s.name for s in rec.tensors if s.kind == "outputs" and _nonfinite(s)]
            if not bad_out:
                continue
            bad_in = [s.name for s in rec.tensors if s.kind == "inputs" and _nonfinite(s)]
            self.anomaly = Anomaly(
                step=end.step, module=rec.dirname, born_here=not bad_in, nonfinite_outputs=bad_out, nonfinite_inputs=bad_in
            )
            where = "born in" if not bad_in else "first seen in (its inputs were already bad)"
            warnings.warn(
                f"tensorlog: NaN/Inf {where} {rec.dirname!r} at step {end.step} (outputs {bad_out})", RuntimeWarning, stacklevel=2
            )
            return True
        return False

    def write_manifest(
        self, *, complete: bool, stopped: str | None = None, reason: str | None = None, final: bool = False
    ) -> None:
        """Rewrite ``run.json``.

        It is padded with spaces so that, when the disk is full and a new file
        cannot be made, the final state can still be written over it in place.
        """
        why = None
        if not complete:
            parts = [p for p in (stopped, reason) if p]
            parts += [f"step {s} cut short: {r}" for s, r in sorted(self._incomplete.items())]
            why = "; ".join(dict.fromkeys(parts)) or (
                "run still in progress or process died" if not final else "not closed cleanly"
            )
        update = {
            "steps_written": [list(r) for r in self._steps_written],
            "bytes_written": self._bytes_written(),
            "dropped": list(self._dropped),
            "anomaly": self.anomaly,
            "complete": complete,
            "incomplete_reason": why,
            "end_time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds") if final else None,
            "removed_through": self._retention.removed_through if self._retention is not None else None,
        }
        m = self._manifest.model_copy(update=update)
        data = m.model_dump_json(indent=1).encode()
        path = self.run_dir / names.run_file(self.rank)
        self._last_manifest = time.monotonic()
        try:
            write_atomic(path, [data, b" " * max(len(data) // 4, 1024)])
        except OSError:
            try:  # no room for a new file: overwrite the old one, which was padded for this
                write_in_place(path, m.model_copy(update={"dropped": []}).model_dump_json().encode())
            except OSError:
                pass

    @property
    def cut_short(self) -> bool:
        return bool(self._incomplete)


def _packed_entries(end: StepEnd) -> list[tuple[str, str, list[int], int, int]]:
    """The packed file's header entries, each tensor keyed ``<call dir>/<name>`` (what its index entry names)."""
    out = []
    for rec in end.calls:
        for s in rec.tensors:
            r = s.result
            if r.packed_at is not None and s.same_as is None and s.dtype is not None:
                r.written = f"{rec.dirname}/{s.name}"
                out.append((r.written, st_dtype_name(s.dtype), list(s.shape or ()), *r.packed_at))
    return out


def _nonfinite(s: TensorPlan) -> bool:
    st = s.result.stats
    return st is not None and st.nonfinite


def _add_to_ranges(ranges: list[list[int]], step: int) -> None:
    """Steps finish in order: ``step`` extends the last range or starts a new one."""
    if ranges and ranges[-1][0] <= step <= ranges[-1][1] + 1:
        ranges[-1][1] = max(ranges[-1][1], step)
    else:
        ranges.append([step, step])
        ranges.sort()


ORPHAN_WAIT = 5.0
"""How long a surviving process waits for a writer's process to be gone before it closes that writer's run."""


def close_orphaned(run_dir: Path, why: str, *, wait: float = ORPHAN_WAIT) -> list[str]:
    """Give the runs in ``run_dir`` whose writer was killed before its final ``run.json`` (vLLM kills its workers at
    shutdown when ``--shutdown-timeout`` is 0) the last word: incomplete, ``why``, and every whole step its journal
    lists. Only this host's runs, and only once their process is gone; the surviving process becomes their owner.
    Returns the ``run.json`` files it closed."""
    import socket

    closed: list[str] = []
    try:
        root = RunRoot.claim(run_dir)
    except OSError:
        return closed
    try:
        for name in sorted(os.listdir(run_dir)):
            m = names.RUN_FILE_RE.match(name)
            if not m:
                continue
            path = run_dir / name
            try:
                with os.fdopen(open_file(path, os.O_RDONLY), "rb") as f:
                    manifest = RunManifest.model_validate_json(f.read(16 << 20).rstrip())
            except (OSError, ValueError):
                continue
            if manifest.end_time is not None or manifest.host != socket.gethostname() or not manifest.pid:
                continue
            if not _gone(manifest.pid, wait):
                continue
            rank = int(m.group(1)) if m.group(1) is not None else None
            steps = set(manifest.steps_done()) | _journaled(run_dir / names.journal_file(rank))
            ranges: list[list[int]] = []
            for s in sorted(steps):
                _add_to_ranges(ranges, s)
            final = manifest.model_copy(
                update={
                    "complete": False,
                    "incomplete_reason": f"its process (pid {manifest.pid}) was killed before it closed the run ({why})",
                    "steps_written": ranges,
                    "end_time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                }
            )
            try:
                write_atomic(path, [final.model_dump_json(indent=1).encode()])
                closed.append(str(path))
            except OSError:
                continue
    finally:
        root.release()
    return closed


def _gone(pid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _journaled(path: Path) -> set[int]:
    try:
        with os.fdopen(open_file(path, os.O_RDONLY), "rb") as f:
            return names.journal_steps(f.read(32 << 20))
    except OSError:
        return set()
