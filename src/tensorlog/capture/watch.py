"""Watching a live model: a few modules' statistics every N steps, for metrics and a flight recorder.

The watched modules (by default the decoder layers, the final norm and the
logits: a few label values per layer) get a pre- and a post-hook. In a model
that a compiler traces, the hooks stay on for good, because a graph keeps what
it was traced with, and each becomes a graph-native tap (:mod:`.graphtap`): the
graph measures each tensor in one fused pass into a table, at every forward,
at the cost of a few reductions. In an eager model the hooks are attached only
for the watched steps, and measure with :func:`partial_stats`, leaving the
numbers on the device.

At a watched step's end, one read-back gives every watched tensor's
statistics in the order the calls ran: a :class:`WatchedStep`. The watcher keeps
the newest ``watch_keep`` of them (the flight recorder) and writes nothing
itself. Everything here runs on the model's thread.
"""

from __future__ import annotations

import math
import re
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import LogConfig, compile_pattern
from ..storage.stats import finish, gather, partial_stats, split_rows
from .compiled import call_leaves, ids_of, output_leaves
from .graphtap import GraphTaps, GraphValue, emit
from .graphtap import measure_tensor as _measure

__all__ = ["Watcher", "WatchedStep", "WatchedCall", "ModuleStats", "summarize", "DEFAULT_WATCH", "watched_modules"]

DEFAULT_WATCH = (
    r"(^|\.)(layers|h|blocks)\.\d+$",
    r"^(model\.|transformer\.)?(norm|final_layernorm|ln_f)$",
    r"^logits_processor$",
    r"^lm_head$",
)
"""Decoder layers, the final norm, and the logits (vLLM's ``logits_processor``, HF's ``lm_head``)."""

TABLE_ROWS = 1024
"""Rows of the graph's table: a row per tapped call and one per tensor; ample for a few modules per layer."""

_lock = threading.Lock()
_WATCHERS: dict[int, Watcher] = {}
_next_id = iter(range(1, 1 << 31))


def watched_modules(names: Iterable[str], patterns: list[str] | None) -> list[str]:
    """The module names that ``patterns`` (``module_call_match``'s syntax) or :data:`DEFAULT_WATCH` select."""
    regexes = [compile_pattern(p) for p in patterns] if patterns else [re.compile(p) for p in DEFAULT_WATCH]
    return [n for n in names if n and any(r.search(n) for r in regexes)]


@dataclass(frozen=True, slots=True)
class WatchedCall:
    """One call's inputs (``kind`` ``"input"``) or output (``"output"``), as measured."""

    module: str
    cls: str
    kind: str
    leaves: str
    """The call's structure (:func:`~tensorlog.capture.compiled.call_leaves`)."""
    values: list[GraphValue]


@dataclass(frozen=True, slots=True)
class WatchedStep:
    step: int
    info: dict[str, Any] | None
    """The step's request layout (request ids, tokens per request), as a step index records it."""
    calls: list[WatchedCall]


@dataclass(frozen=True, slots=True)
class ModuleStats:
    """One module's inputs or output in one step, over all its floating-point tensors."""

    abs_max: float
    rms: float
    mean: float
    nonfinite: int
    numel: int


def summarize(step: WatchedStep) -> dict[tuple[str, str], ModuleStats]:
    """``(module, kind)`` -> its statistics in ``step`` (a module called twice counts both calls)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for call in step.calls:
        a = acc.setdefault((call.module, call.kind), [0.0, 0.0, 0.0, 0.0, 0.0])  # abs_max, sum sq, sum, bad, n
        for v in call.values:
            if v.partial is None or not v.dtype.is_floating_point or v.numel == 0:
                continue
            st = finish(list(v.partial), v.numel)
            mean, abs_max, l2, bad = st.mean, st.abs_max, st.l2_norm, st.nan_count + st.inf_count
            a[0] = max(a[0], abs_max) if not math.isnan(abs_max) else math.nan
            a[1] += l2 * l2
            a[2] += mean * v.numel
            a[3] += bad
            a[4] += v.numel
    out = {}
    for key, (abs_max, sq, total, bad, n) in acc.items():
        if n:
            out[key] = ModuleStats(abs_max, math.sqrt(sq / n) if sq >= 0 else math.nan, total / n, int(bad), int(n))
    return out


class Watcher:
    """The hooks, the graph's table and the recent steps of one watched model."""

    def __init__(self, model: torch.nn.Module, config: LogConfig, *, compiled: bool) -> None:
        if config.watch_every is None:
            raise ValueError("the config does not watch (watch_every is not set)")
        self.every = config.watch_every
        self.recent: deque[WatchedStep] = deque(maxlen=config.watch_keep)
        self.compiled = compiled
        self.recording = False
        self.index = 0
        modules = dict(model.named_modules())
        self.names = watched_modules(modules, config.watch_match)
        self._sites: list[tuple[str, str, str]] = []
        """Site key -> (module, class, kind): pre at ``2 i``, post at ``2 i + 1``."""
        for name in self.names:
            cls = type(modules[name]).__name__
            self._sites += [(name, cls, "input"), (name, cls, "output")]
        self._modules = [modules[n] for n in self.names]
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        self._native = (
            GraphTaps(
                device,
                stage_all=False,
                small_values=0,
                budget_bytes=0,
                rows=TABLE_ROWS,
                floats_only=True,
                gated=device.type == "cpu",
            )
            if compiled
            else None
        )
        self._counter = self._native.table if self._native is not None else torch.zeros(1, 2, dtype=torch.float64, device=device)
        self._eager: list[
            tuple[int, str, list[tuple[tuple[int, ...], torch.dtype, torch.device]], list[list[torch.Tensor] | None]]
        ] = []
        self._handles: list[Any] = []
        with _lock:
            self.id = next(_next_id)
            _WATCHERS[self.id] = self
        if compiled:
            self._attach()

    # -- steps ----------------------------------------------------------------------------

    def watches(self, index: int) -> bool:
        return index % self.every == 0

    def begin_step(self, index: int) -> bool:
        """Step ``index`` starts; returns whether it is watched."""
        self.index = index
        if not self.watches(index) or self.id not in _WATCHERS:
            return False
        self.recording = True
        self._eager = []
        if self._native is not None:
            self._native.begin()
        else:
            self._attach()
        return True

    def end_step(self, info: dict[str, Any] | None = None) -> WatchedStep | None:
        """The watched step that just ended, measured (one read-back); None for a step not watched."""
        if not self.recording:
            return None
        self.recording = False
        if not self.compiled:
            self._detach()
        events: list[tuple[float, int, list[GraphValue], str]] = []
        if self._native is not None:
            events += [(stamp, site, values, leaves) for stamp, site, values, leaves, _ in self._native.events()]
        events += self._eager_events()
        events.sort(key=lambda e: e[0])
        calls = [WatchedCall(*self._sites[site], leaves, values) for _, site, values, leaves in events if site < len(self._sites)]
        step = WatchedStep(self.index, info, calls)
        self.recent.append(step)
        return step

    def _eager_events(self) -> list[tuple[float, int, list[GraphValue], str]]:
        if not self._eager:
            return []
        parts = [p for _, _, _, ps in self._eager for p in ps if p is not None]
        host = [(ids, flat.to("cpu").tolist()) for _, ids, flat in gather(parts)]  # one read-back per device
        rows = split_rows([len(p) for p in parts], host)
        out = []
        pos = 0
        for site, leaves, metas, ps in self._eager:
            stamp = rows[pos][0]
            pos += 1
            values = []
            for (shape, dtype, device), p in zip(metas, ps[1:]):
                partial = None
                if p is not None:
                    partial = tuple(rows[pos])
                    pos += 1
                values.append(GraphValue(shape, dtype, device, partial, None))
            out.append((stamp, site, values, leaves))
        self._eager = []
        return out

    def eager(self, site: int, xs: list[torch.Tensor], leaves: str) -> None:
        """An untraced call of a watched module: measured now (one fused pass each), read back with the step."""
        if not self.recording:
            return
        c = self._counter
        c[0, 0] += 1  # the graph's counter too: eager calls and graph taps take turns in one order
        parts: list[list[torch.Tensor] | None] = [[c[0, 0].clone()]]
        metas = []
        for x in xs:
            x = x.detach()
            metas.append((tuple(x.shape), x.dtype, x.device))
            parts.append(_eager_measure(x) if x.dtype.is_floating_point else None)
        self._eager.append((site, leaves, metas, parts))

    # -- hooks ----------------------------------------------------------------------------

    def _attach(self) -> None:
        if self._handles:
            return
        for i, m in enumerate(self._modules):
            self._handles.append(m.register_forward_pre_hook(_pre_hook(f"{self.id}:{2 * i}"), with_kwargs=True))
            self._handles.append(m.register_forward_hook(_post_hook(f"{self.id}:{2 * i + 1}")))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def native_id(self) -> int:
        return self._native.id if self._native is not None else 0

    def close(self) -> None:
        """Take the hooks off. A compiled graph keeps its taps, which then measure into a table nobody reads."""
        self.recording = False
        self._detach()
        with _lock:
            _WATCHERS.pop(self.id, None)


_FUSED: list[Any] = []
"""The compiled one-pass measure, made at the first eager call that needs it (``[False]`` where it failed)."""


def _eager_measure(x: torch.Tensor) -> list[torch.Tensor]:
    """``x``'s partial statistics as :func:`partial_stats` gives them (0-dim, on its device), from one compiled
    pass when a compiler is there: five eager passes over a vocabulary's logits cost more than the step's
    sampling."""
    if x.numel() == 0 or x.layout != torch.strided or x.is_complex():
        return partial_stats(x)
    if not _FUSED:
        try:
            _FUSED.append(torch.compile(_measure, dynamic=True, fullgraph=True))
        except Exception:
            _FUSED.append(False)
    if _FUSED[0] is not False:
        try:
            return list(_FUSED[0](x).unbind())
        except Exception:  # no C++ compiler, an unsupported dtype: the eager passes below
            _FUSED[0] = False
    return partial_stats(x)


@torch._dynamo.assume_constant_result
def _native_of(watcher: int) -> int:
    w = _WATCHERS.get(watcher)
    return w.native_id if w is not None else 0


def _traced(ids: str, xs: list[torch.Tensor], leaves: str) -> None:
    """A watched call while Dynamo traces it: a graph-native tap."""
    watcher, site = ids_of(ids)
    native = _native_of(watcher)
    if native:
        emit(native, site, leaves, xs)


def _recording(ids: str) -> tuple[Watcher, int] | None:
    """An untraced call's watcher and site, or None in a step that is not watched (a module outside the
    compiled graph is called at every step): then nothing else is done."""
    watcher, site = ids_of(ids)
    w = _WATCHERS.get(watcher)
    return (w, site) if w is not None and w.recording else None


def _pre_hook(ids: str) -> Any:
    def pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.compiler.is_compiling():
            _traced(ids, *call_leaves(args, kwargs))
        elif (found := _recording(ids)) is not None:
            found[0].eager(found[1], *call_leaves(args, kwargs))

    return pre


def _post_hook(ids: str) -> Any:
    def post(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.compiler.is_compiling():
            _traced(ids, *output_leaves(output))
        elif (found := _recording(ids)) is not None:
            found[0].eager(found[1], *output_leaves(output))

    return post
