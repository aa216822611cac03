"""The writer: files off the model's thread, bounded by construction, each step finished in order.

Hooks snapshot a call and hand a :class:`CallRecord` to :meth:`Writer.submit`;
a small pool of threads writes each call's files (tensor files from the host
copies' own memory, the reference's json). When capture ends a step
(:meth:`Writer.end_step`), the step is *finished* by one thread, in step order,
once all its calls are written: hard links for tensors logged twice, the
statistics, ``module_calls.txt``, the step index, and ``run.json``. Capture can
wait for exactly that (:meth:`Writer.wait_step`), so a step's files are on disk
when the step returns while its writes overlap the rest of the forward.

Bounds that hold by construction:

* Memory: host copies are reserved (:meth:`Writer.reserve`) before they are
  made and given back once written. Pending bytes never exceed
  ``max_pending_bytes`` plus one call: a call larger than the budget waits
  until nothing else is pending and then goes through alone. A waiting hook
  waits only for writer threads, which never wait for hooks, so it cannot
  deadlock.
* Failure: any error in a writer thread (disk full, file too large, the
  ``max_total_bytes`` budget) stops logging for good, releases everything
  pending, and is recorded in ``run.json``; it never reaches the model.

Only the finishing thread writes ``run.json``: the manifest's progress fields
(steps written, bytes, drops, anomaly, completeness) belong to the writer.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from ..schema import names
from ..schema import reference as ref
from ..schema.records import (
    Anomaly,
    CallEntry,
    CallStructure,
    Checksum,
    Dropped,
    PackedRef,
    RunManifest,
    Stats,
    StepIndex,
    StepInfo,
    TensorEntry,
    ValueDesc,
)
from . import stats as _stats
from .atomic import link_atomic, write_atomic, write_in_place
from .packed import PackedFile
from .records import CallRecord, StepEnd, TensorSnap, WriteJob
from .tensorfile import encode_pt, encode_safetensors

__all__ = ["Writer", "describe_fault"]


class _BudgetReached(Exception):
    pass


def describe_fault(e: BaseException) -> str:
    if isinstance(e, _BudgetReached):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"disk full or file too large: {e}"
    return f"{type(e).__name__}: {e}"


class Writer:
    """Writes one run's files for one rank. Producer methods are called from the model's thread."""

    def __init__(
        self,
        run_dir: Path,
        manifest: RunManifest,
        *,
        rank: int | None,
        layout: str,
        fmt: str,
        threads: int,
        max_pending_bytes: int,
        drop: bool,
        max_total_bytes: int | None,
        detect_anomaly: bool,
    ) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.layout = layout
        self.fmt = fmt
        self.max_pending_bytes = max_pending_bytes
        self.drop = drop
        self.max_total_bytes = max_total_bytes
        self.detect_anomaly = detect_anomaly
        self._cv = threading.Condition()
        self._jobs: deque[WriteJob] = deque()
        self._pending = 0
        self._queued = 0
        self._outstanding: dict[int, int] = {}
        self._ends: deque[StepEnd] = deque()
        self._finished_steps: set[int] = set()
        self._last_finished = -1
        self._stopped: str | None = None
        self._closing: tuple[bool, str | None] | None = None
        self._closed = False
        self._busy = 0
        self._bytes_written = 0
        self._packed: dict[int, PackedFile] = {}
        self._header_hint = 64 << 10
        # Owned by the finishing thread once it starts:
        self._manifest = manifest
        self._steps_written: list[int] = []
        self._dropped: list[Dropped] = []
        self._incomplete_steps: dict[int, str] = {}
        self._anomaly: Anomaly | None = None
        self._manifest_room = 0
        self._workers = [
            threading.Thread(target=self._work, name=f"tensorlog-writer-{i}", daemon=True) for i in range(max(1, threads))
        ]
        self._finisher = threading.Thread(target=self._finish_loop, name="tensorlog-finisher", daemon=True)
        for t in self._workers:
            t.start()
        self._finisher.start()

    # -- producer side (the model's thread) -------------------------------------------------

    @property
    def stopped(self) -> str | None:
        """Why logging stopped (disk full, budget, an error), or None while it runs."""
        return self._stopped

    @property
    def anomaly(self) -> Anomaly | None:
        """The first NaN/Inf found, once the step that holds it is finished."""
        return self._anomaly

    @property
    def bytes_written(self) -> int:
        return self._bytes_written

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def reserve(self, nbytes: int) -> bool:
        """Make room for ``nbytes`` of host copies before they are made; False: drop them.

        Blocks (``on_backpressure: block``) while the budget is full and something
        submitted is still being written; a part larger than the whole budget goes
        through once nothing is. It waits only for submitted work, which the writer
        threads finish without waiting for anything, so it cannot deadlock.
        """
        with self._cv:
            while not self._stopped and self._queued and self._pending + nbytes > self.max_pending_bytes:
                if self.drop:
                    return False
                self._cv.wait()
            if self._stopped:
                return False
            self._pending += nbytes
            return True

    def unreserve(self, nbytes: int) -> None:
        if nbytes:
            with self._cv:
                self._pending = max(0, self._pending - nbytes)
                self._cv.notify_all()

    def submit(self, job: WriteJob) -> None:
        if not job.snaps and not job.docs:
            return
        with self._cv:
            if self._stopped:
                self._pending = max(0, self._pending - job.nbytes)
                return
            self._jobs.append(job)
            self._queued += job.nbytes
            step = job.record.step
            self._outstanding[step] = self._outstanding.get(step, 0) + 1
            self._cv.notify_all()

    def end_step(self, end: StepEnd) -> None:
        """The step's last call was submitted: finish it once its calls are written."""
        with self._cv:
            if self._stopped:
                return
            self._ends.append(end)
            self._cv.notify_all()

    def wait_step(self, step: int, timeout: float | None = None) -> bool:
        """Block until ``step`` is finished on disk (or logging stopped). False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while step not in self._finished_steps and step > self._last_finished_or_dead() and not self._stopped:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cv.wait(remaining)
        return True

    def _last_finished_or_dead(self) -> int:
        if not any(t.is_alive() for t in self._workers) or not self._finisher.is_alive():
            return 1 << 62
        return self._last_finished

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything submitted so far is on disk (or logging stopped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while (self._jobs or self._busy or self._ends) and not self._stopped:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cv.wait(remaining)
        return True

    def stop(self, reason: str) -> None:
        """Stop for good (from any thread): nothing more is written but the final ``run.json``."""
        with self._cv:
            if self._stopped:
                return
            self._stopped = reason
            self._jobs.clear()
            self._ends.clear()
            self._pending = 0
            self._queued = 0
            self._cv.notify_all()
        warnings.warn(f"tensorlog: logging stopped for run {self.run_dir}: {reason}", RuntimeWarning, stacklevel=2)

    def close(self, *, complete: bool, reason: str | None = None, timeout: float = 60.0) -> None:
        """Finish every step, write the final ``run.json`` and end the threads; idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._closing = (complete, reason)
            self._cv.notify_all()
        self._finisher.join(timeout=timeout)
        for t in self._workers:
            t.join(timeout=timeout)

    # -- writer threads ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and self._closing is None:
                    self._cv.wait()
                if not self._jobs:  # closing, and nothing left to write
                    return
                job = self._jobs.popleft()
                self._busy += 1
            try:
                if not self._stopped:
                    self._write_job(job)
            except Exception as e:  # contained: the model must never see it
                self.stop(describe_fault(e))
            finally:
                for s in job.snaps:
                    s.host = None  # the copy is written: give its memory back now
                with self._cv:
                    self._busy -= 1
                    self._pending = max(0, self._pending - job.nbytes)
                    self._queued = max(0, self._queued - job.nbytes)
                    step = job.record.step
                    self._outstanding[step] = self._outstanding.get(step, 1) - 1
                    self._cv.notify_all()

    def _write_job(self, job: WriteJob) -> None:
        rec = job.record
        if job.ready is not None:
            job.ready.synchronize()
        for s in job.snaps:
            if s.host is not None:
                if s.stats_from_host:
                    s.stats = _stats.host_stats(s.host)
                if s.want_values:
                    s.values = _stats.small_values(s.host)
                if s.want_checksum:
                    s.checksum = _stats.checksum(s.host)
        if self.layout == "statistics":
            return
        step_dir = self.run_dir / names.step_dir(rec.step)
        if self.layout == "packed":
            packed = self._packed_file(rec.step)
            for s in job.snaps:
                if s.host is not None and s.file is not None and s.same_as is None:
                    self._account(s.host.numel() * s.host.element_size())
                    packed.append(s.file, s.host)
                    s.written = s.file
            return
        d = step_dir / rec.dirname
        _mkdir(d)
        for s in job.snaps:
            if s.sidecar is not None:
                data = ref.dumps(s.sidecar)
                self._account(len(data))
                write_atomic(d / names.sidecar_file(s.stem, self.rank), [data])
            if s.host is not None and s.file is not None and s.same_as is None:
                chunks = encode_safetensors(s.host) if self.fmt == "safetensors" else encode_pt(s.host)
                self._account(sum(len(c) for c in chunks))
                write_atomic(d / s.file, chunks)
                s.written = f"{rec.dirname}/{s.file}"
        for kind, doc in job.docs.items():
            data = ref.dumps(doc)
            self._account(len(data))
            write_atomic(d / names.ref_meta_file(kind, self.rank), [data])

    def _packed_file(self, step: int) -> PackedFile:
        with self._cv:
            f = self._packed.get(step)
            if f is None:
                d = self.run_dir / names.step_dir(step)
                _mkdir(d)
                f = self._packed[step] = PackedFile(d / names.packed_file(self.rank), self._header_hint)
            return f

    def _account(self, nbytes: int) -> None:
        with self._cv:
            if self.max_total_bytes is not None and self._bytes_written + nbytes > self.max_total_bytes:
                raise _BudgetReached(f"max_total_bytes reached ({self._bytes_written} of {self.max_total_bytes} bytes written)")
            self._bytes_written += nbytes

    # -- the finishing thread ----------------------------------------------------------------

    def _finish_loop(self) -> None:
        self._write_manifest(complete=False)
        while True:
            with self._cv:
                while True:
                    if self._stopped:
                        break
                    if self._ends and self._outstanding.get(self._ends[0].step, 0) <= 0:
                        break
                    if self._closing is not None and not self._ends and not self._jobs and not self._busy:
                        break
                    self._cv.wait()
                if self._stopped:
                    end = None
                elif self._ends and self._outstanding.get(self._ends[0].step, 0) <= 0:
                    end = self._ends.popleft()
                else:
                    end = None
            if end is not None:
                try:
                    self._finish_step(end)
                except Exception as e:
                    self.stop(describe_fault(e))
                    self._abort_packed(end.step)
                with self._cv:
                    self._finished_steps.add(end.step)
                    self._last_finished = max(self._last_finished, end.step)
                    self._outstanding.pop(end.step, None)
                    self._cv.notify_all()
                continue
            # stopped, or closing with nothing left
            with self._cv:
                closing = self._closing
            if self._stopped and closing is None:
                self._write_manifest(complete=False)
                with self._cv:  # wait for close() to say the last word
                    while self._closing is None:
                        self._cv.wait()
                    closing = self._closing
            complete, reason = closing if closing is not None else (False, None)
            for step in list(self._packed):
                self._abort_packed(step)
            self._write_manifest(
                complete=complete and not self._stopped and not self._incomplete_steps, reason=reason, final=True
            )
            with self._cv:
                self._last_finished = 1 << 62
                self._cv.notify_all()
            return

    def _abort_packed(self, step: int) -> None:
        with self._cv:
            f = self._packed.pop(step, None)
        if f is not None:
            f.abort()

    def _finish_step(self, end: StepEnd) -> None:
        step_dir = self.run_dir / names.step_dir(end.step)
        partial = self._device_stats(end)
        snaps = [s for rec in end.calls for s in rec.tensors]
        for s in snaps:
            if s.stats_row is not None and partial is not None:
                s.stats = _stats.finish(partial[s.stats_row], s.numel or 0)
        for s in snaps:
            src = _origin(s)
            if src is not s:
                s.stats, s.values, s.checksum = src.stats, src.values, src.checksum
        if self.layout == "reference":
            for rec in end.calls:
                for s in rec.tensors:
                    src = _origin(s)
                    if src is not s and s.file is not None and src.written is not None and s.skipped is None:
                        link_atomic(step_dir / src.written, step_dir / rec.dirname / s.file)
                        s.written = f"{rec.dirname}/{s.file}"
        packed = None
        with self._cv:
            f = self._packed.pop(end.step, None)
        if f is not None:
            f.close()
            packed = names.packed_file(self.rank)
            self._header_hint = max(self._header_hint, f.header_room)
        if not end.calls and not end.dropped and end.complete:
            return  # nothing was logged in this step (no selected module ran)
        _mkdir(step_dir)
        if self.layout == "reference" and end.order:
            data = "".join(f"{n}\n" for n in end.order).encode()
            self._account(len(data))
            write_atomic(step_dir / names.calls_file(self.rank), [data])
        index = StepIndex.model_construct(
            step=end.step,
            rank=self.rank,
            layout=self.layout,
            complete=end.complete,
            incomplete_reason=end.incomplete_reason,
            calls=[_call_entry(rec, packed) for rec in end.calls],
            info=StepInfo.model_validate(end.info) if end.info else None,
            dropped=[Dropped(**d) for d in end.dropped],
            format="tensorlog-step-index",
            version=1,
        )
        data = index.model_dump_json().encode()
        self._account(len(data))
        write_atomic(step_dir / names.index_file(self.rank), [data])
        self._dropped.extend(index.dropped)
        if not end.complete:
            self._incomplete_steps[end.step] = end.incomplete_reason or "cut short"
        if self.detect_anomaly and self._anomaly is None:
            self._find_anomaly(end)
        self._steps_written.append(end.step)
        self._write_manifest(complete=False)

    def _device_stats(self, end: StepEnd) -> list[list[float]] | None:
        if end.stats is None:
            return None
        if end.ready is not None:
            end.ready.synchronize()
        lengths, gathered = end.stats
        return _stats.split_rows(lengths, [(rows, t.tolist()) for rows, t in gathered])

    def _find_anomaly(self, end: StepEnd) -> None:
        """The first call, in completion order, whose outputs hold a NaN or Inf: where it was born."""
        for rec in sorted(end.calls, key=lambda r: r.seq_end if r.seq_end is not None else 1 << 62):
            bad_out = [s.name for s in rec.tensors if s.kind == "outputs" and _nonfinite(s)]
            if not bad_out:
                continue
            bad_in = [s.name for s in rec.tensors if s.kind == "inputs" and _nonfinite(s)]
            self._anomaly = Anomaly(
                step=end.step, module=rec.dirname, born_here=not bad_in, nonfinite_outputs=bad_out, nonfinite_inputs=bad_in
            )
            where = "born in" if not bad_in else "first seen in (its inputs were already bad)"
            warnings.warn(
                f"tensorlog: NaN/Inf {where} {rec.dirname!r} at step {end.step} (outputs {bad_out})", RuntimeWarning, stacklevel=2
            )
            return

    def _write_manifest(self, *, complete: bool, reason: str | None = None, final: bool = False) -> None:
        """Rewrite ``run.json`` (only ever from the finishing thread).

        It is padded with spaces so that, when the disk is full and a new file
        cannot be made, the final state can still be written over it in place.
        """
        m = self._manifest
        why = None
        if not complete:
            parts = [p for p in (self._stopped, reason) if p]
            parts += [f"step {s} cut short: {r}" for s, r in sorted(self._incomplete_steps.items())]
            why = "; ".join(dict.fromkeys(parts)) or (
                "run still in progress or process died" if not final else "not closed cleanly"
            )
        update = {
            "steps_written": _ranges(self._steps_written),
            "bytes_written": self._bytes_written,
            "dropped": list(self._dropped),
            "anomaly": self._anomaly,
            "complete": complete,
            "incomplete_reason": why,
            "end_time": _now() if final else None,
        }
        data = m.model_copy(update=update).model_dump_json(indent=1).encode()
        pad = max(len(data) // 4, 1024)
        path = self.run_dir / names.run_file(self.rank)
        try:
            write_atomic(path, [data, b" " * pad])
            self._manifest_room = len(data) + pad
        except OSError:
            try:  # no room for a new file: overwrite the old one, which was padded for this
                small = m.model_copy(update={**update, "dropped": [], "steps_written": _ranges(self._steps_written)})
                write_in_place(path, small.model_dump_json().encode())
            except OSError:
                pass


def _origin(s: TensorSnap) -> TensorSnap:
    while s.same_as is not None:
        s = s.same_as
    return s


def _nonfinite(s: TensorSnap) -> bool:
    st = s.stats
    return st is not None and (st[6] > 0 or st[7] > 0)


def _ranges(steps: list[int]) -> list[list[int]]:
    """``[0, 1, 2, 5]`` as ``[[0, 2], [5, 5]]``: a run that logs every step for hours stays small."""
    out: list[list[int]] = []
    for s in sorted(set(steps)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def _mkdir(d: Path) -> None:
    try:
        os.mkdir(d)
    except FileExistsError:
        pass
    except FileNotFoundError:
        d.mkdir(parents=True, exist_ok=True)


def _stats_model(row: list[float] | None) -> Stats | None:
    if row is None:
        return None
    return Stats.model_construct(
        min=row[0],
        max=row[1],
        mean=row[2],
        std=row[3],
        abs_max=row[4],
        l2_norm=row[5],
        nan_count=int(row[6]),
        inf_count=int(row[7]),
    )


def _call_entry(rec: CallRecord, packed: str | None) -> CallEntry:
    tensors = []
    for s in rec.tensors:
        fields: dict[str, Any] = dict(
            name=s.name,
            kind=s.kind,
            key=s.key,
            path=list(s.path),
            tensor=s.tensor,
            shape=s.shape,
            dtype=s.dtype,
            device=s.device,
            stride=s.stride,
            numel=s.numel,
            stats=_stats_model(s.stats),
            values=s.values,
            skipped=s.skipped,
            parameter=s.parameter,
            file=None,
            packed=None,
            checksum=None,
            value=ValueDesc.model_validate(s.value) if s.value is not None else None,
        )
        if s.checksum is not None:
            fields["checksum"] = Checksum.model_construct(algorithm=_stats.CHECKSUM_ALGORITHM, digest=s.checksum)
        origin = _origin(s)
        if packed is not None and origin.written is not None:
            fields["packed"] = PackedRef.model_construct(file=packed, key=origin.written)
        elif s.written is not None:
            fields["file"] = s.written
        tensors.append(TensorEntry.model_construct(**fields))
    structure = CallStructure.model_construct(**rec.structure) if rec.structure is not None else None
    return CallEntry.model_construct(
        module=rec.module,
        dirname=rec.dirname,
        class_name=rec.cls,
        call_index=rec.call_index,
        seq_start=rec.seq_start,
        seq_end=rec.seq_end,
        backward=rec.backward,
        structure=structure,
        tensors=tensors,
        grafted=rec.grafted,
    )


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
