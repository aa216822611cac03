"""Graph-native taps: the compiled graph computes each tap's statistics and copies, with no Python per call.

A callback tap (:mod:`.compiled`) calls back into Python at every module
call, which stops fusion and does not survive CUDA graph replay. A native tap
is traced instead: while Dynamo traces a tapped hook, :func:`emit` puts into
the graph, for each tensor of the call,

* the statistics' partial row (:mod:`tensorlog.storage.stats`' columns: min,
  max, mean, spread, NaN and Inf counts, in one fused pass) and the sizes the
  graph does not fix, written in place into row ``r`` of a preallocated
  float64 table (a tensor staged whole on the host is measured from its copy
  instead, as in eager capture);
* where data is wanted (``mode: tensor`` or ``md5``, and the values of small
  tensors), a copy into a preallocated staging buffer sized for the
  largest size the graph allows (the engine's tokens per step in vLLM).

Rows and buffers have static addresses and are mutated in place, so CUDA graph
capture records the writes and every replay repeats them. Row 0 holds a counter
that each tapped call increments and stamps on its own row: after the step,
one read-back of the table tells which calls ran in this step (stamp above the
counter's value when the step began) and in which order, and :meth:`GraphTaps.replay`
hands them to the recorder as :class:`GraphValue` leaves, which the writer turns
into the same files as an eager capture's.

Slots are handed out while tracing, through functions Dynamo runs once and
bakes in (``assume_constant_result``) and a ``comptime`` look at the symbolic
shape, so neither adds a guard or a graph break. What they cost: a step that
runs one graph twice keeps the second call of each site; a dimension Dynamo
knows no upper bound for is staged up to four times its size when traced
(``mark_dynamic(t, dim, max=...)`` bounds it), and a larger value's data is
dropped for that step, with its statistics kept.
"""

from __future__ import annotations

import math
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.comptime import comptime
from torch.library import custom_op

from ..storage.stats import partial_stats
from ..storage.tensorfile import ST_NAMES

__all__ = ["GraphTaps", "GraphValue", "emit", "measure_tensor", "step_tensors", "ordered_effect", "MAX_DIMS", "DEFAULT_ROWS"]

MAX_DIMS = 16
_COLS = 9 + MAX_DIMS
"""seq, seven partial statistics, numel, then the sizes."""
DEFAULT_ROWS = 16384
_STAGE_UNBOUNDED = 4
"""A dimension with no known upper bound is staged up to this many times its size when traced."""

_lock = threading.Lock()
_TAPS: dict[int, GraphTaps] = {}
_BUFFERS = types.ModuleType("tensorlog_graph_buffers")
"""Tables (``t<taps>``) and staging buffers (``s<taps>_<row>``) as attributes of a module object: the graph
reaches each through a constant name, read afresh while tracing (a dict that grows mid-trace is not), and
adding one adds no guard to graphs traced before."""


def _table_name(taps: int) -> str:
    return f"t{taps}"


def _stage_name(taps: int, row: int) -> str:
    return f"s{taps}_{row}"


def _gate_name(taps: int) -> str:
    return f"g{taps}"


_ids = iter(range(1, 1 << 31))


@dataclass(frozen=True, slots=True)
class GraphValue:
    """A tensor of a tapped call as the graph saw it: metadata, statistics, and its staged data if any."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    partial: tuple[float, ...] | None
    data: torch.Tensor | None
    """The staged copy (a view into the staging buffer, valid until the graph runs again)."""
    not_staged: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def __tensorlog_reference__(self) -> dict[str, Any]:
        return {"type": "tensor", "shape": list(self.shape), "dtype": str(self.dtype), "numel": self.numel}


@dataclass(slots=True)
class _Leaf:
    row: int
    dtype: torch.dtype
    device: torch.device
    ndim: int
    stats: bool
    stage: int
    """Staged elements (0: none)."""
    why: str | None
    """Why its data is not staged, where data was wanted."""
    shape: tuple[int, ...] | None
    """Its shape when the graph fixes it (then not written at run time), else None."""
    maybe_empty: bool = False
    """A size may be 0 at run time (an unbacked or data-dependent one): min and max need a sentinel."""
    same_as: int = 0
    """The row of an earlier tap of this very tensor in the same graph (an input that is the previous call's
    output), unchanged since: nothing is computed for it, and it reads back as that row's value."""


@dataclass(slots=True)
class _Site:
    key: int
    """The tap site (:mod:`.compiled`'s registry): module, pre or post, and what to call."""
    leaves: str
    row: int
    tensors: list[_Leaf]


class GraphTaps:
    """One capture's table, staging buffers and traced sites. Tracing and replay run on the model's thread."""

    def __init__(
        self,
        device: torch.device,
        *,
        stage_all: bool,
        small_values: int,
        budget_bytes: int,
        token_bound: int | None = None,
        rows: int | None = None,
        files_up_to: int | None = None,
        always_measure: bool = False,
        floats_only: bool = False,
        gated: bool = False,
    ) -> None:
        self.id = next(_ids)
        self.device = device
        self.stage_all = stage_all
        self.small_values = small_values
        self.budget = budget_bytes
        self.token_bound = token_bound
        self.files_up_to = files_up_to
        """Staged tensors of at most this many elements become files (``mode: tensor``); None: none do."""
        self.always_measure = always_measure
        """Statistics in the graph even for tensors staged whole (``detect_anomaly`` reads them every step)."""
        self.floats_only = floats_only
        """Measure floating-point tensors only (a watcher's metrics use no other)."""
        self.gate = _static(torch.zeros((), dtype=torch.bool, device=device)) if gated else None
        """Measure only while this flag is set (``torch.cond``): a step that is not read costs a branch per tap,
        not its reductions. For hosts only: on a GPU the branch would read the flag back at every tap."""
        self.capacity = rows = rows or DEFAULT_ROWS
        self.table = _static(torch.zeros(rows, _COLS, dtype=torch.float64, device=device))
        self._next = 1
        self._staged_bytes = 0
        self._sites: list[_Site] = []
        self._leaves: dict[int, _Leaf] = {}
        self._traced: dict[int, tuple[torch.Tensor, int, int]] = {}
        """The fake tensors tapped while tracing, with their version and row: a later tap of the same one is
        an alias. (Fakes of one trace are never another's, so aliases stay within a graph.)"""
        self.exhausted: set[int] = set()
        """Sites traced after the table was full: they call back into Python instead (:func:`_tap_late`)."""
        self.recording = False
        """A logged step is open: a late tap keeps what it sees (only then, so nothing piles up between)."""
        self._late: list[tuple[float, int, list[GraphValue], str]] = []
        self.over: dict[str, int] = {}
        """Tensors whose data was larger than its staging this step, by the reason's text."""
        with _lock:
            _TAPS[self.id] = self
            setattr(_BUFFERS, _table_name(self.id), self.table)
            if self.gate is not None:
                setattr(_BUFFERS, _gate_name(self.id), self.gate)

    # -- while tracing ---------------------------------------------------------------------

    def _alloc(self, key: int, leaves: str, n: int) -> int:
        if self._next + 1 + n > self.capacity:
            self.exhausted.add(key)
            return -1
        row = self._next
        self._next += 1 + n
        self._sites.append(_Site(key, leaves, row, []))
        return row

    def _describe(self, row: int, fake: torch.Tensor) -> None:
        """Register the tensor in ``row``: what can be measured, and the staging its data needs."""
        site = self._sites[-1]
        dtype, ndim = fake.dtype, fake.dim()
        seen = self._traced.get(id(fake))
        if seen is not None and seen[0] is fake and seen[1] == fake._version:
            earlier = self._leaves[seen[2]]
            leaf = _Leaf(
                row, dtype, fake.device, ndim, False, 0, earlier.why, earlier.shape, same_as=earlier.same_as or earlier.row
            )
            site.tensors.append(leaf)
            self._leaves[row] = leaf
            return
        self._traced[id(fake)] = (fake, fake._version, row)
        bound, lower, known = _numel_bounds(fake, self.token_bound)
        measurable = fake.layout == torch.strided and not dtype.is_complex and bound > 0 and ndim <= MAX_DIMS
        measurable = measurable and (dtype.is_floating_point or not self.floats_only)
        want = self.stage_all or (self.small_values > 0 and lower <= self.small_values)
        stage, why = 0, None
        if want and ndim > MAX_DIMS:
            why = f"more than {MAX_DIMS} dimensions"
        elif want:
            cap = bound if self.stage_all else min(bound, self.small_values)
            nbytes = cap * dtype.itemsize
            if self._staged_bytes + nbytes > self.budget:
                why = f"its staging ({nbytes} bytes) would pass max_pending_bytes ({self.budget})"
            else:
                self._staged_bytes += nbytes
                stage = max(cap, 1)
                if not known:
                    why = "UNBOUNDED"
        # A whole staged copy of a host tensor is measured from its data, when a reader asks (as eager capture
        # does): not in the graph, where each tensor's reductions cost compile time and a pass over it.
        from_data = (
            self.files_up_to is not None
            and stage
            and known
            and bound <= self.files_up_to
            and fake.device.type == "cpu"
            and dtype in ST_NAMES
            and not self.always_measure
        )
        fixed = tuple(fake.shape) if all(type(d) is int for d in fake.shape) else None
        leaf = _Leaf(row, dtype, fake.device, ndim, measurable and not from_data, stage, why, fixed, maybe_empty=lower == 0)
        site.tensors.append(leaf)
        self._leaves[row] = leaf

    # -- around a step ---------------------------------------------------------------------

    @property
    def used(self) -> bool:
        return bool(self._sites)

    def begin(self, table: torch.Tensor | None = None) -> None:
        """A step starts: remember the counter (a device copy, no read-back)."""
        t = self.table if table is None else table
        t[0, 1].copy_(t[0, 0])
        if self.gate is not None:
            self.gate.fill_(True)
        self._late = []
        self.recording = True

    def late(self, key: int, xs: list[torch.Tensor], leaves: str, seq: float) -> None:
        """A site the table had no room for, at run time: measured and copied now, replayed in its place."""
        if not self.recording:
            return
        values = []
        for x in xs:
            x = x.detach()
            plain = x.layout == torch.strided and not x.is_complex() and x.numel() > 0
            partial = tuple(float(v) for v in torch.stack(partial_stats(x)).tolist()) if plain else None
            if partial is not None and len(partial) < 7:
                partial = partial + (0.0,) * (7 - len(partial))
            keep = self.stage_all or x.numel() <= self.small_values
            data = x.to("cpu", copy=True).contiguous() if keep and plain else None
            values.append(GraphValue(tuple(x.shape), x.dtype, x.device, partial, data))
        self._late.append((seq, key, values, leaves))

    def replay(
        self,
        call: Callable[[int, list[Any], str, bool], None],
        table: torch.Tensor | None = None,
        staged: dict[str, torch.Tensor] | None = None,
    ) -> int:
        """Hand this step's tapped calls to ``call(site, values, leaves, late)`` in the order they ran (``late``: a
        site the table had no room for, which called back); returns how many.

        ``table`` and ``staged`` are the step op's arguments when the step ends inside the graph (they hold the
        values the graph computed); otherwise the buffers themselves are read.
        """
        events = self.events(table, staged)
        for _, key, values, leaves, late in events:
            call(key, values, leaves, late)
        return len(events)

    def events(
        self, table: torch.Tensor | None = None, staged: dict[str, torch.Tensor] | None = None
    ) -> list[tuple[float, int, list[GraphValue], str, bool]]:
        """This step's tapped calls as ``(stamp, site, values, leaves, late)``, in the order they ran; one
        read-back of the table. The step's recording ends here."""
        if self.gate is not None:
            self.gate.fill_(False)
        if not self._sites and not self._late:
            self.recording = False
            return []
        t = self.table if table is None else table
        host = t[: self._next].to("cpu").numpy()
        buffers = staged or {}
        ctr, base = host[0, 0], host[0, 1]
        seq = host[:, 0]
        order: list[tuple[float, int, int]] = [(seq[s.row], 0, i) for i, s in enumerate(self._sites) if base < seq[s.row] <= ctr]
        order += [(e[0], 1, i) for i, e in enumerate(self._late) if base < e[0] <= ctr]
        self.over = {}
        memo: dict[int, GraphValue] = {}

        def value(leaf: _Leaf) -> GraphValue:
            r = leaf.same_as or leaf.row  # one object for one tensor: the writer links the second to the first
            v = memo.get(r)
            if v is None:
                v = memo[r] = self._value(self._leaves[r], host[r], buffers)
            return v

        out: list[tuple[float, int, list[GraphValue], str, bool]] = []
        for stamp, late, i in sorted(order):
            if late:
                _, key, values, leaves = self._late[i]
                out.append((float(stamp), key, list(values), leaves, True))
                continue
            site = self._sites[i]
            out.append((float(stamp), site.key, [value(leaf) for leaf in site.tensors], site.leaves, False))
        self._late, self.recording = [], False
        return out

    def _value(self, leaf: _Leaf, row: Any, buffers: dict[str, torch.Tensor]) -> GraphValue:
        shape = leaf.shape if leaf.shape is not None else tuple(int(d) for d in row[9 : 9 + leaf.ndim])
        numel = math.prod(shape)
        partial = tuple(float(v) for v in row[1:8]) if leaf.stats else None
        if partial is not None and numel == 0:  # as eager capture measures an empty tensor
            partial = (math.nan,) * 7
        data, why = None, leaf.why
        if leaf.stage:
            if numel <= leaf.stage:
                why = None
                with _lock:
                    name = _stage_name(self.id, leaf.row)
                    buf = buffers.get(name, getattr(_BUFFERS, name, None))
                data = buf.narrow(0, 0, numel).view(shape) if buf is not None else None
            elif self.stage_all:
                why = (
                    f"{numel} elements, more than the {leaf.stage} staged for it: the graph was traced with no "
                    "upper bound for a dimension (torch._dynamo.mark_dynamic(t, dim, max=N) sets one)"
                )
                self.over[why] = self.over.get(why, 0) + 1
        if why == "UNBOUNDED":
            why = None
        return GraphValue(shape, leaf.dtype, leaf.device, partial, data, why)

    def close(self) -> None:
        self._traced = {}
        with _lock:
            _TAPS.pop(self.id, None)
            for name in [_table_name(self.id), _gate_name(self.id)] + [_stage_name(self.id, r) for r in self._leaves]:
                if hasattr(_BUFFERS, name):
                    delattr(_BUFFERS, name)


def _numel_bounds(fake: torch.Tensor, token_bound: int | None) -> tuple[int, int, bool]:
    """``(upper, lower, known)`` for the tensor's element count: Dynamo's value ranges for its symbols, the
    engine's token bound for a symbol with none, else four times the traced size."""
    sizes = fake.shape
    up, low, known = 1, 1, True
    for d in sizes:
        if isinstance(d, int):
            up, low = up * d, low * d
            continue
        node = d.node
        env = node.shape_env
        expr = node.expr
        if expr.is_number:
            up, low = up * int(expr), low * int(expr)
            continue
        r = env.bound_sympy(expr)
        lo = _finite(r.lower) or 0
        hi_known = _finite(r.upper)
        if hi_known is not None:
            hi = hi_known
        elif token_bound is not None:
            hi = token_bound
        else:
            hint = env.optimization_hint(expr) if hasattr(env, "optimization_hint") else env.size_hint(expr)
            hi, known = _STAGE_UNBOUNDED * int(hint), False
        up, low = up * max(hi, 1), low * max(lo, 0)
    return up, low, known


def _static(t: torch.Tensor) -> torch.Tensor:
    """A buffer the graph writes: its address and shape are constants (no symbol under ``dynamic=True``, and
    CUDA graph trees replay writes into it)."""
    torch._dynamo.mark_static_address(t)
    torch._dynamo.mark_static(t)
    return t


def _finite(v: Any) -> int | None:
    """A sympy bound as an int, or None for an infinite one (``int_oo`` says it is finite)."""
    from torch.utils._sympy.numbers import int_oo

    if v in (int_oo, -int_oo) or not getattr(v, "is_number", False):
        return None
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


@custom_op("tensorlog::tap_late", mutates_args=())
def _tap_late(xs: list[torch.Tensor], seq: torch.Tensor, taps: int, key: int, leaves: str) -> None:
    t = _TAPS.get(taps)
    if t is not None:
        t.late(key, xs, leaves, float(seq))


@_tap_late.register_fake
def _tap_late_fake(xs: list[torch.Tensor], seq: torch.Tensor, taps: int, key: int, leaves: str) -> None:
    return None


def ordered_effect(op: Any) -> None:
    """Inductor keeps an op registered so, in program order, and never drops it for having no output."""
    from torch._library.effects import EffectType

    op.register_effect(EffectType.ORDERED)


ordered_effect(_tap_late)


# -- traced code -------------------------------------------------------------------------------


@torch._dynamo.assume_constant_result
def _alloc(taps: int, key: int, leaves: str, n: int) -> int:
    t = _TAPS.get(taps)
    return -1 if t is None else t._alloc(key, leaves, n)


@torch._dynamo.assume_constant_result
def _plan_of(taps: int, row: int) -> tuple[bool, bool, bool, int, str]:
    """What the graph does for ``row``, as :meth:`GraphTaps._describe` decided: ``(measure, write its sizes,
    a size may be 0, elements staged, the staging buffer's name)``. The buffer is made here, outside any fake
    mode ``comptime`` may run in."""
    leaf = _TAPS[taps]._leaves[row]
    name = _stage_name(taps, row)
    if leaf.stage:
        with _lock:
            if not hasattr(_BUFFERS, name):
                setattr(_BUFFERS, name, _static(torch.zeros(leaf.stage, dtype=leaf.dtype, device=leaf.device)))
    return leaf.stats, leaf.shape is None and not leaf.same_as, leaf.maybe_empty, leaf.stage, name


@torch._dynamo.assume_constant_result
def _staged_names(taps: int) -> tuple[str, ...]:
    """The staging buffers made so far, in row order (what :meth:`GraphTaps.replay` expects)."""
    t = _TAPS.get(taps)
    if t is None:
        return ()
    return tuple(n for n in (_stage_name(taps, leaf.row) for leaf in t._leaves.values() if leaf.stage) if hasattr(_BUFFERS, n))


@torch._dynamo.assume_constant_result
def _table_of(taps: int) -> str:
    return _table_name(taps)


def step_tensors(taps: int, end: bool) -> tuple[torch.Tensor, list[torch.Tensor], str]:
    """What a step op inside the graph reads: the table, and at the step's end the staging buffers so far and
    their names, so that the graph runs it after every tap and its callback sees the values the graph made."""
    names = _staged_names(taps) if end else ()
    return getattr(_BUFFERS, _table_of(taps)), [getattr(_BUFFERS, n) for n in names], ",".join(names)


def _register(ctx: Any) -> None:
    """At trace time: the fake tensor's symbolic shape, which only ``comptime`` shows without a guard."""
    taps = ctx.get_local("taps").as_python_constant()
    row = ctx.get_local("row").as_python_constant()
    _TAPS[taps]._describe(row, ctx.get_local("x").as_fake())


def emit(taps: int, key: int, leaves: str, xs: list[torch.Tensor]) -> None:
    """Trace one tapped call (only ever run by Dynamo): stamp its row, and measure and stage each tensor."""
    first = _alloc(taps, key, leaves, len(xs))
    table = getattr(_BUFFERS, _table_of(taps))
    c = table[0, 0] + 1
    if first < 0:  # the table is full: this site calls back, stamped in the same order
        _put(table, [0], 0, c.reshape(1))
        _tap_late(xs, c, taps, key, leaves)
        return
    _put(table, [0, first], 0, c.expand(2))
    for i, x in enumerate(xs):
        _leaf(taps, first + 1 + i, x, table)


def _leaf(taps: int, row: int, x: torch.Tensor, table: torch.Tensor) -> None:
    comptime(_register)  # on ``x`` as the call has it: the same fake as an earlier tap of the same tensor
    x = x.detach()
    measure, sized, maybe_empty, n, buffer = _plan_of(taps, row)
    sizes = []
    if sized:
        sizes = [torch.scalar_tensor(x.numel(), dtype=torch.float64)] + [
            torch.scalar_tensor(d, dtype=torch.float64) for d in x.shape[:MAX_DIMS]
        ]
    if measure:
        gate = _gate_of(taps)
        if gate:
            stats = torch.cond(getattr(_BUFFERS, gate), _measure_empty if maybe_empty else measure_tensor, _unmeasured, (x,))
        else:
            stats = _measure_empty(x) if maybe_empty else measure_tensor(x)
        _put(table, [row] * (7 + len(sizes)), 1, torch.cat([stats, torch.stack(sizes)]) if sizes else stats)
    elif sizes:
        _put(table, [row] * len(sizes), 8, torch.stack(sizes))
    if n:
        flat = x.reshape(-1)
        k = torch.sym_min(flat.numel(), n)
        getattr(_BUFFERS, buffer).narrow(0, 0, k).copy_(flat[:k])


def measure_tensor(x: torch.Tensor, maybe_empty: bool = False) -> torch.Tensor:
    """The seven partial statistics of ``x`` in one pass, as float64.

    Every reduction reads the same input, so Inductor makes them one vectorised loop (eager's two-pass spread
    needs the mean first: a second loop). Sums are taken in float64: the cancellation in sum(x^2) - sum(x)^2/n
    costs 1e-16 times mean^2/variance, below float32 rounding of the spread while the mean is under about 2e4
    times the spread (where a float32 tensor holds few digits of its spread anyway). ``x != x`` counts NaNs
    (``isnan`` does not vectorise); the Infs are what is neither.
    """
    s = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32 if x.dtype.is_floating_point else torch.float64)
    if maybe_empty:  # aminmax of nothing raises: +inf and -inf that change no other min or max
        flat = s.reshape(-1)
        mn = torch.cat([flat, flat.new_full((1,), math.inf)]).amin()
        mx = torch.cat([flat, flat.new_full((1,), -math.inf)]).amax()
    else:
        mn, mx = torch.aminmax(s)
    d = s.to(torch.float64)
    total = d.sum()
    mean = total / x.numel()
    m2 = torch.clamp_min((d * d).sum() - total * mean, 0.0)
    finite, nan = torch.isfinite(s).sum(), (s != s).sum()
    inf = x.numel() - finite - nan
    cols = [mn.to(torch.float64), mx.to(torch.float64), mean, torch.sqrt(m2), torch.zeros_like(mean)]
    return torch.stack(cols + [nan.to(torch.float64), inf.to(torch.float64)])


def _measure_empty(x: torch.Tensor) -> torch.Tensor:
    return measure_tensor(x, True)


def _unmeasured(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(7, dtype=torch.float64, device=x.device)


@torch._dynamo.assume_constant_result
def _gate_of(taps: int) -> str:
    """The gate flag's buffer name, or "" for taps that always measure."""
    t = _TAPS.get(taps)
    return _gate_name(taps) if t is not None and t.gate is not None else ""


def _put(table: torch.Tensor, rows: list[int], col: int, values: torch.Tensor) -> None:
    """``values`` into ``table`` at ``rows`` and consecutive columns from ``col`` (one each), in place.

    ``index_put_`` with constant indices: Inductor writes just those cells into the table's own memory,
    where slice assignment (``table[r, a:b] = v``) would make it copy the whole table at every tap.
    """
    n = len(rows)
    if len(set(rows)) == 1:
        idx = (torch.tensor(rows, device=table.device), torch.arange(col, col + n, device=table.device))
    else:
        idx = (torch.tensor(rows, device=table.device), torch.full((n,), col, device=table.device))
    table.index_put_(idx, values.to(device=table.device, dtype=torch.float64))
