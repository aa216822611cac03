"""Replay: re-run each module of model B on the inputs that run A recorded for it, and measure what it adds.

Error accumulates: a layer can look bad only because its input already
differed. Fed run A's own inputs, a module of B shows the error it adds *by
itself* (``isolated``). Two more runs of the same inputs make that number
trustworthy:

* **self-check**: A's own module must reproduce A's recorded output (zero error,
  within float tolerance). Where it does not, some input was not recorded
  exactly: the module is ``not_replayable`` and is never ranked.
* **floor**: A's module cast to B's dtype: the error the precision change alone
  adds. What B adds beyond it (``excess``) is what needs explaining; modules are
  ranked by it, so a defect stands out above bf16 rounding noise at any level.

Inputs that are state carried from step to step (an HF ``DynamicCache``) are not
recorded; they are rebuilt by replaying the module over the whole prefix, step
by step, from the first logged step: each replayed module builds its own cache
from run A's recorded inputs. A module whose earlier steps were not logged, or
that received an object replay cannot rebuild, is ``not_replayable``, with the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..config import compile_pattern
from ..errors import AlignmentError, RunReadError
from ..formats import ModuleCall, Run, TensorRecord, load_run
from ..schema.leaves import flatten_value
from ..schema.tree import SpecError, from_structure, unflatten
from .metrics import TensorMetrics, compare_tensors

__all__ = ["replay", "ReplayResult", "ReplayedModule", "relative_error", "STANDS_OUT"]

STANDS_OUT = 0.1
"""A module stands out when what it adds beyond its floor is over this fraction of the floor (and not ~0)."""
_ABS_FLOOR = 1e-6

StateFactories = dict[str, Callable[[], Any]]


class ReplayedModule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = "replayed_module"
    step: int
    module: str
    status: str
    """``ok``, ``not_replayable`` (with the reason in ``note``), or ``skipped`` (nothing to compare)."""
    isolated: TensorMetrics | None = None
    isolated_error: float | None = None
    """Relative L2 error ``||a - b|| / ||a||`` of B's module on A's inputs against A's recorded output."""
    floor_error: float | None = None
    """The same for A's module cast to B's dtype: what the precision change alone adds."""
    self_error: float | None = None
    """The same for A's own module: zero when replay reproduces the run."""
    excess: float | None = None
    """``||B - floor|| / ||A||`` on the same inputs: what B's module adds beyond its precision (0 when B is
    exactly A at B's precision)."""
    share: float | None = None
    """This module's share of the summed excess of the replayed modules (outermost excluded)."""
    note: str | None = None

    @property
    def stands_out(self) -> bool:
        return self.excess is not None and self.excess > max(_ABS_FLOOR, STANDS_OUT * (self.floor_error or 0.0))


class ReplayResult(BaseModel):
    """Each replayed module's own error: model B run on the inputs run A recorded, beside A's outputs.

    ``tensorlog compare --replay`` adds it to a comparison; its JSON is ``tensorlog replay --output``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = "replay"
    run: str
    self_check: str = ""
    """What the self-replay found, in a sentence (``exact on 24 module calls``)."""
    floor: str = ""
    """How the precision floor was measured (``A's modules cast to torch.bfloat16``)."""
    modules: list[ReplayedModule] = Field(default_factory=list)

    def ranked(self, step: int | None = None) -> list[ReplayedModule]:
        """Replayable modules, the largest excess first (isolated error where there is no floor)."""
        ok = [m for m in self.modules if m.status == "ok" and m.isolated_error is not None and (step is None or m.step == step)]
        return sorted(ok, key=lambda m: -(m.excess if m.excess is not None else m.isolated_error or 0.0))

    def top(self, step: int | None = None) -> ReplayedModule | None:
        """The module that adds the most error beyond its precision floor."""
        ranked = self.ranked(step)
        return ranked[0] if ranked else None

    def added_error(self) -> dict[tuple[int, str], tuple[float, float | None, float | None, float | None]]:
        """``(step, module) -> (isolated, share, floor, excess)`` for ``compare --replay``."""
        return {
            (m.step, m.module): (m.isolated_error or 0.0, m.share, m.floor_error, m.excess)
            for m in self.modules
            if m.status == "ok" and m.isolated_error is not None
        }


def relative_error(m: TensorMetrics) -> float:
    """``||a - b|| / ||a||`` from the SNR (which is ``20·log10`` of its inverse)."""
    if m.snr_db is None:
        return 0.0
    return float(10 ** (-m.snr_db / 20)) if m.snr_db != float("-inf") else float("inf")


class _NotReplayable(Exception):
    pass


_PLAIN = {"NoneType", "bool", "int", "float", "str"}


class _Runner:
    """One module to replay (B's, A's own, or A's cast to B's dtype), with the state it carries across steps."""

    def __init__(self, module: torch.nn.Module, states: StateFactories) -> None:
        self.module = module
        p: torch.Tensor | None = next(iter(module.parameters()), None)
        if p is None:
            p = next(iter(module.buffers()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None and p.is_floating_point() else None
        self.factories = states
        self.state: dict[str, Any] = {}

    def value(self, rec: TensorRecord) -> Any:
        if rec.is_tensor:
            t = rec.load().to(self.device)
            return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t
        desc = rec.entry.value
        kind = desc.type if desc is not None else "unknown"
        if kind in _PLAIN:
            return desc.value if desc is not None else None
        if kind in ("dtype", "device"):
            text = str(desc.value if desc is not None else "")
            return getattr(torch, text.removeprefix("torch.")) if kind == "dtype" else torch.device(text)
        if kind in self.factories:
            key = rec.key or ""
            if key not in self.state:
                self.state[key] = self.factories[kind]()
            return self.state[key]
        raise _NotReplayable(f"its input {rec.key!r} is a {kind}, which is not recorded and cannot be rebuilt")

    def run(self, call: ModuleCall) -> Any:
        args, kwargs = _rebuild(call, self.value)
        with torch.no_grad():
            return self.module(*args, **kwargs)


def _rebuild(call: ModuleCall, value: Callable[[TensorRecord], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    by_key = {t.key: t for t in call.inputs}
    structure = call.structure
    if not isinstance(structure, dict):  # no structure recorded: positionals in order, kwargs by name
        args = tuple(value(t) for t in call.inputs if t.key is not None and t.key.isdigit())
        kwargs = {t.key: value(t) for t in call.inputs if t.key is not None and not t.key.isdigit()}
        return args, kwargs
    try:
        spec, keys = from_structure(structure)
    except SpecError as e:
        raise _NotReplayable(f"its recorded structure cannot be read: {e}") from None
    leaves: list[Any] = []
    for key in keys:
        rec = by_key.get(key)
        if rec is None:
            raise _NotReplayable(f"its input {key!r} was not recorded")
        leaves.append(value(rec))
    args, kwargs = unflatten(spec, leaves)
    return args, kwargs


def _primary(call: ModuleCall) -> TensorRecord | None:
    return next((t for t in call.outputs if t.is_tensor and t.has_data), None)


def _output(got: Any, expected: TensorRecord) -> torch.Tensor:
    flat = {"_".join(p) if p else None: v for p, v in flatten_value(got)}
    mine = (
        flat.get(expected.key) if expected.key in flat else next((v for v in flat.values() if isinstance(v, torch.Tensor)), None)
    )
    if not isinstance(mine, torch.Tensor):
        raise _NotReplayable("the module returned no tensor output")
    return mine


def _output_of(runner: _Runner, call: ModuleCall, want: torch.Tensor, expected: TensorRecord) -> torch.Tensor:
    got = _output(runner.run(call), expected).detach().cpu()
    if tuple(got.shape) != tuple(want.shape):
        raise _NotReplayable(f"output shape {list(got.shape)} vs recorded {list(want.shape)}")
    return got


def _excess(b: torch.Tensor, floor: torch.Tensor, want: torch.Tensor) -> float:
    """``||B - floor|| / ||A||``: what B's module does differently from A's at B's precision, on the same inputs.

    Measured between the two outputs directly, not as a difference of errors: errors of
    independent causes add in quadrature, so a defect as large as a third of the floor
    would move ``isolated - floor`` by only a twentieth of it.
    """
    den = float(torch.linalg.vector_norm(want.double())) or 1.0
    return float(torch.linalg.vector_norm(b.double() - floor.double())) / den


def replay(
    model: torch.nn.Module,
    run: Run | str | Path,
    *,
    model_a: torch.nn.Module | None = None,
    modules: Iterable[str] | None = None,
    steps: Iterable[int] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    states: StateFactories | None = None,
) -> ReplayResult:
    """Run each selected module of ``model`` (B) on the inputs ``run`` (A) recorded for it.

    Args:
        model (nn.Module): model B, with the same module names as the model that made ``run``.
        run (Run | str | Path): run A, captured in tensor mode (inputs and outputs saved); a
            module that carries state across steps (a KV cache) needs every step up to the
            replayed one logged.
        model_a (nn.Module, optional): model A. Enables the self-check and the precision floor;
            ``tensorlog.replay`` loads it from ``run.json`` where it can.
        modules (iterable of str, optional): regexes of modules to replay (default: every
            recorded module that ``model`` has).
        steps (iterable of int, optional): report only these steps.
        states (dict, optional): recorded type name -> factory of the state object a module
            carries across steps (the HF integration supplies ``DynamicCache``).

    Returns:
        ReplayResult: per module and step, the error it adds by itself, its floor, the excess,
        and the share; ``result.top()`` names the module with the largest excess.

    Example:
        >>> res = tensorlog.replay(model_b, "/tmp/tensorlog/run_a", model_a=model_a, modules=[r"layers\\.\\d+$"])
        >>> res.top().module, res.top().share
        ('model.layers.7', 0.9)
    """
    r = run if isinstance(run, Run) else load_run(run)
    pats = [compile_pattern(p) for p in modules] if modules else None
    wanted = set(steps) if steps is not None else None
    named_b = dict(model.named_modules())
    named_a = dict(model_a.named_modules()) if model_a is not None else {}
    factories = dict(states or {})
    sequences: dict[str, list[tuple[int, ModuleCall]]] = {}
    for s in sorted(r.steps):
        for call in r.steps[s].calls:
            if (
                call.module
                and call.module in named_b
                and not call.extra.get("backward")
                and call.rank in (None, 0)
                and (pats is None or any(p.search(call.module) for p in pats))
            ):
                sequences.setdefault(call.dirname, []).append((s, call))
    b_dtype = _dtype(model)
    out: list[ReplayedModule] = []
    for dirname, seq in sequences.items():
        out.extend(_replay_one(dirname, seq, named_b, named_a, factories, b_dtype, r, wanted, rtol, atol))
    out = _with_shares(sorted(out, key=lambda m: (m.step, _position(r, m))), r)
    checked = [m for m in out if m.self_error is not None]
    failed = [m for m in out if m.status == "not_replayable"]
    self_check = (
        "not run: pass model_a (model A) to check that replay reproduces the run"
        if model_a is None
        else f"self-replay reproduced run A on {len(checked)} module call(s) (max relative error "
        f"{max((m.self_error or 0.0 for m in checked), default=0.0):.2g})"
        + (f"; {len(failed)} module call(s) not replayable, left out of the ranking" if failed else "")
    )
    floor = (
        "not measured: no model A"
        if model_a is None
        else f"model A's modules cast to {b_dtype}"
        if b_dtype != _dtype(model_a)
        else "model A's modules (same dtype as B)"
    )
    return ReplayResult(run=str(r.path), self_check=self_check, floor=floor, modules=out)


def _dtype(m: torch.nn.Module) -> torch.dtype | None:
    p = next((p for p in m.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else None


def _position(r: Run, m: ReplayedModule) -> int:
    step = r.steps.get(m.step)
    c = step.call(m.module) if step else None
    return c.position if c else 0


def _replay_one(
    dirname: str,
    seq: list[tuple[int, ModuleCall]],
    named_b: dict[str, torch.nn.Module],
    named_a: dict[str, torch.nn.Module],
    factories: StateFactories,
    b_dtype: torch.dtype | None,
    r: Run,
    wanted: set[int] | None,
    rtol: float,
    atol: float,
) -> list[ReplayedModule]:
    module = seq[0][1].module
    b = _Runner(named_b[module], factories)
    a = _Runner(named_a[module], factories) if module in named_a else None
    floor = None
    if a is not None:
        a_dtype = _dtype(a.module)
        floor = _Runner(copy.deepcopy(a.module).to(b_dtype), factories) if b_dtype is not None and a_dtype != b_dtype else a
    out: list[ReplayedModule] = []
    blocked: str | None = None
    prev: int | None = None
    for s, call in seq:
        report = wanted is None or s in wanted
        stateful = any(rec.entry.value is not None and rec.entry.value.type in factories for rec in call.inputs)
        info = r.steps[s].info
        if stateful and info is not None and info.start_positions and not any(info.start_positions):
            for runner in {id(x): x for x in (b, a, floor) if x is not None}.values():
                runner.state = {}  # a new sequence starts here (a prefill): its state starts empty
            blocked, prev = None, s - 1
        if blocked is None and stateful and (prev is None or s != prev + 1):
            blocked = (
                f"it carries state (a cache) across steps, and the steps before step {s} of its sequence were not "
                "logged: replaying it needs every step from the prefill"
            )
        prev = s
        expected = _primary(call)
        if blocked is not None:
            if report:
                out.append(ReplayedModule(step=s, module=dirname, status="not_replayable", note=blocked))
            continue
        if expected is None:
            if report:
                out.append(ReplayedModule(step=s, module=dirname, status="skipped", note="no output tensor was saved"))
            continue
        try:
            want = expected.load()
            out_b = _output_of(b, call, want, expected)
            out_a = _output_of(a, call, want, expected) if a is not None else None
            out_f = (out_a if floor is a else _output_of(floor, call, want, expected)) if floor is not None else None
        except _NotReplayable as e:
            blocked = str(e)
            if report:
                out.append(ReplayedModule(step=s, module=dirname, status="not_replayable", note=blocked))
            continue
        except (RunReadError, AlignmentError, RuntimeError, TypeError, ValueError) as e:
            if report:
                out.append(
                    ReplayedModule(
                        step=s,
                        module=dirname,
                        status="not_replayable",
                        note=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}",
                    )
                )
            continue
        if report:
            out.append(_measure(s, dirname, want, out_b, out_a, out_f, rtol=rtol, atol=atol))
    return out


def _measure(
    step: int,
    dirname: str,
    want: torch.Tensor,
    out_b: torch.Tensor,
    out_a: torch.Tensor | None,
    out_f: torch.Tensor | None,
    *,
    rtol: float,
    atol: float,
) -> ReplayedModule:
    """One replayed call: B's error against the record, checked by A's self-replay, beside the floor."""
    mb = compare_tensors(want, out_b, rtol=rtol, atol=atol)
    ma = compare_tensors(want, out_a, rtol=rtol, atol=atol) if out_a is not None else None
    mf = compare_tensors(want, out_f, rtol=rtol, atol=atol) if out_f is not None else None
    iso = relative_error(mb)
    self_err = relative_error(ma) if ma is not None else None
    if ma is not None and not ma.allclose:
        return ReplayedModule(
            step=step,
            module=dirname,
            status="not_replayable",
            isolated=mb,
            isolated_error=iso,
            self_error=self_err,
            note=f"self-replay differs from the recorded output (relative error {self_err:.2g}): "
            "some input of this call was not recorded exactly",
        )
    return ReplayedModule(
        step=step,
        module=dirname,
        status="ok",
        isolated=mb,
        isolated_error=iso,
        self_error=self_err,
        floor_error=relative_error(mf) if mf is not None else None,
        excess=_excess(out_b, out_f, want) if out_f is not None else None,
    )


def _with_shares(rows: list[ReplayedModule], run: Run) -> list[ReplayedModule]:
    """Shares of the excess (else the isolated error) among the innermost replayed modules of each step."""
    out: list[ReplayedModule] = []
    for step in sorted({m.step for m in rows}):
        mine = [m for m in rows if m.step == step]
        calls = run.steps[step].calls if step in run.steps else []
        spans = {c.dirname: (c.seq_start, c.seq_end) for c in calls}

        def contains(a: str, b: str, spans: dict[str, tuple[int | None, int | None]] = spans) -> bool:
            sa, sb = spans.get(a), spans.get(b)
            if not sa or not sb or None in sa or None in sb:
                return False
            return sa[0] < sb[0] and sb[1] < sa[1]  # type: ignore[operator]

        ok = [m for m in mine if m.status == "ok"]
        inner = [m for m in ok if not any(contains(m.module, o.module) for o in ok if o is not m)]

        def weight(m: ReplayedModule) -> float:
            return m.excess if m.excess is not None else (m.isolated_error or 0.0)

        total = sum(weight(m) for m in inner)
        for m in mine:
            if m in inner and total > 0:
                m = m.model_copy(update={"share": weight(m) / total})
            out.append(m)
    return out
