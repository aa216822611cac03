"""The write path's threads, driven step by step: the queue, the staging arena, the writer's threads and the finisher.

No sleeps and no timing assertions. A stage is held at a chosen point by a :class:`Gate` (it says when it got
there, and goes on, or fails with the fault given, when the test says so), and a *probe* says when a thread is
about to wait: the probes sit in the callables each wait re-checks under its lock (``JobQueue.alive``, the arena's
``stopped``), so whatever the test does next under that lock (a notify) comes after the waiter sleeps. Joins have
a timeout only so that a hang fails the test instead of blocking the suite.

Faults reach nobody's model: a failed write or a dead thread stops logging, wakes every waiter, gives back what was
reserved and is recorded in ``run.json`` as an incomplete run (see :mod:`tensorlog.storage.writer`).
"""

from __future__ import annotations

import errno
import queue
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tensorlog
from tensorlog.schema import names
from tensorlog.schema.records import RunManifest
from tensorlog.storage import queue as queue_mod
from tensorlog.storage.arena import Arena, Chunk
from tensorlog.storage.files import RunFiles
from tensorlog.storage.finisher import StepFinisher
from tensorlog.storage.queue import JobQueue
from tensorlog.storage.records import CallRecord, StepEnd, WriteJob
from tensorlog.storage.writer import Writer

GUARD = 20.0
"""Seconds before a join or an event wait gives up: a hang guard, never a measurement."""

MODEL = "model"
"""The name of the test's thread that plays the model's (probes only fire there)."""


class Died(BaseException):
    """What kills a thread outright: not an ``Exception``, so only the threads' last-resort handlers see it."""


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class Gate:
    """A stage held where it is called: ``entered`` once it gets there, then on (or ``fault`` raised) at :meth:`release`.

    Only the first ``hold`` calls are held; later ones pass straight through (or raise the same fault).
    """

    def __init__(self, fault: BaseException | None = None, *, hold: int = 1) -> None:
        self.fault = fault
        self.hold = hold
        self.entered = threading.Event()
        self.calls = 0
        self._go = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1
            held = self.calls <= self.hold
        if held:
            self.entered.set()
            if not self._go.wait(GUARD):
                raise Died("the test never released its gate")
        if self.fault is not None:
            raise self.fault

    def release(self) -> None:
        self._go.set()


def _hold(monkeypatch: pytest.MonkeyPatch, cls: type, method: str, gate: Gate, log: list[str] | None = None) -> Gate:
    """``cls.method`` passes ``gate`` first; ``log`` gets ``method`` once the real one returned."""
    orig = getattr(cls, method)

    def held(self: Any, *args: Any, **kwargs: Any) -> Any:
        gate()
        out = orig(self, *args, **kwargs)
        if log is not None:
            log.append(method)
        return out

    monkeypatch.setattr(cls, method, held)
    return gate


def _probe(answer: Callable[[], bool] = lambda: True) -> tuple[threading.Event, Callable[[], bool]]:
    """A stand-in for a wait's re-check callable: the event is set the first time it is asked."""
    asked = threading.Event()

    def probe() -> bool:
        asked.set()
        return answer()

    return asked, probe


def _writer_waits(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set when the model's thread is about to wait on a writer (for room, a step, or a flush): each of those
    waits asks ``Writer._alive`` under the queue's lock before it sleeps."""
    waiting = threading.Event()
    orig = Writer._alive

    def alive(self: Writer) -> bool:
        if threading.current_thread().name == MODEL:
            waiting.set()
        return orig(self)

    monkeypatch.setattr(Writer, "_alive", alive)
    return waiting


def _start(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    """``fn`` on a thread of its own named :data:`MODEL`; the list gets its result, or the exception it raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args, **kwargs))
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, name=MODEL, daemon=True)
    t.start()
    return t, out


def _join(t: threading.Thread) -> None:
    t.join(GUARD)
    assert not t.is_alive(), f"{t.name} hangs"


def _soon(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, which must not block: run on a thread of its own so that a broken one fails the test."""
    t, out = _start(fn, *args)
    _join(t)
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _ours() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("tensorlog")}


@pytest.fixture
def no_thread_left():
    """Every writer thread a test starts has ended by the time the test returns (they end in ``close()``)."""
    before = _ours()
    yield
    left = [t.name for t in _ours() - before if t.is_alive()]
    assert not left, f"threads left running after close: {left}"


def _job(step: int, nbytes: int, name: str = "m") -> WriteJob:
    rec = CallRecord(step=step, module=name, dirname=name, cls="Linear", call_index=0, seq_start=0)
    return WriteJob(rec, [], {}, nbytes=nbytes)


def _end(step: int) -> StepEnd:
    return StepEnd(step, [], [])


def _writer(path: Path, *, layout: str = "reference", budget: int = 1 << 20, drop: bool = False) -> Writer:
    path.mkdir()
    return Writer(
        path,
        RunManifest(),
        rank=None,
        layout=layout,
        fmt="safetensors",
        threads=1,
        max_pending_bytes=budget,
        drop=drop,
        max_total_bytes=None,
        detect_anomaly=False,
    )


def _run_json(path: Path) -> RunManifest:
    return RunManifest.model_validate_json((path / names.run_file()).read_bytes().rstrip())


# -- the queue: one lock, three kinds of thread ----------------------------------------------


def test_a_full_budget_blocks_a_reservation_until_a_queued_job_is_done():
    q = JobQueue(100, drop=False)
    waiting, q.alive = _probe()
    assert q.reserve(80) and q.put(_job(0, 80))
    t, out = _start(q.reserve, 40)
    assert waiting.wait(GUARD)
    assert out == [] and q.pending_bytes == 80  # asleep, holding nothing
    job = q.take()
    assert job is not None
    q.done(job)
    _join(t)
    assert out == [True] and q.pending_bytes == 40
    q.unreserve(40)
    assert q.pending_bytes == 0


def test_a_full_budget_drops_a_reservation_at_once_under_drop():
    q = JobQueue(100, drop=True)
    waiting, q.alive = _probe()
    assert q.reserve(80) and q.put(_job(0, 80))
    assert not _soon(q.reserve, 40)
    assert not waiting.is_set() and q.pending_bytes == 80  # never waited, took nothing
    job = q.take()
    assert job is not None
    q.done(job)
    assert q.reserve(40) and q.pending_bytes == 40


def test_a_reservation_larger_than_the_whole_budget_waits_for_the_queue_then_goes_through_alone():
    q = JobQueue(100, drop=False)
    waiting, q.alive = _probe()
    assert _soon(q.reserve, 1000)  # nothing queued: it goes through, whatever its size
    assert not waiting.is_set()
    q.unreserve(1000)
    assert q.reserve(10) and q.put(_job(0, 10))
    t, out = _start(q.reserve, 1000)
    assert waiting.wait(GUARD)
    job = q.take()
    assert job is not None
    q.done(job)
    _join(t)
    assert out == [True] and q.pending_bytes == 1000
    q.unreserve(1000)
    assert q.pending_bytes == 0


def test_a_reservation_waiting_on_threads_that_died_gives_up(monkeypatch):
    monkeypatch.setattr(queue_mod, "RECHECK", 0.01)  # nobody notifies when a thread dies: the wait re-checks
    q = JobQueue(100, drop=False)
    threads_alive = threading.Event()
    threads_alive.set()
    waiting, q.alive = _probe(threads_alive.is_set)
    assert q.reserve(80) and q.put(_job(0, 80))
    t, out = _start(q.reserve, 40)
    assert waiting.wait(GUARD)
    threads_alive.clear()
    _join(t)
    assert out == [False] and q.pending_bytes == 80


def test_stop_wakes_a_waiting_reservation_and_gives_back_every_reserved_byte():
    q = JobQueue(100, drop=False)
    waiting, q.alive = _probe()
    assert q.reserve(80) and q.put(_job(0, 80))
    t, out = _start(q.reserve, 40)
    assert waiting.wait(GUARD)
    assert q.stop("stopped by the test") and not q.stop("again")
    _join(t)
    assert out == [False] and q.pending_bytes == 0 and q.stopped == "stopped by the test"
    assert not q.reserve(1)
    assert not q.put(_job(0, 5)) and q.pending_bytes == 0  # refused after a stop, its bytes given back


def test_stop_while_a_job_is_being_written_drops_the_rest_and_the_late_done_takes_nothing_twice():
    q = JobQueue(1000, drop=False)
    for n in (10, 20, 30):
        assert q.reserve(n) and q.put(_job(0, n))
    q.put_end(_end(0))
    busy = q.take()  # a writer thread holds it while the run stops
    assert busy is not None
    q.stop("stopped by the test")
    assert q.pending_bytes == 0
    assert q.wait_idle(GUARD)  # nobody waits for the dropped jobs
    assert _soon(q.next_end) is None  # nor for the step they belonged to
    q.done(busy)
    assert q.pending_bytes == 0
    assert q.close(False, None)
    assert _soon(q.take) is None  # the dropped jobs are gone: the writer thread ends


@pytest.mark.parametrize("wake", ["finished", "stop", "all_finished", "threads_died"])
def test_a_step_waiter_is_woken_by_its_step_a_stop_the_close_or_dead_threads(monkeypatch, wake):
    monkeypatch.setattr(queue_mod, "RECHECK", 0.01)  # only for the dead threads, which notify nobody
    q = JobQueue(100, drop=False)
    threads_alive = threading.Event()
    threads_alive.set()
    waiting, q.alive = _probe(threads_alive.is_set)
    t, out = _start(q.wait_step, 3, None, threads_alive.is_set)
    assert waiting.wait(GUARD)
    q.finished(2)  # an earlier step: not this one
    if wake == "finished":
        q.finished(3)
    elif wake == "stop":
        q.stop("stopped by the test")
    elif wake == "all_finished":  # what the finishing thread does last, after close() or its own death
        q.all_finished()
    else:
        threads_alive.clear()
    _join(t)
    assert out == [True]


def test_a_step_waiter_with_a_timeout_says_it_timed_out():
    q = JobQueue(100, drop=False)
    assert q.wait_step(0, 0.0, lambda: True) is False
    assert q.wait_idle(0.0) is True  # nothing queued: idle at once


def test_a_part_of_a_step_ending_while_the_run_closes_is_written_not_refused():
    q = JobQueue(100, drop=False)
    q.takers = 2
    first = _job(0, 8)
    assert q.reserve(8) and q.put(first)
    assert q.take() is first  # one writer thread busy with the step's first part
    q.close(complete=True, reason=None)
    second = _job(0, 8)
    assert q.reserve(8) and q.put(second)  # the threads still drain the queue: taken, not lost
    assert q.take() is second
    q.done(first)
    q.done(second)
    assert q.take() is None and q.pending_bytes == 0  # one thread left; the other may still take a job
    assert q.put(_job(0, 0))
    assert q.take() is not None and q.take() is None  # and now both have left: no one would take a job
    assert q.put(_job(0, 0)) is False


def test_a_step_is_handed_to_the_finisher_only_once_its_jobs_are_done():
    q = JobQueue(100, drop=False)
    assert q.put(_job(0, 0)) and q.put(_job(1, 0))
    q.put_end(_end(0))
    q.put_end(_end(1))
    done_before: list[bool] = []
    marked = threading.Event()

    def finisher() -> list[int]:
        got = []
        while (end := q.next_end()) is not None:
            done_before.append(marked.is_set())
            got.append(end.step)
            q.finished(end.step)
        return got

    t, out = _start(finisher)
    first = q.take()
    assert first is not None and first.step == 0
    marked.set()  # set before done(): a step handed over earlier would see it unset
    q.done(first)
    second = q.take()
    assert second is not None
    q.done(second)
    assert q.close(True, None) and not q.close(False, "again")
    _join(t)
    assert out == [[0, 1]] and done_before == [True, True]
    assert q.closing == (True, None)  # the first close said the last word
    assert _soon(q.take) is None


def test_close_ends_an_idle_writer_thread_and_lets_a_busy_one_drain_the_queue_first():
    idle = JobQueue(100, drop=False)
    t, out = _start(idle.take)  # nothing to do: it waits for work (or is about to)
    assert idle.close(True, None)
    _join(t)
    assert out == [None]
    q = JobQueue(100, drop=False)
    assert q.put(_job(0, 0))
    assert q.close(True, None)
    job = _soon(q.take)  # queued before the close: still written
    assert job is not None
    q.done(job)
    assert _soon(q.take) is None


# -- the arena: hooks wait for chunks, writer threads give them back --------------------------

CHUNK = 1 << 16
"""The arena's smallest chunk: an arena of ``2 * CHUNK`` has exactly two."""


def _full_arena() -> tuple[Arena, list[Chunk]]:
    arena = Arena(2 * CHUNK)
    assert arena.chunk_bytes == CHUNK and arena.max_chunks == 2
    submitted: list[Chunk] = []
    for _ in range(2):
        assert arena.append(torch.ones(CHUNK, dtype=torch.uint8), submitted.append, wait=True, stopped=lambda: False) is not None
    assert len(submitted) == 2  # both chunks in flight: nothing is free
    return arena, submitted


def test_a_hook_waits_for_a_chunk_until_a_writer_thread_gives_one_back():
    arena, submitted = _full_arena()
    waiting, stopped = _probe(lambda: False)
    t, out = _start(arena.append, torch.full((100,), 7, dtype=torch.uint8), submitted.append, wait=True, stopped=stopped)
    assert waiting.wait(GUARD)
    assert out == []
    arena.release(submitted[0])
    _join(t)
    assert out == [2 * CHUNK]
    last = arena.seal()
    assert last is not None and last.stream_start == 2 * CHUNK and bool((last.data[:100] == 7).all())


def test_a_full_arena_drops_at_once_under_drop_and_takes_again_once_a_chunk_is_back():
    arena, submitted = _full_arena()
    asked, stopped = _probe(lambda: False)
    assert arena.append(torch.ones(100, dtype=torch.uint8), submitted.append, wait=False, stopped=stopped) is None
    assert not asked.is_set()
    arena.release(submitted[0])
    assert arena.append(torch.ones(100, dtype=torch.uint8), submitted.append, wait=False, stopped=stopped) is not None


def test_a_stop_wakes_a_hook_waiting_for_a_chunk():
    arena, submitted = _full_arena()
    stop = threading.Event()
    waiting, stopped = _probe(stop.is_set)
    t, out = _start(arena.append, torch.ones(100, dtype=torch.uint8), submitted.append, wait=True, stopped=stopped)
    assert waiting.wait(GUARD)
    stop.set()
    arena.wake()
    _join(t)
    assert out == [None]


def test_a_tensor_larger_than_the_whole_arena_streams_through_it_byte_for_byte():
    arena = Arena(2 * CHUNK)
    written: list[bytes] = []
    jobs: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()

    def writer_thread() -> None:
        while (c := jobs.get()) is not None:
            written.append(bytes(c.data[: c.used].numpy()))
            arena.release(c)

    t, _ = _start(writer_thread)
    src = torch.randint(0, 256, (5 * CHUNK + 100,), dtype=torch.uint8)
    assert arena.append(src, jobs.put, wait=True, stopped=lambda: False) == 0
    jobs.put(arena.seal())
    jobs.put(None)
    _join(t)
    assert b"".join(written) == bytes(src.numpy())
    # every chunk came back: the whole arena is free again, and still bounded
    arena.begin_stream()
    kept: list[Chunk] = []
    for _ in range(2):
        assert arena.append(torch.ones(CHUNK, dtype=torch.uint8), kept.append, wait=False, stopped=lambda: False) is not None
    assert arena.append(torch.ones(1, dtype=torch.uint8), kept.append, wait=False, stopped=lambda: False) is None


def test_a_chunk_released_after_close_gives_its_memory_back():
    arena, submitted = _full_arena()
    arena.close()
    arena.release(submitted[0])
    assert submitted[0].data.numel() == 0


# -- the writer: its threads, with a fault at each stage -------------------------------------


def _step_waiting_on_a_held_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: Gate
) -> tuple[Writer, Gate, threading.Thread, list[Any]]:
    """A step of two parts whose first write is held at ``gate``, and the model's thread waiting for the step."""
    gate = _hold(monkeypatch, RunFiles, "write_call", gate)
    waiting = _writer_waits(monkeypatch)
    w = _writer(tmp_path / "r")
    for _ in range(2):
        assert w.reserve(64)
        w.submit(_job(0, 64))
    w.end_step(_end(0))
    t, out = _start(w.wait_step, 0)
    assert gate.entered.wait(GUARD) and waiting.wait(GUARD)
    return w, gate, t, out


@pytest.mark.parametrize(
    "fault, said",
    [(_enospc(), "disk full or file too large"), (Died("injected"), "a writer thread died")],
    ids=["disk-full", "thread-dies"],
)
def test_a_write_that_fails_while_its_step_waits_stops_logging_and_wakes_the_step(
    tmp_path, monkeypatch, no_thread_left, fault, said
):
    w, gate, t, out = _step_waiting_on_a_held_write(tmp_path, monkeypatch, Gate(fault))
    with pytest.warns(RuntimeWarning, match="logging stopped"):  # said by a writer thread: closed (joined) inside
        gate.release()
        _join(t)
        assert out == [True] and (w.stopped or "").startswith(said)
        assert not w.reserve(1)  # the model is never made to wait again
        w.close(complete=True)
    assert w.pending_bytes == 0
    assert gate.calls == 1  # the job queued behind it was dropped, not written
    run = _run_json(tmp_path / "r")
    assert not run.complete and said in (run.incomplete_reason or "") and run.end_time is not None
    assert run.steps_written == []  # the step never finished: no reader takes it as whole


def test_stop_while_a_write_is_busy_wakes_the_step_at_once_and_nothing_more_is_written(tmp_path, monkeypatch, no_thread_left):
    w, gate, t, out = _step_waiting_on_a_held_write(tmp_path, monkeypatch, Gate())
    with pytest.warns(RuntimeWarning, match="stopped by the test"):
        w.stop("stopped by the test")
    _join(t)  # the write is still held: the step's caller does not wait for it
    assert out == [True] and w.pending_bytes == 0
    gate.release()
    w.close(complete=True)
    assert gate.calls == 1 and w.pending_bytes == 0
    run = _run_json(tmp_path / "r")
    assert not run.complete and "stopped by the test" in (run.incomplete_reason or "")


def test_a_finisher_that_dies_while_a_step_waits_wakes_it_and_says_so_in_run_json(tmp_path, monkeypatch, no_thread_left):
    gate = _hold(monkeypatch, StepFinisher, "finish", Gate(Died("injected")))
    waiting = _writer_waits(monkeypatch)
    w = _writer(tmp_path / "r")
    w.end_step(_end(0))
    t, out = _start(w.wait_step, 0)
    assert gate.entered.wait(GUARD) and waiting.wait(GUARD)
    with pytest.warns(RuntimeWarning, match="logging stopped"):
        gate.release()
        _join(t)
        assert out == [True] and "the finishing thread died" in (w.stopped or "")
        assert not w.reserve(1)
        w.close(complete=True)  # the dead finisher already wrote the last word; close only ends the writer threads
    run = _run_json(tmp_path / "r")
    assert not run.complete and "the finishing thread died: Died: injected" in (run.incomplete_reason or "")
    assert run.end_time is not None


def test_a_step_that_fails_to_finish_is_not_listed_and_later_steps_are_not_written(tmp_path, monkeypatch, no_thread_left):
    gate = _hold(monkeypatch, StepFinisher, "finish", Gate(_enospc()))
    w = _writer(tmp_path / "r")
    w.end_step(_end(0))
    assert gate.entered.wait(GUARD)
    w.end_step(_end(1))  # queued behind the failing step
    with pytest.warns(RuntimeWarning, match="disk full"):
        gate.release()
        assert w.wait_step(1, GUARD)
        w.close(complete=True)
    assert gate.calls == 1  # step 1 was dropped by the stop, never finished
    run = _run_json(tmp_path / "r")
    assert not run.complete and run.steps_written == [] and "disk full" in (run.incomplete_reason or "")


def test_close_after_stop_then_close_again_changes_nothing(tmp_path, no_thread_left):
    w = _writer(tmp_path / "r")
    with pytest.warns(RuntimeWarning, match="stopped by the test"):
        w.stop("stopped by the test")
    w.stop("again")  # said once: the first reason stays
    w.close(complete=True)
    final = (tmp_path / "r" / names.run_file()).read_bytes()
    w.close(complete=True)
    w.close(complete=False, reason="later")
    assert (tmp_path / "r" / names.run_file()).read_bytes() == final
    run = _run_json(tmp_path / "r")
    assert not run.complete and run.incomplete_reason == "stopped by the test" and run.end_time is not None


def test_close_wakes_a_thread_waiting_for_a_step_that_never_ends(tmp_path, monkeypatch, no_thread_left):
    waiting = _writer_waits(monkeypatch)
    w = _writer(tmp_path / "r")
    t, out = _start(w.wait_step, 7)
    assert waiting.wait(GUARD)
    w.close(complete=True)
    _join(t)
    assert out == [True] and _run_json(tmp_path / "r").complete


def test_two_closes_at_once_both_return_and_the_run_ends_whole(tmp_path, monkeypatch, no_thread_left):
    gate = _hold(monkeypatch, StepFinisher, "finish", Gate())
    w = _writer(tmp_path / "r")
    assert w.reserve(8)
    w.submit(_job(0, 8))
    w.end_step(_end(0))
    assert gate.entered.wait(GUARD)
    closers = [_start(w.close, complete=True) for _ in range(2)]
    gate.release()
    for t, out in closers:
        _join(t)
        assert out == [None]
    run = _run_json(tmp_path / "r")
    assert run.complete and run.end_time is not None and w.pending_bytes == 0


def test_a_close_that_outlasts_its_timeout_says_so_and_the_thread_still_ends(tmp_path, monkeypatch, no_thread_left):
    before = _ours()
    gate = _hold(monkeypatch, RunFiles, "write_call", Gate())
    w = _writer(tmp_path / "r")
    assert w.reserve(8)
    w.submit(_job(0, 8))
    assert gate.entered.wait(GUARD)
    with pytest.warns(RuntimeWarning, match="did not finish within 0 s"):
        w.close(complete=True, timeout=0)  # the write is held: nothing can have ended yet
    gate.release()
    assert w.flush(GUARD)
    for t in _ours() - before:
        _join(t)
    assert _run_json(tmp_path / "r").complete


@pytest.mark.parametrize("drop", [False, True], ids=["block", "drop"])
def test_back_pressure_blocks_until_the_write_is_done_or_drops(tmp_path, monkeypatch, no_thread_left, drop):
    log: list[str] = []
    gate = _hold(monkeypatch, RunFiles, "write_call", Gate(), log)
    waiting = _writer_waits(monkeypatch)
    w = _writer(tmp_path / "r", budget=100, drop=drop)
    assert w.reserve(80)
    w.submit(_job(0, 80))
    assert gate.entered.wait(GUARD)  # taken, still being written: its bytes are still pending

    def reserve() -> bool:
        got = w.reserve(40)
        log.append(f"reserve {got}")
        return got

    t, out = _start(reserve)
    if drop:
        _join(t)
        assert out == [False] and not waiting.is_set() and w.pending_bytes == 80
        gate.release()
    else:
        assert waiting.wait(GUARD)
        gate.release()
        _join(t)
        assert out == [True]
        w.unreserve(40)
    w.close(complete=True)
    assert log == (["reserve False", "write_call"] if drop else ["write_call", "reserve True"])
    assert w.pending_bytes == 0 and _run_json(tmp_path / "r").complete


def test_a_reservation_larger_than_the_budget_waits_for_the_writer_then_goes_through(tmp_path, monkeypatch, no_thread_left):
    gate = _hold(monkeypatch, RunFiles, "write_call", Gate())
    waiting = _writer_waits(monkeypatch)
    w = _writer(tmp_path / "r", budget=100)
    assert w.reserve(10)
    w.submit(_job(0, 10))
    assert gate.entered.wait(GUARD)
    t, out = _start(w.reserve, 10_000)
    assert waiting.wait(GUARD)
    gate.release()
    _join(t)
    assert out == [True] and w.pending_bytes == 10_000
    w.submit(_job(0, 10_000))  # written alone, then given back
    w.end_step(_end(0))
    assert w.wait_step(0, GUARD)
    assert w.pending_bytes == 0
    w.close(complete=True)


def test_a_hook_waiting_for_a_chunk_when_the_packed_write_fails_is_let_go(tmp_path, monkeypatch, no_thread_left):
    gate = _hold(monkeypatch, RunFiles, "write_chunk", Gate(_enospc()))
    waiting = threading.Event()
    append = Arena.append

    def probed(self: Arena, src: torch.Tensor, submit: Callable[[Chunk], None], *, wait: bool, stopped: Any, stream: Any = None):
        def asked() -> bool:
            waiting.set()
            return stopped()

        return append(self, src, submit, wait=wait, stopped=asked, stream=stream)

    monkeypatch.setattr(Arena, "append", probed)
    w = _writer(tmp_path / "r", layout="packed", budget=2 * CHUNK)
    t, out = _start(w.pack, 0, torch.ones(3 * CHUNK, dtype=torch.uint8), stream=None)
    assert gate.entered.wait(GUARD) and waiting.wait(GUARD)  # both chunks in flight, the hook wants a third
    with pytest.warns(RuntimeWarning, match="disk full"):
        gate.release()
        _join(t)
        w.seal_pack(0)
        w.end_step(_end(0))
        assert w.wait_step(0, GUARD)
        w.close(complete=True)
    # let go either way: told the run stopped (None), or handed the chunk the failed write gave back (its copy is
    # then refused by the stopped queue); never left waiting
    assert len(out) == 1 and not isinstance(out[0], BaseException)
    run = _run_json(tmp_path / "r")
    assert not run.complete and "disk full" in (run.incomplete_reason or "") and run.steps_written == []


def test_a_job_submitted_after_close_is_refused_and_its_bytes_given_back(tmp_path, no_thread_left):
    w = _writer(tmp_path / "r")
    w.close(complete=True)
    assert w.wait_step(0, GUARD)  # no thread left to wait for: returns at once
    if w.reserve(64):
        w.submit(_job(0, 64))
    assert w.pending_bytes == 0


# -- through capture: a tiny model, the fault in the writer stage -----------------------------


def _tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), torch.randn(4, 8)


def _forwards(model: nn.Module, x: torch.Tensor, cfg: dict[str, Any], n: int) -> tuple[list[torch.Tensor], list[str], str | None]:
    """``n`` forwards, a step each, under capture: their outputs, the warnings said, why logging stopped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tensorlog.capture(model, {"log_step_ids": [], "writer_threads": 1, **cfg}) as run:
            outs = [model(x) for _ in range(n)]
        return outs, [str(w.message) for w in caught], run.stopped_reason


def test_a_full_disk_while_the_model_waits_for_its_step_stops_logging_and_the_model_runs_on(
    tmp_path, monkeypatch, no_thread_left
):
    model, x = _tiny()
    ref = model(x)
    gate = _hold(monkeypatch, RunFiles, "write_call", Gate(_enospc()))
    waiting = _writer_waits(monkeypatch)
    t, out = _start(_forwards, model, x, {"output_dir": str(tmp_path), "run_name": "r"}, 3)
    assert gate.entered.wait(GUARD) and waiting.wait(GUARD)  # the first write is held; the model waits for step 0
    gate.release()
    _join(t)
    outs, said, stopped = out[0]
    assert all(torch.equal(o, ref) for o in outs)
    assert (stopped or "").startswith("disk full or file too large")
    assert sum("logging stopped" in s for s in said) == 1, said
    assert gate.calls == 1  # nothing written after the fault
    run = tensorlog.load_run(tmp_path / "r")
    assert not run.complete and "disk full" in (run.incomplete_reason or "") and sorted(run.steps) == []


def test_back_pressure_drop_through_capture_drops_exactly_what_came_while_the_writer_was_held(
    tmp_path, monkeypatch, no_thread_left
):
    model, x = _tiny()
    gate = _hold(monkeypatch, RunFiles, "write_call", Gate())
    waiting = _writer_waits(monkeypatch)
    cfg = {"output_dir": str(tmp_path), "run_name": "r", "max_pending_bytes": 1, "on_backpressure": "drop"}
    t, out = _start(_forwards, model, x, cfg, 1)
    assert gate.entered.wait(GUARD) and waiting.wait(GUARD)  # the model got to its step's end: nothing blocked it
    gate.release()
    _join(t)
    assert out[0][2] is None  # dropping never stops logging
    run = tensorlog.load_run(tmp_path / "r")
    # the first part (the first Linear's inputs) went through alone; all the rest came while it was being written
    assert [c.dirname for c in run.calls()] == ["0"]
    assert [(d.module, d.what) for d in run.manifest.dropped] == [("0", "outputs"), ("1", "call"), ("2", "call")]
    assert not run.complete  # a run with drops never reads as whole


def test_back_pressure_block_through_capture_waits_for_the_writer_and_loses_nothing(tmp_path, monkeypatch, no_thread_left):
    model, x = _tiny()
    log: list[str] = []
    gate = _hold(monkeypatch, RunFiles, "write_call", Gate(), log)
    reserve = Writer.reserve

    def logged(self: Writer, nbytes: int) -> bool:
        got = reserve(self, nbytes)
        log.append("reserved")
        return got

    monkeypatch.setattr(Writer, "reserve", logged)
    waiting = _writer_waits(monkeypatch)
    t, out = _start(_forwards, model, x, {"output_dir": str(tmp_path), "run_name": "r", "max_pending_bytes": 1}, 1)
    assert gate.entered.wait(GUARD) and waiting.wait(GUARD)
    gate.release()
    _join(t)
    assert out[0][2] is None
    assert log[:3] == ["reserved", "write_call", "reserved"]  # the second part waited for the first one's write
    run = tensorlog.load_run(tmp_path / "r")
    assert run.complete and not run.manifest.dropped
    assert [c.dirname for c in run.calls()] == ["0", "1", "2"] and all(c.outputs for c in run.calls())
