"""Every place where tensorlog patches vLLM, one small function each, with the vLLM behaviour it relies on.

Each patch only calls back into the plugin (:mod:`.plugin`), which decides what
to do; nothing here knows about configs, runs or writers. A patch to a class
is made once (it marks what it wrapped) and leaves the behaviour unchanged for
any object the plugin did not equip.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "StepBoundaries",
    "RAY_CLOSE_TIMEOUT",
    "before_engine_config",
    "after_load_model",
    "add_worker_method",
    "close_ray_workers_first",
    "wrap_runner_steps",
    "wrap_model_forward",
]

logger = logging.getLogger("vllm.tensorlog")

RAY_CLOSE_TIMEOUT = 60.0
"""Seconds the engine waits, at shutdown, for its Ray workers to finish their runs."""

STEPS_ATTR = "_tensorlog"
"""The model runner's attribute that holds its :class:`StepBoundaries` (absent: the runner is left alone)."""


class StepBoundaries(Protocol):
    """What the runner patches call: a step begins with its ``SchedulerOutput`` and ends once."""

    def begin(self, scheduler_output: Any) -> None: ...

    def end(self) -> None: ...


def before_engine_config(orig: Callable[..., Any], prepare: Callable[[Any], None]) -> Callable[..., Any]:
    """``prepare(engine_args)`` runs just before ``vllm.engine.arg_utils.EngineArgs.create_engine_config``.

    Relies on the front end building its ``VllmConfig`` once, from ``EngineArgs``, in ``create_engine_config``:
    what ``prepare`` sets on the arguments (``enforce_eager``, ``compilation_config``, ``additional_config``)
    reaches every process of the engine.
    """

    @functools.wraps(orig)
    def create_engine_config(args: Any, *a: Any, **kw: Any) -> Any:
        prepare(args)
        return orig(args, *a, **kw)

    return create_engine_config


def after_load_model(orig: Callable[..., Any], attach: Callable[[Any], None]) -> Callable[..., Any]:
    """``attach(worker)`` runs right after ``vllm.v1.worker.gpu_worker.Worker.load_model``.

    Relies on every worker (``CPUWorker`` inherits it) loading its model there, once, above every model loader,
    with ``worker.model_runner.get_model()`` the loaded model afterwards.
    """

    @functools.wraps(orig)
    def load_model(worker: Any, *a: Any, **kw: Any) -> Any:
        result = orig(worker, *a, **kw)
        attach(worker)
        return result

    return load_model


def add_worker_method(worker_cls: type, name: str, fn: Callable[..., Any]) -> None:
    """``collective_rpc(name, ...)`` calls ``fn(worker, ...)`` on each worker.

    Relies on ``collective_rpc`` with a method's name running ``getattr(worker, name)`` on each worker
    (``vllm.v1.serial_utils.run_method``), between steps.
    """
    setattr(worker_cls, name, fn)


def close_ray_workers_first(
    orig: Callable[..., Any], wants: Callable[[Any], bool], close_worker: Callable[[Any], None]
) -> Callable[..., Any]:
    """Wrap ``vllm.v1.executor.abstract.Executor.get_class`` so that a Ray executor's ``shutdown`` first runs
    ``close_worker`` on every worker, when ``wants(vllm_config)``. Only the executor class in use is touched.

    Relies on ``RayDistributedExecutor`` (``uses_ray = True``) killing its worker actors in ``shutdown``, where no
    atexit runs, and on ``collective_rpc(fn, timeout=...)`` running a function on each live worker; its
    ``shutting_down`` / ``is_failed`` say the workers can no longer answer.
    """

    @functools.wraps(orig)
    def get_class(vllm_config: Any) -> Any:
        cls = orig(vllm_config)
        if getattr(cls, "uses_ray", False) and wants(vllm_config) and "_tensorlog_shutdown" not in cls.__dict__:
            cls._tensorlog_shutdown = True
            cls.shutdown = _closing_workers_first(cls.shutdown, close_worker)
        return cls

    return get_class


def _closing_workers_first(orig: Callable[..., Any], close_worker: Callable[[Any], None]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def shutdown(executor: Any, *a: Any, **kw: Any) -> Any:
        if not (getattr(executor, "shutting_down", False) or getattr(executor, "is_failed", False)):
            try:
                executor.collective_rpc(close_worker, timeout=RAY_CLOSE_TIMEOUT)
            except Exception as e:  # a worker already gone: its run stays marked incomplete, which is the truth
                logger.warning("tensorlog: could not close the runs on the Ray workers: %s: %s", type(e).__name__, e)
        return orig(executor, *a, **kw)

    return shutdown


def wrap_runner_steps(cls: type) -> None:
    """Open a step in the runner's ``execute_model`` and close it after ``sample_tokens``, for a runner whose
    ``_tensorlog`` holds :class:`StepBoundaries`; patched where ``execute_model`` is defined, once.

    Relies on ``vllm.v1.worker.gpu_model_runner.GPUModelRunner``: ``execute_model(scheduler_output)`` runs the
    model for one ``SchedulerOutput`` and returns None when ``sample_tokens()`` follows (its output otherwise);
    warm-up and profiling run ``_dummy_run`` instead, or pass ``dummy_run=True``, and are no step.
    """
    klass = next((k for k in cls.__mro__ if "execute_model" in k.__dict__), None)
    if klass is None or getattr(klass.__dict__["execute_model"], "_tensorlog", False):
        return
    orig_exec = klass.__dict__["execute_model"]
    orig_sample = next((k.__dict__["sample_tokens"] for k in cls.__mro__ if "sample_tokens" in k.__dict__), None)

    @functools.wraps(orig_exec)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        steps: StepBoundaries | None = getattr(self, STEPS_ATTR, None)
        if steps is None or kwargs.get("dummy_run"):
            return orig_exec(self, scheduler_output, *args, **kwargs)
        _guard(steps.begin, scheduler_output)
        out = None
        try:
            out = orig_exec(self, scheduler_output, *args, **kwargs)
            return out
        finally:
            if out is not None:  # no sample_tokens() follows this step
                _guard(steps.end)

    execute_model._tensorlog = True  # type: ignore[attr-defined]
    klass.execute_model = execute_model  # type: ignore[attr-defined]

    if orig_sample is not None:

        @functools.wraps(orig_sample)
        def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return orig_sample(self, *args, **kwargs)
            finally:
                steps = getattr(self, STEPS_ATTR, None)
                if steps is not None:
                    _guard(steps.end)

        klass.sample_tokens = sample_tokens  # type: ignore[attr-defined]


def _guard(fn: Callable[..., None], *args: Any) -> None:
    """Step bookkeeping must never take down the EngineCore."""
    try:
        fn(*args)
    except Exception as e:
        logger.warning("tensorlog: step bookkeeping failed, logging may be incomplete: %s: %s", type(e).__name__, e)


def wrap_model_forward(runner: Any, *, uncompiled: Callable[[], bool], graph_replayed: Callable[[bool | None], None]) -> None:
    """Before each forward of ``runner``: run it uncompiled when ``uncompiled()``, and tell ``graph_replayed``
    whether it replays a CUDA graph (None: unknown). Wrapped on the instance, so other runners are untouched.

    Relies on ``GPUModelRunner._model_forward`` running inside ``vllm.forward_context.set_forward_context``,
    whose ``ForwardContext.cudagraph_runtime_mode`` says how that forward runs (``CUDAGraphMode.NONE``: no
    graph), and on the compiled model's ``__call__`` honouring ``ForwardContext.skip_compiled``
    (``vllm.compilation.decorators``: vLLM's switch for calls that must not use the graph).
    """
    orig = getattr(runner, "_model_forward", None)
    if orig is None:
        return
    try:
        from vllm.forward_context import get_forward_context
    except ImportError:
        return

    @functools.wraps(orig)
    def _model_forward(*args: Any, **kwargs: Any) -> Any:
        try:
            ctx = get_forward_context()
            if uncompiled():
                ctx.skip_compiled = True
                if ctx.cudagraph_runtime_mode is not None and getattr(ctx.cudagraph_runtime_mode, "name", "NONE") != "NONE":
                    from vllm.config import CUDAGraphMode

                    ctx.cudagraph_runtime_mode = CUDAGraphMode.NONE
            mode = getattr(ctx.cudagraph_runtime_mode, "name", "NONE")
            graph_replayed(mode not in ("NONE", None))
        except Exception:
            graph_replayed(None)
        return orig(*args, **kwargs)

    runner._model_forward = _model_forward
