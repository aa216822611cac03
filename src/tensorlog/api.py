"""The public entry points that compose the pipeline's parts (and add framework facts)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .capture.handle import CaptureHandle, start_capture
from .capture.run import RunInfo
from .compare import replay as _replay
from .config import ConfigLike
from .formats import Run, load_run

__all__ = ["capture", "replay"]


def capture(model: torch.nn.Module, config: ConfigLike | None = None, /, **overrides: Any) -> CaptureHandle:
    """Log the inputs and outputs of the modules of ``model`` that ``config`` selects.

    Each call of ``model`` is one step (numbered from 0), so with HF
    ``generate`` step 0 is the prefill and step 1 the first decode token. The
    step's files are on disk when the call returns (unless ``async_write``).

    Args:
        model (nn.Module): the root module; its submodules' qualified names
            are what ``module_call_match`` is matched against.
        config (LogConfig | dict | str | PathLike, optional): the config, a dict,
            JSON text or a JSON file; ``None`` means the defaults (log every
            module on step 0 to ``/tmp/tensorlog/<uuid>``).
        **overrides: config keys that replace the config's own (e.g. ``run_name="baseline"``).

    Returns:
        CaptureHandle: with ``.path`` (the run directory), ``.step()`` and
        ``.remove()``; use it in a ``with`` block.

    Raises:
        ConfigError: a bad config, or a ``run_name`` that is taken. An output
            directory that cannot be written is one warning, not an error: the
            model runs, unlogged.

    Example:
        >>> with tensorlog.capture(model, {"module_call_match": ["layers\\\\.0\\\\."]}) as run:
        ...     model(input_ids)
        >>> tensorlog.load_run(run.path).steps
    """
    info, step_info = None, None
    if type(model).__module__.startswith("transformers."):
        from .integrations.transformers import StepLayout, run_facts

        info, step_info = RunInfo(facts=run_facts(model)), StepLayout()
    return start_capture(model, config, info=info, step_info=step_info, **overrides)


def replay(
    model: torch.nn.Module,
    run: Run | str | Path,
    *,
    model_a: torch.nn.Module | None = None,
    modules: Iterable[str] | None = None,
    steps: Iterable[int] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> _replay.ReplayResult:
    """Re-run each module of ``model`` (B) on the inputs ``run`` (A) recorded, and measure what it adds by itself.

    For a run of an HF model, model A is loaded from the checkpoint ``run.json``
    names when ``model_a`` is not given, and KV caches are rebuilt by replaying
    each module over the whole prefix. With model A, replay checks itself (A on
    its own run must give zero error; a module where it does not is reported as
    not replayable) and measures each module's precision floor (A's module cast
    to B's dtype); modules are ranked by what they add beyond it.

    Args:
        model (nn.Module): model B, with the same module names as the model that made ``run``.
        run (Run | str | Path): run A, in tensor mode, every step from the prefill logged.
        model_a (nn.Module, optional): model A (default: loaded from ``run.json`` for HF runs).
        modules (iterable of str, optional): regexes of modules to replay (default: all recorded).
        steps (iterable of int, optional): report only these steps.

    Returns:
        ReplayResult: ``result.top()`` names the module with the largest excess over its floor.

    Example:
        >>> res = tensorlog.replay(model_b, "/tmp/tensorlog/run_a", modules=[r"layers\\.\\d+$"])
        >>> res.top().module, f"{res.top().share:.0%}"
        ('model.layers.2', '93%')
    """
    r = run if isinstance(run, Run) else load_run(run)
    states = {}
    if r.manifest.framework == "transformers" or type(model).__module__.startswith("transformers."):
        from .integrations.transformers import model_a_of, replay_states

        states = replay_states()
        if model_a is None:
            model_a = model_a_of(r)
    return _replay.replay(model, r, model_a=model_a, modules=modules, steps=steps, rtol=rtol, atol=atol, states=states)
