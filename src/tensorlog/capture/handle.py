"""Hooks that snapshot the inputs and outputs of selected modules.

``capture(model, config)`` registers a forward pre-hook and a forward hook on
each module whose qualified name the config selects (and nothing at all when
the config is disabled), plus a pair on the root module that marks steps.
Hooks are attached only while a selected step is running: on other steps
the model runs with no tensorlog hook on any submodule.

Hooks never return a value (so they cannot change what the model computes)
and never raise: any error inside them stops logging for the run, warns once,
and is recorded in ``run.json``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
import threading
import time
import warnings
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.hooks import RemovableHandle

from ..schema import names as _layout
from ..config import ConfigLike, LogConfig, load_config
from .selection import Selector
from .flatten import TensorMeta, describe_value, flatten_inputs_with_structure, flatten_outputs, stats_tensor
from ..storage.writer import CallRecord, TensorSnapshot, Writer, write_json

__all__ = ["capture", "CaptureHandle", "RunInfo", "AnomalyError"]


class AnomalyError(RuntimeError):
    """Raised with ``stop_on_anomaly`` at the first NaN/Inf; ``run.json`` says where it was born."""


class RunInfo:
    """Facts about the process that ``run.json`` records; integrations fill in more."""

    def __init__(self, *, rank: int | None = None, world_size: int | None = None, **extra: Any) -> None:
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank = rank
        self.world_size = world_size
        self.extra = extra

    @property
    def file_rank(self) -> int | None:
        """The rank that goes into file names: only when several ranks share a directory."""
        return self.rank if (self.world_size or 1) > 1 else None


def _op_table() -> dict[Any, str]:
    F = torch.nn.functional
    T = torch.Tensor
    table: dict[Any, str] = {}
    groups = {
        "linear": [F.linear], "matmul": [torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__], "bmm": [torch.bmm, T.bmm],
        "softmax": [F.softmax, torch.softmax, T.softmax], "log_softmax": [F.log_softmax, T.log_softmax],
        "scaled_dot_product_attention": [F.scaled_dot_product_attention], "embedding": [F.embedding],
        "layer_norm": [F.layer_norm], "rms_norm": [getattr(F, "rms_norm", None)], "group_norm": [F.group_norm],
        "silu": [F.silu], "gelu": [F.gelu], "relu": [F.relu, torch.relu, T.relu], "tanh": [torch.tanh, T.tanh, F.tanh],
        "sigmoid": [torch.sigmoid, T.sigmoid, F.sigmoid], "rsqrt": [torch.rsqrt, T.rsqrt],
        "add": [torch.add, T.add, T.__add__, T.__radd__, T.__iadd__], "sub": [torch.sub, T.sub, T.__sub__, T.__rsub__],
        "mul": [torch.mul, T.mul, T.__mul__, T.__rmul__, T.__imul__], "div": [torch.div, T.div, T.__truediv__, T.__rtruediv__],
        "pow": [torch.pow, T.pow, T.__pow__],
    }
    for name, funcs in groups.items():
        for f in funcs:
            if f is not None:
                table[f] = name
    return table


_OPS: dict[Any, str] | None = None


class _OpMode(torch.overrides.TorchFunctionMode):
    """Routes selected torch operations (and custom ``torch.ops``) called inside the model to the capture."""

    def __init__(self, handle: "CaptureHandle") -> None:
        super().__init__()
        self.handle = handle

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        h = self.handle
        if h._busy or not h._module_stack:
            return func(*args, **kwargs)
        global _OPS
        if _OPS is None:
            _OPS = _op_table()
        try:
            name = _OPS.get(func)
        except TypeError:  # unhashable callables
            name = None
        if name is None and isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            ns = getattr(func, "namespace", None) or str(func).split(".")[0]
            if ns not in ("aten", "prim", "prims"):
                name = str(func).replace("::", ".").replace(".default", "")
        if name is None:
            return func(*args, **kwargs)
        return h._run_op(func, name, args, kwargs)


class _Call:
    __slots__ = ("record",)

    def __init__(self, record: CallRecord | None) -> None:
        self.record = record


class CaptureHandle:
    """A live capture: the run directory, manual step control, and ``remove()``.

    Returned by :func:`capture`; usable as a context manager. ``remove()``
    takes off every hook that ``capture`` added, flushes pending writes,
    marks the run complete (unless logging stopped early) and is idempotent.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: LogConfig,
        *,
        info: RunInfo | None = None,
        auto_step: bool = True,
        open_first_step: bool = True,
    ) -> None:
        self.config = config
        self._info = info or RunInfo()
        self._model_class = f"{type(model).__module__}.{type(model).__qualname__}"
        self._handles: list[RemovableHandle] = []
        self._module_handles: list[RemovableHandle] = []
        self._removed = False
        self._lock = threading.RLock()
        self._stop_lock = threading.Lock()
        self.path: Path = config.run_dir
        self._selector = Selector(config)
        self._enabled = config.enabled and self._selector.rank(self._info.rank)
        self._external_steps = not auto_step
        self._step = 0
        self._root_depth = 0
        self._steps_written: list[int] = []
        self._step_info: dict[int, dict[str, Any]] = {}
        self._in_step = False
        self._paused = False
        self._busy = False
        self._op_mode: _OpMode | None = None
        self._module_stack: list[str] = []
        self._op_calls: dict[str, Any] = {}
        self._anomaly: dict[str, Any] | None = None
        self._stacks: dict[tuple[str, str, int], list[str]] = {}
        self._directions = config.directions
        self._backward = "backward" in config.passes
        self._root_calls = 0
        self._all_modules: dict[str, weakref.ref[torch.nn.Module]] = {}
        self._hierarchy: dict[str, Any] = {}
        self._streams: dict[int | None, Any] = {}
        self._manifest_at = 0.0
        self._finished = False
        self._stopped: str | None = None
        self._writer: Writer | None = None
        self._targets: dict[str, tuple[weakref.ref[torch.nn.Module], frozenset[int] | None]] = {}
        self._started = _now()
        if not self._enabled:
            return
        self._prepare_run_dir()
        self._writer = Writer(
            self.path,
            rank=self._info.file_rank,
            fmt=config.format,
            max_pending_bytes=config.max_pending_bytes,
            on_backpressure=config.on_backpressure,
            max_total_bytes=config.max_total_bytes,
            on_stop=self._stop_logging,
        )
        names = [n for n, _ in model.named_modules() if n]
        table = self._selector.select_modules(names)
        modules = dict(model.named_modules())
        self._targets = {n: (weakref.ref(modules[n]), calls) for n, calls in table.items()}
        self._all_modules = {n: weakref.ref(m) for n, m in modules.items()}
        self._hierarchy = {n or "": {"class": type(m).__name__, "children": [f"{n}.{c}" if n else c for c, _ in m.named_children()]}
                           for n, m in modules.items()}
        self._write_manifest(complete=False)
        _EXIT.add(self)
        if auto_step:
            self._handles.append(model.register_forward_pre_hook(self._root_pre))
            self._handles.append(model.register_forward_hook(self._root_post, always_call=True))
        if open_first_step:
            self.begin_step()

    # -- public --------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False when the config is disabled (no hook was registered)."""
        return self._enabled

    @property
    def step_index(self) -> int:
        """The step that the next logged call belongs to."""
        return self._step

    @property
    def stopped_reason(self) -> str | None:
        """Why logging stopped early (budget, disk full, hook error), or None."""
        return self._stopped

    def step(self) -> None:
        """End the current step; what runs next belongs to the next step.

        Use it when the module passed to :func:`capture` is not the one being
        called once per step (e.g. you capture a submodule, or run a custom loop).
        """
        with self._lock:
            self._close_step(None, detach=False)  # the next step re-attaches or detaches as selected
            self.begin_step()

    def begin_step(self) -> None:
        """Open the next step: hooks are attached only while a selected step is open.

        Integrations that own the step boundary (vLLM's ``execute_model``) call
        this and :meth:`end_step` instead of :meth:`step`, so that warm-up and
        profiling forwards between steps run with no hook at all.
        """
        with self._lock:
            if not self._enabled or self._removed or self._in_step:
                return
            self._in_step = True
            if self._external_steps and self._writer is not None:
                self._writer.hold()  # the caller's step is the model running: write after it
            self._begin_step()

    def end_step(self, info: dict[str, Any] | None = None) -> None:
        """Close the open step and take every hook off until the next :meth:`begin_step`.

        ``info`` (json-safe) is recorded for the step in ``run.json``.
        """
        self._close_step(info, detach=True)

    def pause(self) -> None:
        """Stop logging until :meth:`resume`; hooks stay registered and return at once."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    @property
    def anomaly(self) -> dict[str, Any] | None:
        """The first NaN/Inf found (with ``detect_anomaly``): step, module, whether it was born there."""
        return self._anomaly

    def annotate_step(self, info: dict[str, Any]) -> None:
        """Record json-safe facts about the current step (request ids, positions) in ``run.json``."""
        with self._lock:
            if self._enabled and self._selector.step(self._step):
                self._step_info[self._step] = {**self._step_info.get(self._step, {}), **info}

    def _close_step(self, info: dict[str, Any] | None, *, detach: bool) -> None:
        with self._lock:
            if not self._enabled or self._removed or not self._in_step:
                return
            self._in_step = False
            if self._external_steps and self._writer is not None:
                self._writer.release()
            if info is not None and self._selector.step(self._step):
                self._step_info[self._step] = info
            self._end_step()
            if detach:
                self._detach_modules()

    def flush(self) -> None:
        """Block until everything captured so far is on disk."""
        if self._writer is not None:
            self._writer.flush()

    def remove(self) -> None:
        """Remove every hook, flush, and finalise ``run.json``. Safe to call twice."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
            _EXIT.discard(self)
            for h in self._handles:
                h.remove()
            self._detach_modules()
            if not self._enabled:
                return
            if self._in_step:
                self._in_step = False
                if self._external_steps and self._writer is not None:
                    self._writer.release()
                self._end_step()
            assert self._writer is not None
            self._writer.close()
            try:
                if self.config.stack:
                    self._write_stacks()
                self._write_manifest(complete=self._stopped is None)
            except OSError as e:  # the disk that stopped logging may not take the manifest either
                if self._stopped is None:
                    self._stop_logging(f"cannot write run.json: {e}")

    close = remove

    def __enter__(self) -> "CaptureHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "disabled" if not self._enabled else ("removed" if self._removed else f"step {self._step}")
        return f"<tensorlog capture {self.path} ({state})>"

    # -- steps -----------------------------------------------------------------------

    def _root_pre(self, module: torch.nn.Module, args: Any) -> None:
        if self._root_depth == 0 and self._backward and self._root_calls:
            self.step()  # with gradients logged, a step ends when the next forward starts
        if self._root_depth == 0 and self._writer is not None:
            self._writer.hold()
        self._root_depth += 1

    def _root_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._root_depth -= 1
        if self._root_depth == 0 and self._writer is not None:
            self._writer.release()
        if self._root_depth == 0:
            self._root_calls += 1
            if not self._backward:
                self.step()

    def _begin_step(self) -> None:
        self._seen: dict[int, tuple[Any, int, TensorSnapshot]] = {}
        self._root_calls = 0
        self._module_stack = []
        self._seq = 0
        self._call_counts: dict[str, int] = defaultdict(int)
        self._order: list[str] = []
        self._open: dict[str, list[_Call]] = defaultdict(list)
        if self._stopped is None and self._selector.step(self._step):
            self._attach_modules()
        else:
            self._detach_modules()

    def _end_step(self) -> None:
        logged = bool(self._order) and self._writer is not None and self._stopped is None
        if logged:
            step, order = self._step, list(self._order)
            assert self._writer is not None
            self._writer.submit(lambda: self._write_calls_file(step, order))
        self._step += 1
        last = self._selector.last_step
        done = last is not None and self._step > last
        now = time.monotonic()
        if self._writer is not None and self._stopped is None and (logged or self._step_info) and (
            done or now - self._manifest_at >= 1.0
        ):
            # Keep run.json current (steps written, per-step info) so a run killed later still says what
            # it holds; at most once a second, as rewriting it every step would cost more than the step.
            self._manifest_at = now
            self._writer.submit(lambda: self._write_manifest(complete=done))
            if self.config.stack:
                self._writer.submit(self._write_stacks)
            self._finished = done

    def _write_stacks(self) -> None:
        if self._stacks:
            entries = [{"module": n, "call_site": f"{f}:{line}", "stack": st} for (n, f, line), st in list(self._stacks.items())]
            write_json(self.path / f"stack{_layout.rank_infix(self._info.file_rank)}.json", entries)

    def _write_calls_file(self, step: int, order: list[str]) -> None:
        d = self.path / _layout.step_dir(step)
        d.mkdir(parents=True, exist_ok=True)
        data = "".join(f"{name}\n" for name in order).encode()
        from ..storage.writer import atomic_write

        atomic_write(d / _layout.calls_file(self._info.file_rank), lambda f: f.write(data))
        self._steps_written.append(step)

    # -- hooks -----------------------------------------------------------------------

    def _attach_modules(self) -> None:
        if self._module_handles:
            return
        cfg = self.config
        log_modules = cfg.level in ("module", "mix")
        backward = "backward" in cfg.passes
        forward = "forward" in cfg.passes
        if cfg.level in ("op", "mix"):
            for name, ref in self._all_modules.items():
                module = ref()
                if module is not None:
                    self._module_handles.append(module.register_forward_pre_hook(self._make_enter(name)))
                    self._module_handles.append(module.register_forward_hook(self._make_leave(name), always_call=True))
        if not log_modules:
            return
        for name, (ref, calls) in self._targets.items():
            module = ref()
            if module is None:
                continue
            if forward:
                self._module_handles.append(module.register_forward_pre_hook(self._make_pre(name, calls), with_kwargs=True))
                self._module_handles.append(module.register_forward_hook(self._make_post(name), with_kwargs=True))
            if backward:
                self._module_handles.append(module.register_full_backward_hook(self._make_backward(name, calls)))

    def _detach_modules(self) -> None:
        for h in self._module_handles:
            h.remove()
        self._module_handles = []
        if self._op_mode is not None:  # a forward that raised left the mode on the stack
            self._leave_op_mode()

    # Hooks and the op mode run inside someone else's model: they return nothing (so they cannot
    # change what it computes) and contain every error (logging stops, the model goes on).

    def _begin_call(self, name: str, cls: str, k: int, entries: list[tuple[Any, Any]], structure: dict[str, Any] | None) -> CallRecord | None:
        if not self._device_selected(entries):
            return None
        rec = CallRecord(self._step, name, cls, k, self._next_seq())
        if "input" in self._directions:
            rec.inputs = self._snapshot("inputs", entries, rec)
            rec.structure = structure
        if self.config.stack:
            self._record_stack(rec.module)
        self._order.append(rec.dirname)
        return rec

    def _end_call(self, rec: CallRecord, output: Any) -> None:
        rec.seq_end = self._next_seq()
        outputs = flatten_outputs(output)
        if "output" in self._directions:
            rec.outputs = self._snapshot("outputs", outputs, rec)
        if rec.on_cuda:  # the copies were non-blocking: the writer waits on this
            rec.ready = torch.cuda.Event()
            rec.ready.record(self._streams.get(rec.cuda_device))
        assert self._writer is not None
        self._writer.submit_call(rec)
        if self.config.detect_anomaly and self._anomaly is None:
            self._check_anomaly(rec, outputs)

    def _make_pre(self, name: str, calls: frozenset[int] | None) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            with self._guard(f"hook on {name!r}"):
                k = self._call_counts[name]
                self._call_counts[name] = k + 1
                call = _Call(None)
                self._open[name].append(call)
                if (calls is not None and k not in calls) or self._stopped is not None or self._paused:
                    return
                entries, structure = flatten_inputs_with_structure(args, kwargs)
                call.record = self._begin_call(name, type(module).__name__, k, entries, structure)

        return pre_hook

    def _make_post(self, name: str) -> Callable[..., None]:
        def post_hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            with self._guard(f"hook on {name!r}"):
                stack = self._open.get(name)
                if not stack:
                    return
                rec = stack.pop().record
                if rec is None or self._stopped is not None:
                    return
                self._end_call(rec, output)

        return post_hook

    def _make_backward(self, name: str, calls: frozenset[int] | None) -> Callable[..., None]:
        """Gradients: inputs = the gradient flowing in (w.r.t. outputs), outputs = w.r.t. inputs."""
        bname = f"{name}.backward"

        def backward_hook(module: torch.nn.Module, grad_input: Any, grad_output: Any) -> None:
            with self._guard(f"backward hook on {name!r}"):
                k = self._call_counts[bname]
                self._call_counts[bname] = k + 1
                if (calls is not None and k not in calls) or self._stopped is not None or self._paused:
                    return
                rec = self._begin_call(bname, type(module).__name__, k, flatten_outputs(tuple(grad_output)), None)
                if rec is not None:
                    self._end_call(rec, tuple(grad_input))

        return backward_hook

    @contextlib.contextmanager
    def _guard(self, where: str) -> Iterator[None]:
        """Run capture work inside someone else's model: our own torch calls are not ops to log,
        and any error stops logging (warned once, recorded in run.json) instead of reaching the model.
        A requested ``AnomalyError`` is the one exception that goes through."""
        self._busy = True
        try:
            yield
        except AnomalyError:
            raise
        except Exception as e:
            self._fault(f"{where} raised {type(e).__name__}: {e}")
        finally:
            self._busy = False

    # -- op level --------------------------------------------------------------------

    def _make_enter(self, name: str) -> Callable[..., None]:
        def enter(module: torch.nn.Module, args: Any) -> None:
            if not self._module_stack and self._op_mode is None and not self._paused and self._stopped is None:
                self._op_mode = _OpMode(self)
                self._op_mode.__enter__()
            self._module_stack.append(name)

        return enter

    def _make_leave(self, name: str) -> Callable[..., None]:
        def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self._module_stack:
                self._module_stack.pop()
            if not self._module_stack and self._op_mode is not None:
                self._leave_op_mode()

        return leave

    def _leave_op_mode(self) -> None:
        mode, self._op_mode = self._op_mode, None
        try:
            mode.__exit__(None, None, None)  # type: ignore[union-attr]
        except Exception:  # the model left its own mode on top of ours; torch pops both
            pass

    def _run_op(self, func: Callable[..., Any], op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        base = f"{self._module_stack[-1]}.{op}"
        rec = None
        with self._guard(f"op hook on {base!r}"):
            k = self._call_counts[base]
            self._call_counts[base] = k + 1
            calls = self._op_calls.get(base, 0)
            if calls == 0:
                calls = self._op_calls[base] = self._selector.calls_for(base)
            if calls is not False and (calls is None or k in calls) and not self._paused and self._stopped is None:
                entries, structure = flatten_inputs_with_structure(args, kwargs)
                rec = self._begin_call(f"{base}_{k}", op, 0, entries, structure)
        out = func(*args, **kwargs)
        if rec is not None:
            with self._guard(f"op hook on {base!r}"):
                self._end_call(rec, out)
        return out

    # -- anomalies and stacks ------------------------------------------------------------

    def _check_anomaly(self, rec: CallRecord, outputs: list[tuple[Any, Any]]) -> None:
        """One fused finiteness check per call; the first call whose outputs go bad is recorded."""
        outs = [(k, v) for k, v in outputs if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not outs:
            return
        flags = torch.stack([~torch.isfinite(v.detach()).all() for _, v in outs])
        if not bool(flags.any()):
            return
        bad_out = [k for (k, _), f in zip(outs, flags.tolist()) if f]
        bad_in = [s.key for _, s in rec.inputs if isinstance(s, TensorSnapshot) and s.meta.get("nonfinite")]
        self._anomaly = {
            "step": rec.step, "module": rec.dirname, "born_here": not bad_in,
            "nonfinite_outputs": [str(k) for k in bad_out], "nonfinite_inputs": [str(k) for k in bad_in],
        }
        where = "born in" if not bad_in else "first seen in (its inputs were already bad)"
        warnings.warn(f"tensorlog: NaN/Inf {where} {rec.dirname!r} at step {rec.step} (outputs {bad_out})", RuntimeWarning, stacklevel=2)
        if self._writer is not None:
            self._writer.submit(lambda: self._write_manifest(complete=False))
        if self.config.stop_on_anomaly:
            raise AnomalyError(f"NaN/Inf {where} {rec.dirname!r} at step {rec.step}")

    def _record_stack(self, name: str) -> None:
        import sys
        import traceback

        frame = sys._getframe(3)
        while frame is not None and (frame.f_code.co_filename.endswith(("torch/nn/modules/module.py", "tensorlog/_capture.py"))
                                     or "torch/overrides" in frame.f_code.co_filename):
            frame = frame.f_back
        if frame is None:
            return
        site = (name, frame.f_code.co_filename, frame.f_lineno)
        if site in self._stacks:
            return
        self._stacks[site] = [f"{f.filename}:{f.lineno}:{f.name}" for f in traceback.extract_stack(frame, limit=40)]

    def _next_seq(self) -> int:
        s = self._seq
        self._seq += 1
        return s

    def _device_selected(self, entries: list[tuple[Any, Any]]) -> bool:
        for _, v in entries:
            if isinstance(v, torch.Tensor):
                return self._selector.device(v.device)
        return True

    def _snapshot(self, kind: str, entries: list[tuple[Any, Any]], rec: CallRecord) -> list[tuple[Any, Any]]:
        """Copy what must survive the call; compute on-device statistics in one batch."""
        cfg = self.config
        out: list[tuple[Any, Any]] = []
        need_stats: list[tuple[TensorSnapshot, torch.Tensor]] = []
        for key, v in entries:
            if not isinstance(v, torch.Tensor):
                out.append((key, describe_value(v)))
                continue
            t = v.detach()
            if t.device.type == "cuda":
                rec.on_cuda, rec.cuda_device = True, t.device.index
            meta = TensorMeta.of(t).__dict__.copy()
            if isinstance(v, torch.nn.Parameter):
                meta["parameter"] = True  # a weight passed to an op: a difference here is born here
            snap = TensorSnapshot(key, meta)
            if cfg.detect_anomaly and kind == "inputs" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                meta["nonfinite"] = True
            small = t.numel() <= cfg.small_tensor_values
            too_big = cfg.max_tensor_size is not None and t.numel() > cfg.max_tensor_size
            if not self._selector.device(t.device):
                snap.skipped = "device_names"
            elif too_big:
                snap.skipped = "max_tensor_size"
            prev = self._seen_tensor(v)
            if prev is not None and snap.skipped is None:
                # The same tensor, unchanged, was snapshotted earlier in this step (a module's input is
                # usually the previous module's output): share its copy and statistics.
                snap.host, snap.stats, snap.write_file = prev.host, prev.stats, prev.write_file
                snap.want_values, snap.want_checksum = prev.want_values, prev.want_checksum
                if snap.stats is None and not snap.write_file:
                    need_stats.append((snap, t))
                out.append((key, snap))
                continue
            if snap.skipped is None and (cfg.mode != "statistics" or small):
                snap.host = _host_copy(t, self._copy_stream(t.device))
                snap.write_file = cfg.mode == "tensor"
                snap.want_values = small
                snap.want_checksum = cfg.mode == "md5"
                rec.nbytes += t.numel() * t.element_size()
            if not snap.write_file:
                need_stats.append((snap, t))
            if snap.skipped is None:
                self._remember_tensor(v, snap)
            out.append((key, snap))
        if need_stats:
            stats = stats_tensor([t for _, t in need_stats])
            assert stats is not None
            host = _host_copy(stats, self._copy_stream(stats.device))
            for i, (snap, _) in enumerate(need_stats):
                snap.stats = host[i]
        return out

    def _copy_stream(self, device: torch.device) -> Any:
        if device.type != "cuda":
            return None
        stream = self._streams.get(device.index)
        if stream is None:
            stream = self._streams[device.index] = torch.cuda.Stream(device)
        return stream

    def _seen_tensor(self, t: torch.Tensor) -> TensorSnapshot | None:
        entry = self._seen.get(id(t))
        if entry is None:
            return None
        ref, version, snap = entry
        if ref() is not t or t.is_inference() or t._version != version:
            return None
        return snap

    def _remember_tensor(self, t: torch.Tensor, snap: TensorSnapshot) -> None:
        if t.is_inference():  # no version counter: an in-place change would go unnoticed
            return
        try:
            self._seen[id(t)] = (weakref.ref(t), t._version, snap)
        except TypeError:
            pass

    # -- faults and manifest -----------------------------------------------------------

    def _fault(self, reason: str) -> None:
        self._stop_logging(reason)

    def _stop_logging(self, reason: str) -> None:
        """Stop for good. Called from hooks and from the writer thread, so it takes no lock that
        ``remove()`` holds while it waits for the writer; hooks see the flag and return at once, and
        the next step boundary takes them off."""
        with self._stop_lock:
            if self._stopped is not None:
                return
            self._stopped = reason
        warnings.warn(f"tensorlog: logging stopped for run {self.path}: {reason}", RuntimeWarning, stacklevel=2)
        try:
            self._write_manifest(complete=False)
        except OSError:
            pass

    def _prepare_run_dir(self) -> None:
        """Claim the run directory: the manifest is created exclusively, so two processes given the
        same run name cannot both write into it (the second is refused, or with
        ``unique_run_name`` gets ``<name>-1``, ``<name>-2``, ...)."""
        from ..config import ConfigError

        base, n = self.path, 0
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path / _layout.run_file(self._info.file_rank), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
                return
            except FileExistsError:
                if not self.config.unique_run_name:
                    raise ConfigError(
                        f"run directory {self.path} already holds a run; choose another run_name, omit it for a fresh "
                        "uuid, or set unique_run_name to get a numbered one"
                    ) from None
                n += 1
                self.path = base.with_name(f"{base.name}-{n}")
            except OSError as e:
                raise ConfigError(f"cannot create output directory {self.path}: {e.strerror or e}") from None

    def _write_manifest(self, *, complete: bool) -> None:
        from .. import __version__

        w = self._writer
        manifest = {
            "tensorlog_version": __version__,
            "layout_version": 1,
            "torch_version": torch.__version__,
            "config": self.config.model_dump(mode="json"),
            "model_class": self._model_class,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rank": self._info.rank,
            "world_size": self._info.world_size,
            **self._info.extra,
            "start_time": self._started,
            "end_time": _now() if complete or self._removed or self._finished else None,
            "steps_written": sorted(set(self._steps_written)),
            "steps": {str(k): v for k, v in sorted(self._step_info.items())},
            "bytes_written": w.bytes_written if w else 0,
            "dropped": w.dropped if w else [],
            "anomaly": self._anomaly,
            "modules": self._hierarchy,
            "complete": complete,
            "incomplete_reason": None if complete else (self._stopped or "run still in progress or process died"),
        }
        write_json(self.path / _layout.run_file(self._info.file_rank), manifest)


class _ExitFlush:
    """Flushes live captures at interpreter exit, and turns SIGTERM into a clean exit while any is live.

    The SIGTERM handler is installed only where SIGTERM has its default action
    (the process would die without running ``atexit``), and restored when the
    last capture is removed.
    """

    def __init__(self) -> None:
        self.live: weakref.WeakSet[CaptureHandle] = weakref.WeakSet()
        self._registered = False
        self._installed = False

    def add(self, handle: "CaptureHandle") -> None:
        import atexit
        import signal

        self.live.add(handle)
        if not self._registered:
            atexit.register(self.flush_all)
            self._registered = True
        if not self._installed and threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    signal.signal(signal.SIGTERM, _sigterm_exit)
                    self._installed = True
            except (ValueError, OSError):
                pass

    def discard(self, handle: "CaptureHandle") -> None:
        import signal

        self.live.discard(handle)
        if not self.live and self._installed and threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) is _sigterm_exit:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
            except (ValueError, OSError):
                pass
            self._installed = False

    def flush_all(self) -> None:
        for handle in list(self.live):
            try:
                handle.remove()
            except Exception:
                pass


def _sigterm_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


_EXIT = _ExitFlush()


def _host_copy(t: torch.Tensor, stream: Any = None) -> torch.Tensor:
    """A private, contiguous host copy.

    CUDA tensors are copied without blocking into pinned memory on a side
    stream that first waits for the work that produced them; ``record_stream``
    keeps the allocator from reusing their memory before the copy is done.
    Whoever reads the copy waits on an event recorded on that stream.
    """
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        if stream is None:
            host.copy_(t, non_blocking=True)
            return host
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(stream)
        return host
    return t.to("cpu").clone(memory_format=torch.contiguous_format)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def capture(model: torch.nn.Module, config: ConfigLike | None = None, /, **overrides: Any) -> CaptureHandle:
    """Log the inputs and outputs of the modules of ``model`` that ``config`` selects.

    Each call of ``model`` is one step (numbered from 0), so with HF
    ``generate`` step 0 is the prefill and step 1 the first decode token.

    Args:
        model (nn.Module): the root module; its submodules' qualified names
            are what ``module_call_match`` is matched against.
        config (LogConfig | dict | str | PathLike, optional): the config, a dict,
            JSON text or a JSON file; ``None`` means the defaults (log every
            module on step 0 to ``/tmp/tensorlog/<uuid>``).
        **overrides: config keys that replace the config's own
            (e.g. ``run_name="baseline"``).

    Returns:
        CaptureHandle: with ``.path`` (the run directory), ``.step()`` and
        ``.remove()``; use it in a ``with`` block.

    Example:
        >>> with tensorlog.capture(model, {"module_call_match": ["layers\\\\.0\\\\."]}) as run:
        ...     model(input_ids)
        >>> tensorlog.load_run(run.path).steps
    """
    cfg = load_config(config if config is not None else {})
    if overrides:
        cfg = load_config({**cfg.model_dump(exclude_unset=True), **overrides})
    if type(model).__module__.startswith("transformers."):
        from ..integrations.transformers import attach_step_info, run_facts

        handle = CaptureHandle(model, cfg, info=RunInfo(**run_facts(model)))
        attach_step_info(handle, model)
        return handle
    return CaptureHandle(model, cfg)
