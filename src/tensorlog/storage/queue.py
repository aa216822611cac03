"""The writer's shared state: jobs, step ends and reserved bytes, behind one lock.

Three kinds of thread meet here: the model's (it reserves room, queues call
parts and step ends, and waits for a step), the writer threads (they take jobs
and say when each is done) and the finishing thread (it takes the oldest step
whose jobs are all done). Every field is read and written under the lock;
writer threads wait on a condition of their own, so queueing a job wakes one
of them and not every waiter.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from .records import ChunkJob, StepEnd, WriteJob

__all__ = ["JobQueue", "Job"]

Job = WriteJob | ChunkJob
_DONE = 1 << 62
RECHECK = 1.0


class JobQueue:
    def __init__(self, max_pending_bytes: int, *, drop: bool) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.drop = drop
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._work_cv = threading.Condition(self._lock)
        self._idle = 0
        self._jobs: deque[Job] = deque()
        self._ends: deque[StepEnd] = deque()
        self._pending = 0
        self._queued = 0
        self._busy = 0
        self._outstanding: dict[int, int] = {}
        self._last_finished = -1
        self.stopped: str | None = None
        """Why logging stopped; set once, under the lock."""
        self.closing: tuple[bool, str | None] | None = None
        self.takers = 1
        """Writer threads that take jobs (set by their owner, the writer, before they start)."""
        self._left = 0
        """Writer threads that found the run closing and nothing left, and ended: once all have, a job is refused."""
        self.alive: Callable[[], bool] = lambda: True
        """Whether the threads that end every wait are running (set by their owner, the writer). Waits on the model's
        thread wake at least every :data:`RECHECK` seconds to ask, so a thread that died cannot leave them waiting."""

    @property
    def pending_bytes(self) -> int:
        return self._pending

    # -- the model's thread ------------------------------------------------------------------

    def reserve(self, nbytes: int) -> bool:
        """Make room for ``nbytes`` of host copies before they are made; False: drop them.

        Blocks (``on_backpressure: block``) while the budget is full and something
        queued is still being written; a part larger than the whole budget goes
        through once nothing is. It waits only for queued work, which the writer
        threads finish without waiting for anything, so it cannot deadlock.
        """
        with self._cv:
            while not self.stopped and self._queued and self._pending + nbytes > self.max_pending_bytes:
                if self.drop or not self.alive():
                    return False
                self._cv.wait(RECHECK)
            if self.stopped:
                return False
            self._pending += nbytes
            return True

    def unreserve(self, nbytes: int) -> None:
        if nbytes:
            with self._cv:
                self._pending = max(0, self._pending - nbytes)
                self._cv.notify_all()

    def put(self, job: Job) -> bool:
        """Queue ``job``; False (and its reservation given back) once logging stopped, or once the run closed and
        every writer thread has ended (no one would take it). A job of a step still ending while the run closes is
        written: the threads drain the queue before they end."""
        nbytes = job.nbytes if isinstance(job, WriteJob) else 0
        with self._cv:
            if self.stopped or (self.closing is not None and self._left >= self.takers):
                self._pending = max(0, self._pending - nbytes)
                return False
            self._jobs.append(job)
            self._queued += nbytes
            self._outstanding[job.step] = self._outstanding.get(job.step, 0) + 1
            if self._idle:
                self._work_cv.notify()
            return True

    def put_end(self, end: StepEnd) -> None:
        with self._cv:
            if not self.stopped:
                self._ends.append(end)
                self._cv.notify_all()

    def wait_step(self, step: int, timeout: float | None, alive: Callable[[], bool]) -> bool:
        """Until ``step`` is finished (or logging stopped, or the threads died). False on timeout."""
        return self._wait(lambda: step <= (self._last_finished if alive() else _DONE), timeout)

    def wait_idle(self, timeout: float | None) -> bool:
        """Until everything queued so far is written and finished (or logging stopped)."""
        return self._wait(lambda: not (self._jobs or self._busy or self._ends), timeout)

    def _wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not done() and not self.stopped and self.alive():
                remaining = RECHECK if deadline is None else min(RECHECK, deadline - time.monotonic())
                if remaining <= 0:
                    return False
                self._cv.wait(remaining)
        return True

    # -- any thread ---------------------------------------------------------------------------

    def stop(self, reason: str) -> bool:
        """Stop for good, dropping what is queued; True for the call that stopped it."""
        with self._cv:
            if self.stopped:
                return False
            self.stopped = reason
            self._jobs.clear()
            self._ends.clear()
            self._pending = self._queued = 0
            self._cv.notify_all()
            self._work_cv.notify_all()
            return True

    def close(self, complete: bool, reason: str | None) -> bool:
        """Ask the threads to finish what is queued and end; True the first time."""
        with self._cv:
            if self.closing is not None:
                return False
            self.closing = (complete, reason)
            self._cv.notify_all()
            self._work_cv.notify_all()
            return True

    # -- writer threads -----------------------------------------------------------------------

    def take(self) -> Job | None:
        """The next job; None once the run is closing and nothing is left."""
        with self._cv:
            while not self._jobs and self.closing is None:
                self._idle += 1
                self._work_cv.wait()
                self._idle -= 1
            if not self._jobs:
                self._left += 1
                return None
            self._busy += 1
            return self._jobs.popleft()

    def done(self, job: Job) -> None:
        nbytes = job.nbytes if isinstance(job, WriteJob) else 0
        with self._cv:
            self._busy -= 1
            self._pending = max(0, self._pending - nbytes)
            self._queued = max(0, self._queued - nbytes)
            self._outstanding[job.step] = self._outstanding.get(job.step, 1) - 1
            self._cv.notify_all()

    # -- the finishing thread -----------------------------------------------------------------

    def next_end(self) -> StepEnd | None:
        """The oldest step whose jobs are all done; None once logging stopped or the run is closing."""
        with self._cv:
            while not self.stopped:
                if self._ends and self._outstanding.get(self._ends[0].step, 0) <= 0:
                    return self._ends.popleft()
                if self.closing is not None and not self._ends and not self._jobs and not self._busy:
                    return None
                self._cv.wait()
            return None

    def finished(self, step: int) -> None:
        with self._cv:
            self._last_finished = max(self._last_finished, step)
            self._outstanding.pop(step, None)
            self._cv.notify_all()

    def wait_closing(self) -> tuple[bool, str | None]:
        """Logging stopped early: wait for ``close()`` to say the last word."""
        with self._cv:
            while self.closing is None:
                self._cv.wait()
            return self.closing

    def all_finished(self) -> None:
        with self._cv:
            self._last_finished = _DONE
            self._cv.notify_all()
