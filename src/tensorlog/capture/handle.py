"""``CaptureHandle``: one live capture of one model, and the step boundaries around its hooks.

It composes the parts that do the work, each owning its own state:
:class:`Recorder` (calls and steps), :class:`ModuleHooks`, :class:`GradientHooks`
and :class:`OpCapture` (where events come from), :class:`Writer` (files, on its
own threads). The handle decides only *when*: a step opens (hooks attach, if
the step is selected) and closes (hooks detach, the step goes to the writer,
and, unless ``async_write`` is set, the call waits until its files are on
disk).

Each call of the root module is one step. Integrations that own the step
boundary (vLLM's ``execute_model``, ``Debugger``) create the handle with
``auto_step=False`` and call :meth:`begin_step` / :meth:`end_step`.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigLike, LogConfig, load_config
from ..config.selection import Selector
from ..errors import AnomalyError
from ..schema import names
from ..schema.records import Anomaly
from ..storage.parquet import require_pyarrow
from ..storage.writer import Writer
from .backward import GradientHooks
from .compiled import StepOps, TapHooks, compiled_facts, compiled_mode, eager_only, forget_owner, traced_owner, unwrap_compiled
from .exit import EXIT
from .graft import Graft
from .graphtap import GraphTaps
from .hooks import ModuleHooks, RootHooks
from .ops import OpCapture
from .recorder import Recorder
from .run import RunInfo, UnusableOutputDir, base_manifest, claim_run_dir, release_claim, release_run_dir, write_module_tree
from .stacks import StackRecorder
from .steps import ForwardAbandoned, RemovedMidForward

__all__ = ["CaptureHandle", "start_capture", "RunInfo"]

_LIVE: weakref.WeakSet[CaptureHandle] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handle in list(_LIVE):
        handle._in_forked_child()


os.register_at_fork(after_in_child=_after_fork_in_child)

REMOVE_WAIT = 60.0
"""How long ``remove()`` from another thread waits for the forward in flight before it returns (the removal still
happens when that forward ends)."""

StepInfoFn = Callable[[tuple[Any, ...], dict[str, Any], bool], "dict[str, Any] | None"]
"""(args, kwargs, logged) of the root forward -> the step's request layout; called on every forward, so it can
keep state across steps, and told whether the step is logged (it must cost nothing when it is not)."""


class CaptureHandle:
    """A live capture: the run directory, step control, and ``remove()``.

    Returned by :func:`tensorlog.capture`; a context manager. ``remove()`` takes
    off every hook that capture added, finishes the files, marks the run
    complete (unless logging stopped early) and is idempotent.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: LogConfig,
        *,
        info: RunInfo | None = None,
        auto_step: bool = True,
        step_info: StepInfoFn | None = None,
        compiled: bool | None = None,
        token_bound: int | None = None,
    ) -> None:
        self.config = config
        self._token_bound = token_bound
        """The most tokens a step can hold (an engine's): bounds the staging of graph-native taps."""
        self.path: Path = config.run_dir
        self._info = info or RunInfo()
        self._selector = Selector(config)
        self._enabled = config.enabled and self._selector.rank(self._info.rank)
        self._removed = False
        self._auto = auto_step
        self._step_info_fn = step_info
        self._forked = self._fork_warned = False
        self._lock = threading.Lock()  # remove() against a forward that another thread runs
        self._remove_requested = False
        self._removal_done = threading.Event()
        self._pending_info: dict[str, Any] | None = None
        self._root: RootHooks | None = None
        self._forwards = 0
        self._step_open = False
        self._reported: Anomaly | None = None
        self._disabled_reason: str | None = None
        self._writer: Writer | None = None
        self._step_ops: StepOps | None = None
        self._taps: TapHooks | None = None
        """Graph taps: the compiled capture's hooks, or the sites of eager hooks that a compiler traced."""
        self._in_graph_forward = False
        self._owner = 0
        self._attach_pending = False
        self._graph_mode: bool | None = None
        self._compiled = compiled_mode(config, model, compiled)
        if not self._enabled:
            return
        if self._compiled:
            self._info.facts.setdefault("compiled", compiled_facts(model))
        rank = self._info.file_rank
        if config.parquet_window is not None:
            require_pyarrow()  # before the run directory is claimed
        try:
            self.path = claim_run_dir(config, rank)
        except UnusableOutputDir as e:
            self._disable(str(e))
            return
        graft = Graft(config.reload_input_dir, rank) if config.reload_input_dir else None
        try:
            write_module_tree(self.path, model, rank)
        except OSError as e:  # a full disk, a file size limit: no logging, and the model runs
            release_run_dir(self.path, rank)
            self._disable(f"cannot write to {self.path}: {e.strerror or e}")
            return
        try:
            self._writer = open_writer(config, model, self._info, self.path)
        except OSError as e:  # the run directory cannot be held (moved, or replaced by a link, already)
            release_run_dir(self.path, rank)
            self._disable(f"cannot write to {self.path}: {e.strerror or e}")
            return
        release_claim(self.path)  # the writer holds the run directory now
        self._recorder = Recorder(config, self._selector, self._writer, rank=rank, layout=self._writer.layout, graft=graft)
        self._sources(model)
        EXIT.add(self)
        _LIVE.add(self)
        if auto_step and self._compiled:
            self._step_ops = StepOps(model, self._op_begin, self._op_end, self._taps.native if self._taps else None)
        elif auto_step:
            self._root = RootHooks(model, self._forward_begins, self._forward_ends, traced=self._owner)
            self._open_step()

    def _sources(self, model: torch.nn.Module) -> None:
        """Where calls come from: module hooks (or graph taps), gradient hooks, op capture; stacks."""
        config = self.config
        modules = dict((unwrap_compiled(model) if self._compiled else model).named_modules())
        table = self._selector.select_modules([n for n in modules if n])
        targets = {n: (weakref.ref(modules[n]), calls) for n, calls in table.items()}
        self._targets = targets
        self._model_ref = weakref.ref(model)
        self._modules: ModuleHooks | TapHooks
        if self._compiled:
            self._recorder.snap.in_graph = True
            self._modules = self._taps = TapHooks(self._recorder, targets, self._graph_taps(model))
            self._modules.attach()  # for good: a compiled graph keeps the taps it was traced with
        else:
            self._owner = traced_owner(self._traced) if not eager_only(config) else 0
            self._modules = ModuleHooks(
                self._recorder, targets, forward=config.level != "op" and "forward" in config.passes, traced=self._owner
            )
        self._grads = GradientHooks(self._recorder, targets) if "backward" in config.passes else None
        self._ops = (
            OpCapture(self._recorder, self._selector, {n: weakref.ref(m) for n, m in modules.items()})
            if config.level in ("op", "mix")
            else None
        )
        self._stacks = StackRecorder() if config.stack else None
        if self._stacks is not None:
            self._recorder.on_call = self._stacks.record

    def _graph_taps(self, model: torch.nn.Module) -> GraphTaps | None:
        """Native taps (``graph_taps: native``), on the device of the model's first parameter."""
        if self.config.graph_taps != "native":
            return None
        first = next(iter(model.parameters()), None)
        return GraphTaps(
            first.device if first is not None else torch.device("cpu"),
            stage_all=self.config.mode in ("tensor", "md5"),
            small_values=self.config.small_tensor_values,
            budget_bytes=self.config.max_pending_bytes,
            token_bound=self._token_bound,
            files_up_to=(
                (sys.maxsize if self.config.max_tensor_size is None else self.config.max_tensor_size)
                if self.config.mode == "tensor"
                else None
            ),
            always_measure=self.config.detect_anomaly,
        )

    def _traced(self, name: str, kind: str) -> tuple[int, int]:
        """A compiler traces an eager hook (``capture`` came before ``torch.compile``): from now on this capture
        is a compiled one, its hooks stay on, and each traced call becomes a graph tap. Returns ``(site, taps)``
        for a module's ``pre``/``post`` tap, or ``(step op, taps)`` for the root (``root``). Trace time only."""
        if self._taps is None:
            self._compiled = True
            self._recorder.snap.in_graph = True
            self._info.facts["compiled"] = {"mode": "compiled", "backend": "torch.compile (after capture)", "cudagraphs": False}
            model = self._model_ref()
            self._taps = TapHooks(self._recorder, self._targets, self._graph_taps(model) if model is not None else None)
            if not self._modules.attached:  # a step that is not logged: no module hook is there to be traced
                self._attach_pending = True  # on from the next step on (not mid-trace: Dynamo cannot take it)
                warnings.warn(
                    "tensorlog: torch.compile traced the model during a step that is not logged, so its graph has "
                    "no taps and later steps reuse it: log the first step the compiled model runs, or call "
                    "torch.compiler.reset() once that step is over",
                    RuntimeWarning,
                    stacklevel=2,
                )
        native = self._taps.native.id if self._taps.native is not None else 0
        if kind != "root":
            return self._taps.site_of(name, kind), native
        if self._step_ops is None:
            self._step_ops = StepOps(None, self._op_begin, self._op_end, self._taps.native)
        return self._step_ops.id, native

    def _disable(self, reason: str) -> None:
        self._enabled = False
        self._disabled_reason = reason
        warnings.warn(f"tensorlog: not logging this run: {reason}; the model runs without it", RuntimeWarning, stacklevel=3)

    # -- public --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False when the config is disabled, this rank is not selected, or the output dir is unusable."""
        return self._enabled

    @property
    def step_index(self) -> int:
        """The step that the next logged call belongs to."""
        return self._recorder.state.index if self._writer is not None else 0

    @property
    def stopped_reason(self) -> str | None:
        """Why logging stopped early (budget, disk full, hook error, unusable directory), or None."""
        return self._writer.stopped if self._writer is not None else self._disabled_reason

    @property
    def anomaly(self) -> Anomaly | None:
        """The first NaN/Inf found (``detect_anomaly``), once its step is on disk."""
        return self._writer.anomaly if self._writer is not None else None

    @property
    def logging_step(self) -> bool:
        """True while a step that is logged is open."""
        return self._writer is not None and self._recorder.in_step

    @property
    def paused(self) -> bool:
        return self._writer is not None and self._recorder.paused

    def pause(self) -> None:
        """Stop logging until :meth:`resume`; hooks stay registered and return at once."""
        if self._writer is not None:
            self._recorder.paused = True

    def resume(self) -> None:
        if self._writer is not None:
            self._recorder.paused = False

    def step(self) -> None:
        """End the current step; what runs next belongs to the next step.

        For when the module passed to :func:`tensorlog.capture` is not called once
        per step (you capture a submodule, or run a loop of your own).
        """
        self.end_step()
        self.begin_step()

    def begin_step(self, index: int | None = None) -> None:
        """Open the next step, or step ``index`` (for an integration that numbers steps itself, such as an
        engine's step counter): hooks attach only while a selected step is open."""
        if self._writer is not None and not self._removed:
            if index is not None and not self._step_open:
                self._recorder.state.index = index
            self._open_step()

    def end_step(self, info: dict[str, Any] | None = None) -> None:
        """Close the open step, wait until its files are on disk, and take every hook off unless the next step is logged.

        ``info`` (json-safe: request ids, tokens per request) is recorded in the step's index.
        """
        if self._writer is not None and not self._removed:
            self._close_step(info)

    def annotate_step(self, info: dict[str, Any]) -> None:
        """Record the current step's request layout (see :meth:`end_step`)."""
        self._pending_info = {**(self._pending_info or {}), **info}

    def flush(self) -> None:
        """Block until everything captured so far is on disk."""
        if self._writer is not None:
            self._writer.flush()

    def remove(self) -> None:
        """Remove every hook, finish the files, and finalise ``run.json``. Safe to call twice, and from any thread:
        called while another thread's forward runs, the model's thread finishes the removal when that forward
        returns (this waits for it, at most :data:`REMOVE_WAIT` seconds)."""
        with self._lock:
            if self._removed or self._remove_requested:
                pending = self._remove_requested
            elif self._root is not None and self._root.busy_elsewhere():
                self._remove_requested = pending = True
            else:
                self._removed, pending = True, False
        if pending:
            self._removal_done.wait(REMOVE_WAIT)
            return
        self._remove_now()

    def _remove_now(self) -> None:
        try:
            self._finish_removal()
        finally:
            self._removal_done.set()  # a remove() waiting on another thread returns

    def _finish_removal(self) -> None:
        EXIT.discard(self)
        depth = self._root.depth if self._root is not None else 0
        inside = self._root is not None and self._root.inside_forward()
        if self._root is not None:
            self._root.remove()
        if self._step_ops is not None:
            self._step_ops.remove()
        if self._writer is None:
            return
        try:
            left = RemovedMidForward() if inside else ForwardAbandoned()
            self._close_step(None, raised=(sys.exc_info()[1] or left) if depth else None)
        except AnomalyError:
            pass
        self._detach()
        self._modules.detach()
        if self._taps is not None:
            self._taps.detach()
        forget_owner(self._owner)
        self._writer.close(complete=True)
        if self._stacks is not None and self._writer.stopped is None:
            self._stacks.write(self.path / names.stack_file(self._info.file_rank))

    close = remove

    def __enter__(self) -> CaptureHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "disabled" if not self._enabled else ("removed" if self._removed else f"step {self.step_index}")
        return f"<tensorlog capture {self.path} ({state})>"

    # -- steps ------------------------------------------------------------------------------

    def _in_forked_child(self) -> None:
        """This process is a fork of the one that started the capture: its writer's threads did not come along,
        so it must never wait for them. It logs nothing, and says so once, at its first forward."""
        self._forked = True
        self._writer = None
        self._recorder.in_step = False
        self._step_open = False

    def _forward_begins(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._forked:
            if not self._fork_warned:
                self._fork_warned = True
                self._detach()
                warnings.warn(
                    f"tensorlog: this process (pid {os.getpid()}) was forked from the one that started the capture "
                    f"of {self.path}; it logs nothing (start a capture of its own in it)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        if self._grads is not None and self._forwards:
            self._close_step(None)  # with gradients logged, a step ends when the next forward starts
        self._open_step()
        if self._step_info_fn is not None:
            try:
                info = self._step_info_fn(args, kwargs, self._recorder.in_step)
                if info and self._recorder.in_step:
                    self.annotate_step(info)
            except Exception:  # facts for alignment only; never break the model
                pass

    def _forward_ends(self, raised: BaseException | None) -> None:
        self._forwards += 1
        if self._grads is None:
            self._close_step(None, raised=raised)
        if self._remove_requested:  # another thread asked while this forward ran: the model's thread removes
            with self._lock:
                self._removed, self._remove_requested = True, False
            self._remove_now()

    def _op_begin(self, table: torch.Tensor | None = None) -> None:
        """The root's step op, at run time: a forward that raised left its step open; it ends here."""
        if self._step_open and self._in_graph_forward:
            self._close_step(None, raised=RuntimeError("the previous forward did not return"))
        self._in_graph_forward = True
        self._open_step(table)

    def _op_end(self, table: torch.Tensor | None = None, staged: dict[str, torch.Tensor] | None = None) -> None:
        self._in_graph_forward = False
        self._close_step(None, table=table, staged=staged)

    def _open_step(self, table: torch.Tensor | None = None) -> None:
        if self._attach_pending:  # compiled now: the module hooks stay on, for the graphs traced from here
            self._attach_pending = False
            self._modules.attach()
        if self._step_open:
            if self._taps is not None and self._taps.native is not None and self._recorder.in_step:
                self._taps.native.begin(table)  # opened before the graph's first forward (capture, then compile)
            return
        self._step_open = True
        self._forwards = 0
        self._pending_info = None
        if self._selector.step(self._recorder.state.index) and self._writer is not None and self._writer.stopped is None:
            self._recorder.begin_step()
            self._modules.attach()
            if self._taps is not None:
                self._taps.begin_step()
                if self._taps.native is not None:
                    self._taps.native.begin(table)
            if self._grads is not None:
                self._grads.begin_step()
                self._grads.attach()
            if self._ops is not None:
                self._ops.begin_step()
                self._ops.attach()
        else:
            self._detach()

    def _close_step(
        self,
        info: dict[str, Any] | None,
        *,
        raised: BaseException | None = None,
        table: torch.Tensor | None = None,
        staged: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if not self._step_open:
            return
        self._step_open = False
        rec = self._recorder
        if self._taps is not None and rec.in_step:
            with rec.guard("reading the graph's taps"):
                self._taps.replay(table, staged)
        info = info if info is not None else self._pending_info
        step = None
        if rec.in_step:
            news, counted, facts = self._observed()
            progress = facts if counted and not news else None  # only a count moved: no rewrite of its own
            step = rec.end_step(info, raised=raised, manifest=facts if news else None, progress=progress)
        self._graph_mode = None
        rec.state.advance()
        if not self._selector.step(rec.state.index) or self._writer is None or self._writer.stopped is not None:
            self._detach()  # hooks stay on only when the next step is logged too: attaching costs a whole forward's worth
        self._pending_info = None
        assert self._writer is not None
        if step is not None and not self.config.async_write:
            self._writer.wait_step(step)
        self._check_anomaly()

    def _observed(self) -> tuple[bool, bool, dict[str, Any] | None]:
        """``(news, counted, run.json's compiled)``: whether what the graph showed changed, whether this step
        moved a count of replayed or eager steps."""
        if self._taps is None:
            return False, False, None
        facts = self._info.facts["compiled"]
        counted = self._graph_mode is not None
        if counted:
            key = "steps_replayed" if self._graph_mode else "steps_eager"
            facts[key] = facts.get(key, 0) + 1
        news, doc = self._taps.observed(facts)
        return news, counted, doc

    def graph_replayed(self, replayed: bool) -> None:
        """An integration's word on the current step: its forward replayed a CUDA graph, or ran without one."""
        self._graph_mode = replayed

    def _check_anomaly(self) -> None:
        a = self.anomaly
        if a is not None and a is not self._reported:
            self._reported = a
            if self.config.stop_on_anomaly:
                where = "born in" if a.born_here else "first seen in"
                raise AnomalyError(f"NaN/Inf {where} {a.module!r} at step {a.step}")

    def _detach(self) -> None:
        if not self._compiled:
            self._modules.detach()
        if self._grads is not None:
            self._grads.detach()
        if self._ops is not None:
            self._ops.detach()


def open_writer(config: LogConfig, model: torch.nn.Module, info: RunInfo, path: Path) -> Writer:
    """The run's writer, with ``run.json``'s first version."""
    layout = "statistics" if config.mode != "tensor" else config.layout
    return Writer(
        path,
        base_manifest(config, model, info, layout=layout, path=path),
        rank=info.file_rank,
        layout=layout,
        fmt=config.format,
        threads=config.writer_thread_count,
        max_pending_bytes=config.max_pending_bytes,
        drop=config.on_backpressure == "drop",
        max_total_bytes=config.max_total_bytes,
        detect_anomaly=config.detect_anomaly,
        parquet_window=config.parquet_window,
        retain_steps=config.retain_steps,
        retain_bytes=config.retain_bytes,
    )


def start_capture(
    model: torch.nn.Module,
    config: ConfigLike | None = None,
    /,
    *,
    info: RunInfo | None = None,
    step_info: StepInfoFn | None = None,
    **overrides: Any,
) -> CaptureHandle:
    """The core of :func:`tensorlog.capture`, with the facts an integration adds passed in."""
    cfg = load_config(config if config is not None else {})
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    return CaptureHandle(model, cfg, info=info, step_info=step_info)
