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
  until nothing else is pending and then goes through alone. The packed
  layout's staging arena holds at most ``max_pending_bytes``. A waiting hook
  waits only for writer threads, which never wait for hooks, so it cannot
  deadlock (:mod:`~tensorlog.storage.queue`).
* Failure: any error in a writer thread (disk full, file too large, the
  ``max_total_bytes`` budget) stops logging for good, releases everything
  pending, and is recorded in ``run.json``; it never reaches the model.

Only the finishing thread writes ``run.json``: the manifest's progress fields
(steps written, drops, anomaly, completeness) belong to its :class:`StepFinisher`.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

from ..schema.records import Anomaly, RunManifest
from .arena import Arena, Chunk
from .atomic import RunRoot
from .files import RunFiles, describe_fault
from .finisher import StepFinisher
from .queue import Job, JobQueue
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
        parquet_window: int | None = None,
        retain_steps: int | None = None,
        retain_bytes: int | None = None,
    ) -> None:
        self.run_dir = run_dir
        self._root = RunRoot.claim(run_dir)  # every path below is reached from it, never through a link
        self.layout = layout
        self.drop = drop
        self._queue = JobQueue(max_pending_bytes, drop=drop)
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
            parquet_window=parquet_window,
            retain_steps=retain_steps,
            retain_bytes=retain_bytes,
        )
        self._workers = [
            threading.Thread(target=self._work, name=f"tensorlog-writer-{i}", daemon=True) for i in range(max(1, threads))
        ]
        self._finisher = threading.Thread(target=self._finish_loop, name="tensorlog-finisher", daemon=True)
        self._queue.alive = self._alive
        self._queue.takers = len(self._workers)
        for t in self._workers:
            t.start()
        self._finisher.start()

    # -- the model's thread ------------------------------------------------------------------

    @property
    def stopped(self) -> str | None:
        """Why logging stopped (disk full, budget, an error), or None while it runs."""
        return self._queue.stopped

    @property
    def anomaly(self) -> Anomaly | None:
        """The first NaN/Inf found, once the step that holds it is finished."""
        return self._steps.anomaly

    @property
    def bytes_written(self) -> int:
        return self._files.bytes_written

    @property
    def pending_bytes(self) -> int:
        return self._queue.pending_bytes

    def reserve(self, nbytes: int) -> bool:
        """Make room for ``nbytes`` of host copies before they are made; False: drop them (see JobQueue)."""
        return self._queue.reserve(nbytes)

    def unreserve(self, nbytes: int) -> None:
        self._queue.unreserve(nbytes)

    def pack(self, step: int, src: torch.Tensor, *, stream: object) -> int | None:
        """``layout: packed``: copy ``src`` (flat bytes) into the step's staging stream; its offset, None when dropped.

        Full chunks go to the writer threads as they fill. Waits (``block``) while
        the arena is full, for writer threads only.
        """
        assert self._arena is not None
        return self._arena.append(
            src, lambda c: self._submit_chunk(step, c), wait=not self.drop, stopped=lambda: bool(self.stopped), stream=stream
        )

    def seal_pack(self, step: int, stream: object = None) -> None:
        """The step's last chunk goes to the writer threads; the next step starts a new stream."""
        if self._arena is not None:
            chunk = self._arena.seal(stream)
            if chunk is not None:
                self._submit_chunk(step, chunk)
            self._arena.begin_stream()

    def _submit_chunk(self, step: int, chunk: Chunk) -> None:
        if not self._queue.put(ChunkJob(step, chunk)):
            assert self._arena is not None
            self._arena.release(chunk)

    def submit(self, job: WriteJob) -> None:
        """Queue a call part for the writer threads; one with nothing to write waits for its step's finish."""
        if job.needs_worker:
            self._queue.put(job)

    def end_step(self, end: StepEnd) -> None:
        """The step's last call was submitted: finish it once its calls are written."""
        self._queue.put_end(end)

    def wait_step(self, step: int, timeout: float | None = None) -> bool:
        """Block until ``step`` is finished on disk (or logging stopped). False on timeout."""
        return self._queue.wait_step(step, timeout, self._alive)

    def _alive(self) -> bool:
        return self._finisher.is_alive() and any(t.is_alive() for t in self._workers)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything submitted so far is on disk (or logging stopped)."""
        return self._queue.wait_idle(timeout)

    # -- any thread ---------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Stop for good (from any thread): nothing more is written but the final ``run.json``."""
        if not self._queue.stop(reason):
            return
        if self._arena is not None:
            self._arena.wake()
        warnings.warn(f"tensorlog: logging stopped for run {self.run_dir}: {reason}", RuntimeWarning, stacklevel=2)

    def close(self, *, complete: bool, reason: str | None = None, timeout: float = 60.0) -> None:
        """Finish every step, write the final ``run.json`` and end the threads; idempotent."""
        if not self._queue.close(complete, reason):
            return
        self._finisher.join(timeout=timeout)
        for t in self._workers:
            t.join(timeout=timeout)
        if self._arena is not None:
            self._arena.close()
        if not (self._finisher.is_alive() or any(t.is_alive() for t in self._workers)):
            self._root.release()  # (a thread still running keeps it: it must never write by a bare path)
        else:
            warnings.warn(
                f"tensorlog: the writer of {self.run_dir} did not finish within {timeout:g} s (a disk that does not "
                "answer?); its last files and run.json may still be written, or never be",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- writer threads ---------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while (job := self._queue.take()) is not None:
                try:
                    if isinstance(job, ChunkJob) and not self.stopped:
                        self._files.write_chunk(job)
                    elif isinstance(job, WriteJob) and not self.stopped:
                        self._files.write_call(job)
                except Exception as e:  # contained: the model must never see it
                    self.stop(describe_fault(e))
                finally:
                    try:
                        self._give_back(job)
                    finally:
                        self._queue.done(job)
        except BaseException as e:  # whatever ends this thread, every waiter is woken and logging stops
            self.stop(f"a writer thread died: {describe_fault(e)}")

    def _give_back(self, job: Job) -> None:
        """What a written job held: its chunk, or its host copies."""
        if isinstance(job, ChunkJob):
            assert self._arena is not None
            self._arena.release(job.chunk)
        else:
            for s in job.snaps:
                s.result.host_copy = None

    # -- the finishing thread ----------------------------------------------------------------

    def _finish_loop(self) -> None:
        """Steps in order, then the final ``run.json``. Whatever ends this thread (an error in any stage), logging
        stops, ``run.json`` says why where it can be written, and every waiter is woken: the model never waits on a
        thread that is gone."""
        try:
            self._finish_steps()
        except BaseException as e:
            self.stop(f"the finishing thread died: {describe_fault(e)}")
            self._last_word(complete=False, stopped=self.stopped)
        finally:
            self._queue.all_finished()

    def _last_word(self, *, complete: bool, stopped: str | None, reason: str | None = None) -> None:
        """The final ``run.json``; when even that fails, one warning says the run's ``run.json`` is not final."""
        try:
            self._steps.write_manifest(complete=complete, stopped=stopped, reason=reason, final=True)
        except BaseException as e:
            warnings.warn(
                f"tensorlog: the final run.json of {self.run_dir} could not be written ({describe_fault(e)}); "
                "it does not say the run ended, and readers treat the run as incomplete",
                RuntimeWarning,
                stacklevel=2,
            )

    def _finish_steps(self) -> None:
        self._steps.write_manifest(complete=False)
        while (end := self._queue.next_end()) is not None:
            packed = None
            try:
                packed = self._files.take_packed(end.step)
                self._steps.finish(end, packed)
                if packed is not None:
                    self._files.packed_closed(packed)
            except Exception as e:
                self.stop(describe_fault(e))
                if packed is not None:
                    packed.abort()
            finally:
                self._queue.finished(end.step)
        # stopped, or closing with nothing left
        stopped = self._queue.stopped
        if stopped and self._queue.closing is None:
            self._steps.write_manifest(complete=False, stopped=stopped)
        complete, reason = self._queue.wait_closing()
        self._files.abort_packed()
        try:  # also after a stop: the last Parquet window holds steps whose indexes are on disk
            self._steps.close()
        except Exception as e:
            stopped = stopped or describe_fault(e)
        self._last_word(complete=complete and not stopped and not self._steps.cut_short, stopped=stopped, reason=reason)
        self._steps.after_final_manifest()
