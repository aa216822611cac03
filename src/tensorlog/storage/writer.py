"""The writer: files off the model's thread, bounded by construction, each step finished in order.

Hooks snapshot a call and hand a :class:`CallRecord` to :meth:`Writer.submit`;
a small pool of threads writes each call's files (tensor files from the host
copies' own memory, the reference's json). When capture ends a step
(:meth:`Writer.end_step`), the step is *finished* by one thread, in step order,
once all its calls are written: hard links for tensors logged twice, the
statistics, ``module_calls.txt``, the step index, and ``run.json``
(:mod:`~tensorlog.storage.finisher`). Capture can wait for exactly that
(:meth:`Writer.wait_step`), so a step's files are on disk when the step returns
while its writes overlap the rest of the forward.

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
(steps written, drops, anomaly, completeness) belong to its :class:`StepFinisher`.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from pathlib import Path

import torch

from ..schema.records import Anomaly, RunManifest
from .arena import Arena, Chunk
from .files import RunFiles, describe_fault
from .finisher import StepFinisher
from .records import ChunkJob, StepEnd, WriteJob

__all__ = ["Writer", "describe_fault"]


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
        self.max_pending_bytes = max_pending_bytes
        self.drop = drop
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        """Guards the queue; waited on by hooks (room), capture (steps) and the finishing thread."""
        self._work_cv = threading.Condition(self._lock)
        """The same lock: writer threads wait here for jobs, so queueing one wakes one thread, not every waiter."""
        self._idle = 0
        self._jobs: deque[WriteJob | ChunkJob] = deque()
        self._pending = 0
        self._queued = 0
        self._outstanding: dict[int, int] = {}
        self._ends: deque[StepEnd] = deque()
        self._last_finished = -1
        self._stopped: str | None = None
        self._closing: tuple[bool, str | None] | None = None
        self._closed = False
        self._busy = 0
        self._files = RunFiles(run_dir, rank=rank, layout=layout, fmt=fmt, max_total_bytes=max_total_bytes)
        self._arena = Arena(max_pending_bytes, pinned=torch.cuda.is_available()) if layout == "packed" else None
        self._steps = StepFinisher(
            run_dir,
            manifest,
            rank=rank,
            layout=layout,
            detect_anomaly=detect_anomaly,
            account=self._files.account,
            bytes_written=lambda: self._files.bytes_written,
        )
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
        return self._steps.anomaly

    @property
    def bytes_written(self) -> int:
        return self._files.bytes_written

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

    def pack(self, step: int, src: torch.Tensor, *, stream: object) -> int | None:
        """``layout: packed``: copy ``src`` (flat bytes) into the step's staging stream; its offset, None when dropped.

        Full chunks go to the writer threads as they fill. Waits (``block``) while
        the arena is full, for writer threads only.
        """
        assert self._arena is not None
        return self._arena.append(
            src, lambda c: self._submit_chunk(step, c), wait=not self.drop, stopped=lambda: bool(self._stopped), stream=stream
        )

    def seal_pack(self, step: int, stream: object = None) -> None:
        """The step's last chunk goes to the writer threads; the next step starts a new stream."""
        if self._arena is not None:
            chunk = self._arena.seal(stream)
            if chunk is not None:
                self._submit_chunk(step, chunk)
            self._arena.begin_stream()

    def _submit_chunk(self, step: int, chunk: Chunk) -> None:
        with self._cv:
            if self._stopped:
                assert self._arena is not None
                self._arena.release(chunk)
                return
            self._jobs.append(ChunkJob(step, chunk))
            self._outstanding[step] = self._outstanding.get(step, 0) + 1
            if self._idle:
                self._work_cv.notify()

    def submit(self, job: WriteJob) -> None:
        """Queue a call part for the writer threads; one with nothing to write waits for its step's finish."""
        if not job.needs_worker:
            return
        with self._cv:
            if self._stopped:
                self._pending = max(0, self._pending - job.nbytes)
                return
            self._jobs.append(job)
            self._queued += job.nbytes
            step = job.step
            self._outstanding[step] = self._outstanding.get(step, 0) + 1
            if self._idle:
                self._work_cv.notify()

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
            while step > self._last_finished_or_dead() and not self._stopped:
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
            self._work_cv.notify_all()
        if self._arena is not None:
            self._arena.wake()
        warnings.warn(f"tensorlog: logging stopped for run {self.run_dir}: {reason}", RuntimeWarning, stacklevel=2)

    def close(self, *, complete: bool, reason: str | None = None, timeout: float = 60.0) -> None:
        """Finish every step, write the final ``run.json`` and end the threads; idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._closing = (complete, reason)
            self._cv.notify_all()
            self._work_cv.notify_all()
        self._finisher.join(timeout=timeout)
        for t in self._workers:
            t.join(timeout=timeout)
        if self._arena is not None:
            self._arena.close()

    # -- writer threads ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and self._closing is None:
                    self._idle += 1
                    self._work_cv.wait()
                    self._idle -= 1
                if not self._jobs:  # closing, and nothing left to write
                    return
                job = self._jobs.popleft()
                self._busy += 1
            nbytes = 0
            try:
                if isinstance(job, ChunkJob):
                    if not self._stopped:
                        self._files.write_chunk(job)
                else:
                    nbytes = job.nbytes
                    if not self._stopped:
                        self._files.write_call(job)
            except Exception as e:  # contained: the model must never see it
                self.stop(describe_fault(e))
            finally:
                self._done(job, nbytes)

    def _done(self, job: WriteJob | ChunkJob, nbytes: int) -> None:
        """Give back what a job held (its copies, its chunk, its reserved bytes) and count it done."""
        if isinstance(job, ChunkJob):
            assert self._arena is not None
            self._arena.release(job.chunk)
        else:
            for s in job.snaps:
                s.host = None
        with self._cv:
            self._busy -= 1
            self._pending = max(0, self._pending - nbytes)
            self._queued = max(0, self._queued - nbytes)
            self._outstanding[job.step] = self._outstanding.get(job.step, 1) - 1
            self._cv.notify_all()

    # -- the finishing thread ----------------------------------------------------------------

    def _finish_loop(self) -> None:
        self._steps.write_manifest(complete=False)
        while True:
            end = self._next_end()
            if end is None:  # stopped, or closing with nothing left
                return self._finish_run()
            packed = self._files.take_packed(end.step)
            try:
                self._steps.finish(end, packed)
                if packed is not None:
                    self._files.packed_closed(packed)
            except Exception as e:
                self.stop(describe_fault(e))
                if packed is not None:
                    packed.abort()
            with self._cv:
                self._last_finished = max(self._last_finished, end.step)
                self._outstanding.pop(end.step, None)
                self._cv.notify_all()

    def _next_end(self) -> StepEnd | None:
        """The oldest step whose calls are all written; None once logging stopped or the run is closing."""
        with self._cv:
            while not self._stopped:
                if self._ends and self._outstanding.get(self._ends[0].step, 0) <= 0:
                    return self._ends.popleft()
                if self._closing is not None and not self._ends and not self._jobs and not self._busy:
                    return None
                self._cv.wait()
            return None

    def _finish_run(self) -> None:
        with self._cv:
            closing = self._closing
        if self._stopped and closing is None:
            self._steps.write_manifest(complete=False, stopped=self._stopped)
            with self._cv:  # wait for close() to say the last word
                while self._closing is None:
                    self._cv.wait()
                closing = self._closing
        complete, reason = closing if closing is not None else (False, None)
        self._files.abort_packed()
        self._steps.write_manifest(
            complete=complete and not self._stopped and not self._steps.cut_short,
            stopped=self._stopped,
            reason=reason,
            final=True,
        )
        with self._cv:
            self._last_finished = 1 << 62
            self._cv.notify_all()
