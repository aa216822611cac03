"""Isolation: re-run modules of model B on the inputs that run A recorded for them.

Error accumulates: a layer can look bad only because its input already
differed. Feeding each module run A's own inputs measures the error that module
adds *by itself*; set beside the accumulated error of a normal comparison, it
says which module is responsible ("layer 7's MLP adds 90% of the error").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field

from .metrics import TensorMetrics, compare_tensors
from ..formats.tensorlog import ModuleCall, Run, RunReadError, TensorRecord, load_run
from ..capture.flatten import flatten_outputs

__all__ = ["replay", "ReplayResult", "ReplayedModule", "relative_error"]


class ReplayedModule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = "replayed_module"
    step: int
    module: str
    status: str  # "ok" | "skipped"
    isolated: TensorMetrics | None = None
    isolated_error: float | None = None
    """Relative L2 error ``||a - b|| / ||a||`` of the module's own output on run A's inputs."""
    share: float | None = None
    """This module's share of the summed isolated error of the replayed modules (outermost excluded)."""
    note: str | None = None


class ReplayResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = "replay"
    run: str
    modules: list[ReplayedModule] = Field(default_factory=list)

    def top(self, step: int | None = None) -> ReplayedModule | None:
        """The replayed module that adds the most error by itself."""
        cands = [m for m in self.modules if m.isolated_error is not None and (step is None or m.step == step)]
        return max(cands, key=lambda m: m.isolated_error or 0.0, default=None)

    def added_error(self) -> dict[tuple[int, str], tuple[float, float | None]]:
        return {(m.step, m.module): (m.isolated_error or 0.0, m.share) for m in self.modules if m.isolated_error is not None}


def relative_error(m: TensorMetrics) -> float:
    """``||a - b|| / ||a||`` from the SNR (which is ``20·log10`` of its inverse)."""
    if m.snr_db is None:
        return 0.0
    return float(10 ** (-m.snr_db / 20)) if m.snr_db != float("-inf") else float("inf")


_PLAIN = {"NoneType", "bool", "int", "float", "str"}


def _value(rec: TensorRecord, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    if rec.is_tensor:
        t = rec.load()
        if device is not None:
            t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t
    kind = rec.meta.get("type")
    if kind in _PLAIN:
        return rec.meta.get("value")
    if kind in ("dtype", "device"):
        value = str(rec.meta.get("value"))
        return getattr(torch, value.removeprefix("torch.")) if kind == "dtype" else torch.device(value)
    return None  # caches and other objects are not recorded: the module runs without them


def _rebuild(call: ModuleCall, device: torch.device | None, dtype: torch.dtype | None) -> tuple[list[Any], dict[str, Any]]:
    by_key = {t.key: t for t in call.inputs}
    structure = call.extra.get("structure")
    if not isinstance(structure, dict):  # older runs: positionals in order, kwargs by name
        args = [_value(t, device, dtype) for t in call.inputs if t.key is not None and t.key.isdigit()]
        kwargs = {t.key: _value(t, device, dtype) for t in call.inputs if t.key is not None and not t.key.isdigit()}
        return args, kwargs

    def build(node: Any) -> Any:
        if isinstance(node, list):
            return tuple(build(x) for x in node)
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        rec = by_key.get(node)
        if rec is None:
            raise RunReadError(f"{call.dirname}: input {node!r} was not recorded")
        return _value(rec, device, dtype)

    return [build(a) for a in structure.get("args", [])], {k: build(v) for k, v in structure.get("kwargs", {}).items()}


def _primary_output(call: ModuleCall) -> TensorRecord | None:
    return next((t for t in call.outputs if t.is_tensor and t.has_data), None)


def replay(
    model: torch.nn.Module,
    run: Run | str | Path,
    *,
    modules: Iterable[str] | None = None,
    steps: Iterable[int] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> ReplayResult:
    """Run each selected module of ``model`` on the inputs ``run`` recorded for it.

    Args:
        model (nn.Module): model B, with the same module names as the model that made ``run``.
        run (Run | str | Path): run A, captured in tensor mode (inputs and outputs saved).
        modules (iterable of str, optional): regexes of modules to replay (default: every
            recorded module that ``model`` has).
        steps (iterable of int, optional): only these steps.

    Returns:
        ReplayResult: per module, the error it adds by itself (``isolated_error``) and its
        share of the total; ``result.top()`` names the module that adds the most.

    Example:
        >>> res = tensorlog.replay(model_b, "/tmp/tensorlog/run_a", modules=[r"layers\\.\\d+\\.mlp$"])
        >>> res.top().module, res.top().share
        ('model.layers.7.mlp', 0.9)
    """
    r = run if isinstance(run, Run) else load_run(run)
    pats = [re.compile(p) for p in modules] if modules else None
    wanted = set(steps) if steps is not None else None
    named = dict(model.named_modules())
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    out: list[ReplayedModule] = []
    for s, step in r.steps.items():
        if wanted is not None and s not in wanted:
            continue
        rows: list[ReplayedModule] = []
        for call in step.calls:
            if pats and not any(p.search(call.module) for p in pats):
                continue
            target = named.get(call.module)
            expected = _primary_output(call)
            if target is None or not call.module:
                continue
            if expected is None:
                rows.append(ReplayedModule(step=s, module=call.dirname, status="skipped", note="no output tensor was saved"))
                continue
            try:
                args, kwargs = _rebuild(call, device, dtype)
                with torch.no_grad():
                    got = target(*args, **kwargs)
                flat = dict(flatten_outputs(got))
                mine = flat.get(expected.key) if expected.key in flat else next((v for v in flat.values() if isinstance(v, torch.Tensor)), None)
                if not isinstance(mine, torch.Tensor):
                    raise RunReadError("the module returned no tensor output")
                want = expected.load()
                if tuple(mine.shape) != tuple(want.shape):
                    raise RunReadError(f"output shape {list(mine.shape)} vs recorded {list(want.shape)}")
                m = compare_tensors(want, mine.detach().cpu(), rtol=rtol, atol=atol)
                rows.append(ReplayedModule(step=s, module=call.dirname, status="ok", isolated=m, isolated_error=relative_error(m)))
            except (RunReadError, RuntimeError, TypeError, ValueError) as e:
                rows.append(ReplayedModule(step=s, module=call.dirname, status="skipped", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        out.extend(_with_shares(rows, step.calls))
    return ReplayResult(run=str(r.path), modules=out)


def _with_shares(rows: list[ReplayedModule], calls: list[ModuleCall]) -> list[ReplayedModule]:
    """Shares among the innermost replayed modules, so a parent does not count its children twice."""
    spans = {c.dirname: (c.seq_start, c.seq_end) for c in calls}

    def contains(a: str, b: str) -> bool:
        sa, sb = spans.get(a), spans.get(b)
        if not sa or not sb or None in sa or None in sb:
            return False
        return sa[0] < sb[0] and sb[1] < sa[1]  # type: ignore[operator]

    ok = [r for r in rows if r.isolated_error is not None]
    inner = [r for r in ok if not any(contains(r.module, o.module) for o in ok if o is not r)]
    total = sum(r.isolated_error or 0.0 for r in inner)
    out = []
    for r in rows:
        if r in inner and total > 0:
            r = r.model_copy(update={"share": (r.isolated_error or 0.0) / total})
        out.append(r)
    return out
