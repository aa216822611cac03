"""The recorder: hook events in, :class:`CallRecord` objects out, one step at a time.

Module hooks, op-level capture and backward hooks all report here. The
recorder owns the step's bookkeeping (:class:`StepState`), the snapshots and
the records of the open step, and hands them to the writer. Everything runs on
the model's thread except :meth:`Recorder.add_gradient`: autograd calls
gradient hooks from its own threads (one per device on CUDA) while the model's
thread waits in ``backward()``, so that method holds the recorder's lock.

Hook code runs inside someone else's model: it returns nothing that changes
the computation (except a requested graft of inputs), and any error it meets
stops logging (warned once, recorded in ``run.json``) instead of reaching the
model. The exceptions a user asked for go through: ``AnomalyError``
(``stop_on_anomaly``) and ``GraftError`` (``reload_input_dir``).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..config import LogConfig
from ..config.selection import Selector
from ..errors import AnomalyError, GraftError
from ..schema import vllm_json as ref
from ..schema.leaves import Leaf, flatten_inputs, flatten_value
from ..storage.records import CallRecord, StepEnd, WriteJob
from ..storage.writer import Writer
from .snapshot import Snapshotter
from .steps import ForwardAbandoned, RemovedMidForward, StepState

__all__ = ["Recorder", "GradientCall"]


@dataclass(slots=True, eq=False)
class GradientCall:
    """A module call's ``<module>.backward`` call: made by its forward hook, opened by its first gradient.

    ``record`` belongs to the recorder and is read and set under its lock only.
    """

    name: str
    cls: str
    k: int
    record: CallRecord | None = None


class Recorder:
    def __init__(
        self, config: LogConfig, selector: Selector, writer: Writer, *, rank: int | None, layout: str, graft: Any = None
    ) -> None:
        self.config = config
        self.selector = selector
        self.writer = writer
        self.layout = layout
        self.state = StepState()
        self.snap = Snapshotter(config, selector, rank, layout, writer)
        self.graft = graft
        self.paused = False
        self.busy = False
        self.on_call: Callable[[str], None] | None = None
        """Called with the module name of each logged call (``stack: true`` records call sites)."""
        self.in_step = False
        self._calls: list[CallRecord] = []
        self._open: dict[str, list[CallRecord | None]] = {}
        """Open calls per module name, innermost last: the record, or None for a call not logged."""
        self._dropped: list[dict[str, Any]] = []
        self._last_refused = 0
        self._gradients: list[CallRecord] = []
        self._lock = threading.Lock()
        """Serialises the gradient hooks' calls (:meth:`add_gradient`), which come from autograd's threads."""
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

    def end_step(
        self,
        info: dict[str, Any] | None = None,
        *,
        raised: BaseException | None = None,
        manifest: dict[str, Any] | None = None,
        progress: dict[str, Any] | None = None,
    ) -> int | None:
        """Hand the step to the writer; returns its index when anything was handed over."""
        if not self.in_step:
            return None
        self.in_step = False
        step = self.state.index
        unfinished = [r.dirname for calls in self._open.values() for r in calls if r is not None]
        complete, why = True, None
        if raised is not None or unfinished:
            complete = False
            what = (
                (
                    str(raised)
                    if isinstance(raised, (ForwardAbandoned, RemovedMidForward))
                    else f"the forward raised {type(raised).__name__}"
                )
                if raised is not None
                else "calls never returned"
            )
            why = what + (f" with {len(unfinished)} call(s) open ({', '.join(unfinished[:3])})" if unfinished else "")
        if self.writer.stopped is not None:
            return None
        for rec in self._gradients:  # the backward pass has run: its calls are whole now
            rec.seq_end = self.state.tick()
        self._gradients = []
        end = StepEnd(
            step=step,
            order=list(self.state.order),
            calls=self._calls,
            info=info,
            complete=complete,
            incomplete_reason=why,
            dropped=self._dropped,
            manifest=manifest,
            progress=progress,
        )
        self.snap.end_step(end)
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
    ) -> tuple[CallRecord | None, Any]:
        """A call starts: its record (None when not logged) and, with a graft, the replacement ``(args, kwargs)``.

        Safe to call from a hook: an error stops logging instead of reaching the model.
        """
        self.busy = True
        try:
            return self._enter(name, cls, args, kwargs, calls, backward)
        except (AnomalyError, GraftError):
            raise
        except Exception as e:
            self.writer.stop(f"hook on {name!r} raised {type(e).__name__}: {e}")
            return None, None
        finally:
            self.busy = False

    def leave(self, name: str, output: Any, *, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None) -> None:
        """The innermost open call of ``name`` returned ``output``; as safe as :meth:`enter`."""
        self.busy = True
        try:
            self._leave(name, output, args, kwargs)
        except Exception as e:
            self.writer.stop(f"hook on {name!r} raised {type(e).__name__}: {e}")
        finally:
            self.busy = False

    def _enter(
        self,
        name: str,
        cls: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        calls: frozenset[int] | None,
        backward: bool,
    ) -> tuple[CallRecord | None, Any]:
        k = self.state.next_call(name)
        stack = self._open.get(name)
        if stack is None:
            stack = self._open[name] = []
        stack.append(None)
        if (calls is not None and k not in calls) or not self.logging:
            return None, None
        leaves, structure = flatten_inputs(args, kwargs)
        if not self._device_selected(leaves):
            return None, None
        rec = self._record(name, cls, k, backward)
        job = WriteJob(rec, [], {})
        if "input" in self._directions:
            if not self._add(job, "inputs", leaves, set()):
                self._drop(rec, "call")
                return None, None
            rec.structure = structure
            if self._docs:
                job.docs["inputs"] = ref.describe(tuple(args))
        stack[-1] = rec
        self._calls.append(rec)
        self.writer.submit(job)
        if self.on_call is not None:
            self.on_call(name)
        replacement = None
        if self.graft is not None and not backward:
            replacement = self.graft.inputs_for(rec, args, kwargs)
            rec.grafted = replacement is not None
        return rec, replacement

    def _leave(self, name: str, output: Any, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None) -> None:
        stack = self._open.get(name)
        if not stack:
            return
        rec = stack.pop()
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

    def add_gradient(self, call: GradientCall, kind: str, path: tuple[str, ...], grad: torch.Tensor) -> None:
        """A gradient of ``call`` arrived, on any of autograd's threads; the first one opens the call.

        As safe as :meth:`enter`. A gradient that arrives once its step has ended is not logged.
        """
        with self._lock, self.guard(f"gradient hook on {call.name!r}"):
            if call.record is None and self.logging:
                call.record = self._record(call.name, call.cls, call.k, backward=True)
                self._calls.append(call.record)
                self._gradients.append(call.record)
            rec = call.record
            if rec is not None and self.logging and rec in self._gradients:
                job = WriteJob(rec, [], {})
                if self._add(job, kind, [(path, grad)], {s.stem for s in rec.tensors}):
                    self.writer.submit(job)
                else:
                    self._drop(rec, kind)

    def open_calls(self, name: str) -> int:
        """How many calls of ``name`` have started and not returned."""
        return len(self._open.get(name, ()))

    def _record(self, name: str, cls: str, k: int, backward: bool) -> CallRecord:
        """A logged call starts: its directory is claimed and it takes a sequence number."""
        return CallRecord(
            step=self.state.index,
            module=name,
            dirname=self.state.claim_dirname(name, k),
            cls=cls,
            call_index=k,
            seq_start=self.state.tick(),
            backward=backward,
        )

    def _add(self, job: WriteJob, kind: str, leaves: list[Leaf], used: set[str]) -> bool:
        """Snapshot ``leaves`` into ``job`` (and its call); False when back-pressure drops them."""
        snaps, sources, need = self.snap.plan(kind, leaves, used)
        if need and not self.writer.reserve(need):
            self._last_refused = need
            return False
        job.nbytes += need
        copying = self.snap.copy(snaps, sources, leaves, job.step)
        if copying is None:  # the packed layout's staging memory is full
            self.writer.unreserve(need)
            job.nbytes -= need
            self._last_refused = sum((s.numel or 0) * (s.dtype.itemsize if s.dtype else 0) for s in snaps)
            return False
        if copying:  # the copies' stream is in order: an event after the last one covers all
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
