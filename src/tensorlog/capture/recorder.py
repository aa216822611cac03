"""The recorder: hook events in, :class:`CallRecord` objects out, one step at a time.

Module hooks, op-level capture and backward hooks all report here. The
recorder owns the step's bookkeeping (:class:`StepState`), the snapshots and
the records of the open step, and hands them to the writer. Everything here
runs on the model's thread.

Hook code runs inside someone else's model: it returns nothing that changes
the computation (except a requested graft of inputs), and any error it meets
stops logging (warned once, recorded in ``run.json``) instead of reaching the
model. The exceptions a user asked for go through: ``AnomalyError``
(``stop_on_anomaly``) and ``GraftError`` (``reload_input_dir``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import LogConfig, Selector
from ..errors import AnomalyError, GraftError
from ..schema import reference as ref
from ..schema.leaves import Leaf, flatten_inputs, flatten_value
from ..storage import stats as _stats
from ..storage.records import CallRecord, StepEnd, WriteJob
from ..storage.writer import Writer
from .snapshot import Snapshotter
from .steps import StepState

__all__ = ["Recorder", "Call"]


class Call:
    """An open call: its record, or None when this call is not logged."""

    __slots__ = ("record",)

    def __init__(self, record: CallRecord | None) -> None:
        self.record = record


class Recorder:
    def __init__(
        self, config: LogConfig, selector: Selector, writer: Writer, *, rank: int | None, layout: str, graft: Any = None
    ) -> None:
        self.config = config
        self.selector = selector
        self.writer = writer
        self.layout = layout
        self.state = StepState()
        self.snap = Snapshotter(config, selector, rank, layout)
        self.graft = graft
        self.paused = False
        self.busy = False
        self.on_call: Callable[[str], None] | None = None
        """Called with the module name of each logged call (``stack: true`` records call sites)."""
        self.in_step = False
        self._calls: list[CallRecord] = []
        self._open: dict[str, list[Call]] = {}
        self._dropped: list[dict[str, Any]] = []
        self._last_refused = 0
        self._gradients: list[CallRecord] = []
        self._directions = config.directions
        self._docs = layout == "reference"
        self._post_inputs = config.log_post_fwd_inputs

    @property
    def logging(self) -> bool:
        return self.in_step and not self.paused and self.writer.stopped is None

    # -- steps ---------------------------------------------------------------------------

    def begin_step(self) -> None:
        self.in_step = True
        self.state.reset()
        self.snap.begin_step()
        self._calls = []
        self._open = {}
        self._dropped = []
        self._gradients = []

    def end_step(self, info: dict[str, Any] | None = None, *, raised: BaseException | None = None) -> int | None:
        """Hand the step to the writer; returns its index when anything was handed over."""
        if not self.in_step:
            return None
        self.in_step = False
        step = self.state.index
        unfinished = [c.record.dirname for calls in self._open.values() for c in calls if c.record is not None]
        complete, why = True, None
        if raised is not None or unfinished:
            complete = False
            what = f"the forward raised {type(raised).__name__}" if raised is not None else "calls never returned"
            why = what + (f" with {len(unfinished)} call(s) open ({', '.join(unfinished[:3])})" if unfinished else "")
        if self.writer.stopped is not None:
            return None
        for rec in self._gradients:  # the backward pass has run: its calls are whole now
            rec.seq_end = self.state.tick()
        self._gradients = []
        parts = self.snap.take_stats()
        end = StepEnd(
            step=step,
            order=list(self.state.order),
            calls=self._calls,
            info=info,
            complete=complete,
            incomplete_reason=why,
            dropped=self._dropped,
        )
        if parts:
            gathered = _stats.gather(parts)
            host = []
            for dev, rows, flat in gathered:
                if dev.type == "cuda":
                    pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                    pinned.copy_(flat, non_blocking=True)
                    host.append((rows, pinned))
                    end.ready = torch.cuda.Event()
                    end.ready.record()
                else:
                    host.append((rows, flat))
            end.stats = ([len(p) for p in parts], host)
        self._calls, self._open = [], {}
        self.writer.end_step(end)
        return step

    # -- calls ---------------------------------------------------------------------------

    def enter(
        self,
        name: str,
        cls: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        calls: frozenset[int] | None,
        *,
        backward: bool = False,
    ) -> tuple[Call, Any]:
        """A call starts. Returns the open call and, with a graft, the replacement ``(args, kwargs)``."""
        k = self.state.next_call(name)
        call = Call(None)
        self._open.setdefault(name, []).append(call)
        if (calls is not None and k not in calls) or not self.logging:
            return call, None
        leaves, structure = flatten_inputs(args, kwargs)
        if not self._device_selected(leaves):
            return call, None
        rec = CallRecord(
            step=self.state.index,
            module=name,
            dirname=self.state.claim_dirname(name, k),
            cls=cls,
            call_index=k,
            seq_start=self.state.tick(),
            backward=backward,
        )
        used: set[str] = set()
        job = WriteJob(rec, [], {})
        if "input" in self._directions:
            if not self._add(job, "inputs", leaves, used):
                self._drop(rec, "call")
                return call, None
            rec.structure = structure
            if self._docs:
                job.docs["inputs"] = ref.describe(tuple(args))
        call.record = rec
        self._calls.append(rec)
        self.writer.submit(job)
        if self.on_call is not None:
            self.on_call(name)
        replacement = None
        if self.graft is not None and not backward:
            replacement = self.graft.inputs_for(rec, args, kwargs)
            rec.grafted = replacement is not None
        return call, replacement

    def leave(self, name: str, output: Any, *, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None) -> None:
        stack = self._open.get(name)
        if not stack:
            return
        call = stack.pop()
        rec = call.record
        if rec is None:
            return
        rec.seq_end = self.state.tick()
        if self.writer.stopped is not None:
            return
        used = {s.stem for s in rec.tensors}
        job = WriteJob(rec, [], {})
        if "output" in self._directions:
            if not self._add(job, "outputs", flatten_value(output), used):
                return self._drop(rec, "outputs")
            if self._docs:
                job.docs["outputs"] = ref.describe(output)
        if self._post_inputs and args is not None:
            leaves, _ = flatten_inputs(args, kwargs)
            if not self._add(job, "post_fwd_inputs", leaves, used):
                return self._drop(rec, "post_fwd_inputs")
            if self._docs:
                job.docs["post_fwd_inputs"] = ref.describe(tuple(args))
        self.writer.submit(job)

    def open_gradient_call(self, name: str, cls: str, k: int) -> CallRecord | None:
        """A ``<module>.backward`` call, opened by the first gradient that arrives for it."""
        if not self.logging:
            return None
        rec = CallRecord(
            step=self.state.index,
            module=name,
            dirname=self.state.claim_dirname(name, k),
            cls=cls,
            call_index=k,
            seq_start=self.state.tick(),
            backward=True,
        )
        self._calls.append(rec)
        self._gradients.append(rec)
        return rec

    def add_gradient(self, rec: CallRecord, kind: str, path: tuple[str, ...], grad: torch.Tensor) -> None:
        if self.logging and rec in self._gradients:
            job = WriteJob(rec, [], {})
            if self._add(job, kind, [(path, grad)], {s.stem for s in rec.tensors}):
                self.writer.submit(job)
            else:
                self._drop(rec, kind)

    def _add(self, job: WriteJob, kind: str, leaves: list[Leaf], used: set[str]) -> bool:
        """Snapshot ``leaves`` into ``job`` (and its call); False when back-pressure drops them."""
        snaps, need = self.snap.plan(kind, leaves, used)
        if need and not self.writer.reserve(need):
            self._last_refused = need
            return False
        job.nbytes += need
        if self.snap.copy(snaps):  # the copies' stream is in order: an event after the last one covers all
            index = next(torch.device(s.device).index for s in snaps if s.device and s.device.startswith("cuda"))
            job.ready = self.snap.ready_event(index)
        job.snaps.extend(snaps)
        job.record.tensors.extend(snaps)
        return True

    def _drop(self, rec: CallRecord, what: str) -> None:
        """Back-pressure dropped ``what`` of this call (the whole ``call``, or its ``outputs``): say so."""
        if self.writer.stopped is None:
            self._dropped.append({"step": rec.step, "module": rec.dirname, "bytes": self._last_refused, "what": what})
        rec.dropped = what

    def _device_selected(self, leaves: list[Leaf]) -> bool:
        for _, v in leaves:
            if isinstance(v, torch.Tensor):
                return self.selector.device(v.device)
        return True

    @contextlib.contextmanager
    def guard(self, where: str) -> Iterator[None]:
        """Run capture work inside someone else's model: our own torch calls are not ops to log, and any
        error stops logging instead of reaching the model (except the errors a user asked for)."""
        self.busy = True
        try:
            yield
        except (AnomalyError, GraftError):
            raise
        except Exception as e:
            self.writer.stop(f"{where} raised {type(e).__name__}: {e}")
        finally:
            self.busy = False

    @staticmethod
    def current_exception() -> BaseException | None:
        """The exception unwinding through an ``always_call`` hook, if any."""
        return sys.exc_info()[1]
