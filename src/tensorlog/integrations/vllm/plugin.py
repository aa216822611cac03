"""vLLM general plugin: intermediate logging inside a stock vLLM engine, no patch to vLLM.

vLLM loads ``vllm.general_plugins`` entry points in every process (the front
end, the EngineCore and each worker, Ray actors included). :func:`register` wraps
three one-shot methods, and each wrapper only checks for a config:

* ``EngineArgs.create_engine_config`` (front end): when logging is on, keep a
  compiling engine compiling, with what graph taps need (Inductor's
  peak-memory reordering off, no CUDA graphs), or force ``enforce_eager`` when
  the config asks for hooks; and pin the run name into ``additional_config`` so
  that every rank writes into one run.
* ``Executor.get_class`` (EngineCore): a Ray executor kills its worker actors
  at shutdown, so its ``shutdown`` first asks the workers to close their runs.
* ``Worker.load_model`` (each worker; the CPU worker inherits it, and it sits
  above every model loader, tensorizer included): attach capture hooks to the
  loaded model and wrap the model runner's ``execute_model`` /
  ``sample_tokens``, which delimit one step. Warm-up, profiling and dummy runs
  call the model outside ``execute_model`` (or with ``dummy_run=True``), so
  they are not steps and run with no hook attached.

With no config anywhere, nothing else is wrapped and no hook is registered.

This module only adapts vLLM to tensorlog's capture: where to attach, when a
step begins and ends, and what to record about the engine. Each patch to vLLM
is a function of :mod:`.patches`, the compile settings are in
:mod:`.compilation`, and the debug tensor dump is :mod:`tensorlog.capture.passes`.

Config sources, first found wins: ``additional_config={"intermediate_log_config":
{...}}`` (dict or JSON text), ``additional_config={"intermediate_log_config_path":
"file.json"}``, environment ``TENSORLOG_CONFIG`` (JSON) and
``TENSORLOG_CONFIG_PATH``. ``VLLM_DEBUG_TENSOR_DUMP_OUTPUT_FOLDER`` (with
``VLLM_DEBUG_TENSOR_DUMP_LAYERS`` and ``VLLM_DEBUG_TENSOR_DUMP_SKIP_PASSES``)
turns on the debug-tensor-dump proposal's ``Pass00000.pt`` layout instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from pathlib import Path
from typing import Any

from ...capture import CaptureHandle, RunInfo
from ...capture.passes import PassDumpConfig, PassDumper
from ...config import LogConfig, load_config
from ...errors import ConfigError
from ...schema.records import request_start
from ...storage.finisher import close_orphaned
from ..model_facts import model_dims
from . import patches
from .compilation import TAP_ORDER as TAP_ORDER  # where it was defined before compilation.py
from .compilation import compiled_facts, needs_eager, prepare_compiled, traces_taps
from .control import Live
from .shards import shard_layouts

__all__ = ["register", "resolve_config", "VLLM_OUTPUT_DIR", "PassDumpConfig"]

# A child of vLLM's logger, so messages come out in vLLM's format and obey VLLM_LOGGING_LEVEL.
logger = logging.getLogger("vllm.tensorlog")

VLLM_OUTPUT_DIR = "/tmp/vllm_intermediates"
CONFIG_KEY = "intermediate_log_config"
CONFIG_PATH_KEY = "intermediate_log_config_path"
ENV_CONFIG = "TENSORLOG_CONFIG"
ENV_CONFIG_PATH = "TENSORLOG_CONFIG_PATH"
ENV_CONTROL = "TENSORLOG_CONTROL"
"""``1``: equip every worker for captures armed over HTTP even with no config (``tensorlog vllm serve`` sets it)."""


def resolve_config(additional_config: Any) -> LogConfig | None:
    """The logging config from vLLM's ``additional_config`` or the environment, or None."""
    ac = additional_config if isinstance(additional_config, dict) else {}
    source: Any = None
    if ac.get(CONFIG_KEY) is not None:
        source = ac[CONFIG_KEY]
    elif ac.get(CONFIG_PATH_KEY):
        source = str(ac[CONFIG_PATH_KEY])
    elif os.environ.get(ENV_CONFIG):
        source = os.environ[ENV_CONFIG]
    elif os.environ.get(ENV_CONFIG_PATH):
        source = os.environ[ENV_CONFIG_PATH]
    if source is None:
        return None
    return load_config(source, output_dir=VLLM_OUTPUT_DIR)


class _Steps:
    """Owned by one model runner: opens a step in ``execute_model``, closes it after sampling."""

    def __init__(self, runner: Any, capture: CaptureHandle | None, dumper: PassDumper | None, live: Live | None = None) -> None:
        self.runner = runner
        self.capture = capture
        self.dumper = dumper
        self.live = live
        self.index = 0
        """The engine's step count: steps that ran the model, logged or not."""
        self.starts: dict[str, dict[str, Any]] = {}
        """Every live request's start (bounded by the requests alive), for captures armed later."""
        self.open = False
        self.num_scheduled: dict[str, int] = {}
        self.unwritten: dict[str, dict[str, Any]] = {}
        """Requests whose prompt no logged step has recorded yet (bounded by the requests alive)."""
        self.graph_mode: bool | None = None
        """Whether this step's forward replayed a CUDA graph (set by the wrapped ``_model_forward``)."""

    def forward_uncompiled(self) -> bool:
        """This step's forward must skip the compiled graph: an armed capture logs it through eager hooks."""
        return self.live is not None and self.live.eager_forward

    def graph_replayed(self, replayed: bool | None) -> None:
        self.graph_mode = replayed

    def begin(self, scheduler_output: Any) -> None:
        """Reads a ``vllm.v1.core.sched.output.SchedulerOutput``: ``finished_req_ids``,
        ``total_num_scheduled_tokens``, ``num_scheduled_tokens`` and ``scheduled_new_reqs``."""
        self.end()
        # Finished requests first: the last ones before the engine goes idle come in a step that runs nothing.
        finished = set(getattr(scheduler_output, "finished_req_ids", None) or ())
        for r in finished:
            self.unwritten.pop(r, None)
            self.starts.pop(r, None)
        if self.live is not None and finished:
            self.live.requests_finished(finished)
        if getattr(scheduler_output, "total_num_scheduled_tokens", 1) == 0:
            return  # nothing runs the model: not a step
        self.open = True
        self.num_scheduled = dict(getattr(scheduler_output, "num_scheduled_tokens", {}) or {})
        news = _new_requests(scheduler_output)
        self.unwritten.update((n["id"], n) for n in news)
        if self.capture is not None:
            self.capture.begin_step()
        if self.dumper is not None:
            self.dumper.begin()
        if self.live is not None:
            self.starts.update((n["id"], n) for n in news)
            self.live.begin(self.index, list(self.num_scheduled))

    def end(self) -> None:
        if not self.open:
            return
        self.open = False
        try:
            self._end_capture()
        finally:
            try:
                if self.live is not None:
                    self.live.end(self.index, self._batch_info() if self.live.wants_info else None, self.starts)
            finally:
                self.index += 1

    def _end_capture(self) -> None:
        if self.capture is not None:
            info = self._batch_info()
            starts = [self.unwritten[r] for r in info["req_ids"] if r in self.unwritten]
            if starts and self.capture.logging_step:
                info["new_requests"] = starts
                for s in starts:
                    del self.unwritten[s["id"]]
            if self.graph_mode is not None:
                self.capture.graph_replayed(self.graph_mode)
                self.graph_mode = None
            self.capture.end_step(info)
        if self.dumper is not None:
            self.dumper.end()

    def _batch_info(self) -> dict[str, Any]:
        """Request ids in the order of the flattened ``[num_tokens, ...]`` activations, with token counts.

        Read from the runner's ``vllm.v1.worker.gpu_input_batch.InputBatch`` (``req_ids``, ``req_id_to_index``,
        ``num_computed_tokens_cpu``): the one ``GPUModelRunner.execute_model_state`` kept for ``sample_tokens``
        when there is one, else ``runner.input_batch``.
        """
        order: list[str] = []
        try:
            state = getattr(self.runner, "execute_model_state", None)
            batch = getattr(state, "input_batch", None)
            if batch is not None and hasattr(batch, "req_ids"):
                order = list(batch.req_ids)
            else:
                batch = self.runner.input_batch
                order = list(batch.req_ids[: batch.num_reqs])
        except Exception:
            order = []
        if not order or any(r not in self.num_scheduled for r in order):
            order = list(self.num_scheduled)
        tokens = [int(self.num_scheduled[r]) for r in order]
        info: dict[str, Any] = {"req_ids": order, "num_tokens": tokens, "total_tokens": sum(tokens)}
        try:  # the position of each request's first token in this step (tokens computed before it)
            batch = self.runner.input_batch
            index = batch.req_id_to_index
            info["start_positions"] = [int(batch.num_computed_tokens_cpu[index[r]]) for r in order]
        except Exception:
            pass
        return info

    def close(self) -> None:
        self.end()
        if self.capture is not None:
            self.capture.remove()
        if self.dumper is not None:
            self.dumper.remove()
        if self.live is not None:
            self.live.close()


_CHILD_ID = re.compile(r"^(\d{1,6})_(.+)$")


def _new_requests(scheduler_output: Any) -> list[dict[str, Any]]:
    """The requests this step schedules for the first time, by prompt: what pairs them with another run's.

    vLLM's parallel sampling (``n > 1``) names the children ``<index>_<parent id>`` (``ParentRequest.get_child_info``);
    that index is the sample. Requests given as embeddings carry no token ids and are left out.
    """
    out = []
    for new in getattr(scheduler_output, "scheduled_new_reqs", None) or []:
        ids = getattr(new, "prompt_token_ids", None)
        if ids is None:
            continue
        ids = [int(t) for t in ids]
        rid = str(new.req_id)
        child = _CHILD_ID.match(rid)
        out.append(request_start(rid, ids, int(child.group(1)) if child else 0))
    return out


_CLOSING_OUT: set[str] = set()


def _close_out_at_exit(run_dir: Path) -> None:
    """The front end outlives the workers: at its exit, it closes the runs of workers that were killed before they
    could (``vllm serve`` SIGKILLs them at shutdown with its default ``--shutdown-timeout 0``)."""
    if str(run_dir) in _CLOSING_OUT:
        return
    _CLOSING_OUT.add(str(run_dir))

    def close_out() -> None:
        if run_dir.is_dir():
            for f in close_orphaned(
                run_dir, "the engine's workers were killed at shutdown, e.g. vllm serve --shutdown-timeout 0"
            ):
                logger.warning("tensorlog: %s was left in progress by a killed worker; closed it as incomplete", f)

    atexit.register(close_out)


def _rank_layout(vllm_config: Any) -> dict[str, int]:
    """This process's place among the engine's ranks: sizes from ``VllmConfig.parallel_config``, ranks from
    ``vllm.distributed.parallel_state`` (its TP group, ``get_pp_group()`` and ``get_world_group()``)."""
    pc = vllm_config.parallel_config
    out = {
        "tp_size": int(pc.tensor_parallel_size),
        "pp_size": int(pc.pipeline_parallel_size),
        "tp_rank": 0,
        "pp_rank": 0,
        "rank": 0,
    }
    try:
        from vllm.distributed import parallel_state as ps

        out["tp_rank"] = ps.get_tensor_model_parallel_rank()
        out["pp_rank"] = ps.get_pp_group().rank_in_group
        out["rank"] = ps.get_world_group().rank
    except Exception:
        out["rank"] = int(getattr(pc, "rank", 0) or 0)
    return out


def _vllm_facts(vllm_config: Any, layout: dict[str, int]) -> dict[str, Any]:
    """``run.json``'s facts about the engine, from ``VllmConfig.model_config`` (a ``vllm.config.ModelConfig``)."""
    import vllm

    mc = vllm_config.model_config
    return {
        "model_dims": model_dims(mc.hf_config),
        "framework": "vllm",
        "vllm_version": getattr(vllm, "__version__", "unknown"),
        "model_path": str(mc.model),
        "architectures": list(getattr(mc.hf_config, "architectures", None) or []),
        "dtype": str(mc.dtype),
        "quantization": mc.quantization,
        "enforce_eager": bool(mc.enforce_eager),
        **{k: v for k, v in layout.items() if k != "rank"},
        "rank_layout": f"TP={layout['tp_size']} PP={layout['pp_size']}: this process is tp_rank {layout['tp_rank']}, pp_rank {layout['pp_rank']}, global rank {layout['rank']}",
    }


def _prepare_engine(args: Any) -> None:
    """On the front end, before vLLM builds its config: keep a compiling engine compiling, with what graph taps
    need, or force ``enforce_eager`` when the config asks for hooks; and pin the run name into
    ``additional_config``, so that every rank writes into one run."""
    cfg = resolve_config(getattr(args, "additional_config", None))
    dump = PassDumpConfig.from_env() is not None
    if not ((cfg is not None and cfg.enabled) or dump):
        return
    if not args.enforce_eager and (dump or cfg is None or needs_eager(cfg)):
        logger.warning(
            "tensorlog: %s needs eager mode; setting enforce_eager=True",
            "the debug tensor dump" if dump or cfg is None else f"compiled: {cfg.compiled!r} with these options",
        )
        args.enforce_eager = True
    elif not args.enforce_eager:
        prepare_compiled(args, cfg)
        if cfg is not None and traces_taps(cfg) and os.environ.get("VLLM_DISABLE_COMPILE_CACHE") != "1":
            # A cached graph skips tracing, where taps register; and one cached with taps would run
            # them in a later engine without tensorlog. Every process of this engine inherits it.
            os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
            logger.info("tensorlog: vLLM's compile cache is off for this engine (its graph carries taps)")
    if cfg is not None:
        # Every rank must write into the same run: resolve the run name once, here.
        data = cfg.model_dump(mode="json", exclude_unset=True)
        data.setdefault("run_name", cfg.run_name)
        data.setdefault("output_dir", cfg.output_dir)
        ac = {k: v for k, v in dict(args.additional_config or {}).items() if k != CONFIG_PATH_KEY}
        ac[CONFIG_KEY] = data
        args.additional_config = ac
        if cfg.captures:
            logger.info("tensorlog: logging intermediate tensors to %s", cfg.run_dir)
            _close_out_at_exit(cfg.run_dir)
        else:
            logger.info(
                "tensorlog: watching every %d steps; a NaN/Inf's flight-recorder run goes to %s",
                cfg.watch_every,
                cfg.output_dir,
            )


def _logs(vllm_config: Any) -> bool:
    """This engine logs: its workers hold runs to close at shutdown."""
    cfg = resolve_config(getattr(vllm_config, "additional_config", None))
    return cfg is not None and cfg.enabled


def _warn_tensorlog(message: str) -> None:
    logger.warning("tensorlog: %s", message)


class _Plugin:
    """The plugin's only state: whether it is installed, and the runners it equipped (for exit)."""

    def __init__(self) -> None:
        self.installed = False
        self.steps: list[_Steps] = []
        self._atexit = False

    def install(self) -> None:
        if self.installed:
            return
        self.installed = True
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.worker.gpu_worker import Worker
        except ImportError as e:  # a vLLM whose layout we do not know: say so, change nothing
            logger.warning("tensorlog: this vLLM has no %s; intermediate logging is unavailable", e.name)
            return
        EngineArgs.create_engine_config = patches.before_engine_config(EngineArgs.create_engine_config, _prepare_engine)  # type: ignore[method-assign]
        Worker.load_model = patches.after_load_model(Worker.load_model, self._attach_contained)  # type: ignore[method-assign]
        patches.add_worker_method(Worker, "tensorlog_control", _worker_control)
        try:
            from vllm.v1.executor.abstract import Executor
        except ImportError:
            return
        Executor.get_class = staticmethod(  # type: ignore[method-assign]
            patches.close_ray_workers_first(Executor.get_class, _logs, _close_worker_runs)
        )

    def _attach_contained(self, worker: Any) -> None:
        """A bad config fails loudly at start-up (the user's to fix); anything else only turns logging off."""
        try:
            self.attach(worker)
        except ConfigError:
            raise
        except Exception as e:
            logger.warning("tensorlog: could not attach to the model, nothing will be logged: %s: %s", type(e).__name__, e)

    def attach(self, worker: Any) -> None:
        vc = worker.vllm_config
        cfg = resolve_config(vc.additional_config)
        dump_cfg = PassDumpConfig.from_env()
        control = os.environ.get(ENV_CONTROL) == "1"
        watching = cfg is not None and cfg.enabled and cfg.watch_every is not None
        if (cfg is None or not cfg.enabled) and dump_cfg is None and not control:
            return
        runner = worker.model_runner
        model = runner.get_model()
        compiled = compiled_facts(vc)
        if compiled["mode"] == "compiled" and (dump_cfg is not None or cfg is None or needs_eager(cfg)):
            logger.warning("tensorlog: the model is compiled; module hooks inside it will not fire")
        layout = _rank_layout(vc)
        world = layout["tp_size"] * layout["pp_size"]
        capture = None
        base_facts = {**_vllm_facts(vc, layout), "shard_layouts": shard_layouts(model, layout["tp_size"])}

        def run_info(eager: bool) -> RunInfo:
            """An armed capture's steps run uncompiled; the flight recorder's values are the engine's own."""
            return RunInfo(
                rank=layout["rank"], world_size=world, facts={**base_facts, "compiled": {"mode": "eager"} if eager else compiled}
            )

        if cfg is not None and cfg.captures:
            facts = {**base_facts, "compiled": compiled}
            info = RunInfo(rank=layout["rank"], world_size=world, facts=facts)
            bound = getattr(getattr(vc, "scheduler_config", None), "max_num_batched_tokens", None)
            capture = CaptureHandle(
                model,
                cfg,
                info=info,
                auto_step=False,
                compiled=compiled["mode"] == "compiled",
                token_bound=int(bound) if isinstance(bound, int) else None,
            )
            if not capture.enabled:  # this rank is not selected
                capture = None
        dumper = None
        if dump_cfg is not None:
            dumper = PassDumper(
                model, dump_cfg, tp=layout["tp_rank"], pp=layout["pp_rank"], rank=layout["rank"], warn=_warn_tensorlog
            )
        live = None
        if watching or control:
            try:
                live = Live(
                    model,
                    cfg if watching else None,
                    run_info,
                    compiled=compiled["mode"] == "compiled",
                    rank=layout["rank"] if world > 1 else None,
                )
            except BaseException:
                if capture is not None:  # nothing of this attach stays behind: no hooks, no run left open
                    capture.remove()
                raise
        if capture is None and dumper is None and live is None:
            return
        steps = _Steps(runner, capture, dumper, live)
        setattr(runner, patches.STEPS_ATTR, steps)
        if (capture is not None or live is not None) and compiled["mode"] == "compiled":
            patches.wrap_model_forward(runner, uncompiled=steps.forward_uncompiled, graph_replayed=steps.graph_replayed)
        patches.wrap_runner_steps(type(runner))
        self.steps.append(steps)
        if not self._atexit:
            self._atexit = True
            atexit.register(self.close_all)

    def close_all(self) -> None:
        """Flush and finalise every run of this process (interpreter exit, SIGTERM via SystemExit)."""
        for steps in self.steps:
            try:
                steps.close()
            except Exception as e:
                logger.warning("tensorlog: closing the run failed: %s", e)
        self.steps = []


_PLUGIN = _Plugin()


def _worker_control(worker: Any, request: dict[str, Any]) -> dict[str, Any]:
    """``collective_rpc("tensorlog_control", args=(request,))``: vLLM runs it on each worker between steps."""
    steps: _Steps | None = getattr(getattr(worker, "model_runner", None), patches.STEPS_ATTR, None)
    if steps is None or steps.live is None:
        return {"error": "tensorlog is not attached to this worker (start the server with `tensorlog vllm serve`)"}
    try:
        return {"rank": getattr(worker, "rank", None), "step": steps.index, **steps.live.control(request)}
    except ConfigError as e:
        return {"error": str(e), "status": 400}
    except Exception as e:  # never take down the engine over a control request
        logger.warning("tensorlog: control request failed: %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}


def _close_worker_runs(worker: Any) -> None:
    """Run on each worker by ``collective_rpc``: what atexit would have done."""
    _PLUGIN.close_all()


def register() -> None:
    """The ``vllm.general_plugins`` entry point; idempotent."""
    _PLUGIN.install()
