"""Tensor-pair metrics: pure computation, no I/O, no printing.

Everything is computed in float64 on the CPU in fixed-size chunks, so memory
stays bounded by the two input tensors (memory-mapped) plus a few chunks.
The tolerance test is ``torch.allclose(a, b, rtol, atol, equal_nan=True)``'s:
``|a - b| <= atol + rtol * |b|``, with NaNs in the same positions (and equal
infinities) counted as equal and any other non-finite value as a mismatch.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from ..errors import UsageError
from ..formats.safeio import as_number

__all__ = [
    "TensorMetrics",
    "Tolerance",
    "rounding_budget",
    "compare_tensors",
    "compare_stats",
    "CHUNK_ELEMENTS",
    "Accumulator",
    "Chunk",
    "Column",
    "MetricHandle",
    "Pair",
    "accumulators",
    "columns",
    "register_metric",
]

CHUNK_ELEMENTS = 1 << 18  # 2 MiB per float64 chunk: stays in cache, ~8x faster than 32 MiB chunks
QUANTILE_MAX_ELEMENTS = 1 << 22  # skip costly quantiles on huge tensors


def rounding_budget(dtype: torch.dtype) -> tuple[float, float]:
    """How far two computations of the same thing in ``dtype`` may drift by rounding alone: (relative L2, max abs / scale).

    Another summation order (a fused kernel, another batch's GEMM blocking, a TP all-reduce) moves a float32
    result by a few ulps per op, and depth adds them up: measured at 1e-7 to 2e-6 of the tensor's scale
    (``docs/tolerance.md``). The budget is ``max(4 eps, min(1024 eps, 2^-13))`` in relative L2 (1.2e-4 in float32,
    3.1e-2 in bfloat16) and four times that element-wise, relative to the pair's largest magnitude; the 2^-13 cap
    keeps a 1e-3 relative defect eight times above it. Integer and boolean tensors have no rounding: exact.
    """
    if not (dtype.is_floating_point or dtype.is_complex):
        return 0.0, 0.0
    eps = torch.finfo(dtype).eps
    l2 = max(4 * eps, min(1024 * eps, 2.0**-13))
    return l2, 4 * l2


class Tolerance(BaseModel):
    """How a pair is judged: ``rounding`` (the default: a budget from the dtypes and the tensor's scale),
    ``allclose`` (``|a-b| <= atol + rtol*|b|``, when the user gives ``rtol``/``atol``) or ``exact`` (bitwise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["rounding", "allclose", "exact"] = "rounding"
    rtol: float = 0.0
    atol: float = 0.0

    @classmethod
    def of(cls, rtol: float | None = None, atol: float | None = None, *, exact: bool = False) -> Tolerance:
        if exact:
            return cls(mode="exact")
        if rtol is None and atol is None:
            return cls(mode="rounding")
        return cls(mode="allclose", rtol=1e-5 if rtol is None else rtol, atol=1e-8 if atol is None else atol)

    def describe(self) -> str:
        if self.mode == "exact":
            return "exact (bitwise; NaNs in the same places are equal)"
        if self.mode == "allclose":
            return f"rtol={self.rtol:g}, atol={self.atol:g} (|a-b| <= atol + rtol*|b|)"
        return "rounding of the pair's dtype: relative L2 <= max(4 eps, min(1024 eps, 2^-13)), max abs <= 4x that x scale"

    def budget(self, *dtypes: torch.dtype) -> tuple[float, float]:
        """(relative L2, element-wise fraction of the scale) for a rounding judgement of these dtypes: the coarsest's."""
        worst = max((rounding_budget(d) for d in dtypes), default=(0.0, 0.0))
        return worst if self.mode == "rounding" else (math.inf, 0.0)


class TensorMetrics(BaseModel):
    """How far apart two tensors are. ``bool(m)`` is the tolerance verdict.

    ``max_rel`` uses a symmetric denominator, ``|a-b| / max(|a|, |b|)``, so it
    is bounded and does not explode where one side is near zero. ``rel_diff`` is
    the scale-free ``1 - 2*sum(a*b) / (sum(a*a) + sum(b*b))`` (0 means equal).
    ``snr_db`` takes run 1 as the signal. ``min_atol`` is the smallest ``atol``
    that would have passed at the ``rtol`` used. Each field is documented by its :class:`Column`; a metric
    added with :func:`register_metric` adds its fields after these.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    allclose: bool
    numel: int
    exact: bool
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    cosine: float
    rel_diff: float
    snr_db: float | None  # None: infinite (identical)
    frac_outside: float
    num_outside: int
    nonfinite_mismatch: int
    worst_index: list[int] | None
    worst_values: list[float | str] | None
    min_atol: float
    abs_p50: float | None = None
    abs_p99: float | None = None
    rel_l2: float = 0.0
    """``||a-b|| / max(||a||, ||b||)`` over the finite elements."""
    judged_by: str | None = None
    """The tolerance that judged the pair: ``exact``, ``rounding of float32 (...)`` or ``rtol=..., atol=...``."""

    def __bool__(self) -> bool:
        return self.allclose

    @model_validator(mode="after")
    def _only_registered_extras(self) -> TensorMetrics:
        unknown = set(self.model_extra or ()) - {c.field for _, cols in _extra for c in cols}
        if unknown:
            raise ValueError(f"unknown metric fields {sorted(unknown)} (a metric adds fields by register_metric)")
        return self


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else repr(v)


# -- the pair as every metric sees it ----------------------------------------------------


@dataclass(frozen=True, eq=False)
class Pair:
    """What a metric may know of the whole pair before its first chunk."""

    a: torch.Tensor
    """Run 1's tensor, flattened, on the CPU (run 2's is ``b``)."""
    b: torch.Tensor
    shape: tuple[int, ...]
    """The tensors' shape, for coordinates."""
    rtol: float
    atol: float
    """The element-wise test ``|a-b| <= atol + rtol*|b|`` (both 0 when judged exactly)."""


class Chunk:
    """One slice of the flattened pair in float64, prepared once and read by every accumulator.

    Non-finite elements are zeroed in ``xs``, ``ys`` and ``d``; ``bad`` marks those that differ
    (a NaN or Inf on one side only, or infinities of opposite sign). ``ay`` and ``rel`` are computed
    on first use, so two accumulators that read them share one computation.
    """

    def __init__(self, lo: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.lo = lo
        """Where the chunk starts in the flattened tensors."""
        d = (x - y).abs_()
        self.bad: torch.Tensor | None = None
        self.nonfinite = 0
        if bool(torch.isfinite(d).all()):  # NaN or Inf on either side makes d non-finite
            self.xs, self.ys, self.finite = x, y, x.numel()
        else:
            finite = torch.isfinite(x) & torch.isfinite(y)
            same = (x == y) | (torch.isnan(x) & torch.isnan(y))
            self.bad = ~finite & ~same
            self.nonfinite = int(self.bad.sum())
            zero = torch.zeros((), dtype=torch.float64)
            self.xs, self.ys = torch.where(finite, x, zero), torch.where(finite, y, zero)
            d = (self.xs - self.ys).abs_()
            self.finite = int(finite.sum())
        self.d = d

    @cached_property
    def ay(self) -> torch.Tensor:
        """``|b|`` over the finite elements."""
        return self.ys.abs()

    @cached_property
    def rel(self) -> torch.Tensor:
        """``|a-b| / max(|a|, |b|)``; 0 where both are 0."""
        return self.d / torch.maximum(self.xs.abs(), self.ay).clamp_min_(torch.finfo(torch.float64).tiny)


class Accumulator(ABC):
    """One metric: running totals fed chunk by chunk, then the fields it adds to :class:`TensorMetrics`.

    A subclass names its fields in ``fields``, takes the :class:`Pair` in ``__init__``, adds each
    :class:`Chunk` in ``add`` (in order: the totals are float sums, their order is their value), and
    returns its fields from ``finish``. ``identical`` gives the fields of two bit-identical tensors,
    which are never fed chunk by chunk.
    """

    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    @abstractmethod
    def add(self, c: Chunk) -> None: ...

    @abstractmethod
    def finish(self) -> dict[str, Any]: ...

    @classmethod
    def identical(cls, n: int) -> dict[str, Any]:
        return dict.fromkeys(cls.fields, 0.0)


class _Worst(Accumulator):
    """The largest difference and where it is; a non-finite mismatch is worse than any, the first one counts."""

    fields = ("max_abs", "nonfinite_mismatch", "worst_index", "worst_values")

    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.max_abs, self.worst, self.first_bad, self.nonfinite = -1.0, 0, -1, 0

    def add(self, c: Chunk) -> None:
        if c.bad is not None and c.nonfinite and self.first_bad < 0:
            self.first_bad = c.lo + int(c.bad.nonzero()[0, 0])
        self.nonfinite += c.nonfinite
        m, i = torch.max(c.d, 0)
        if float(m) > self.max_abs:
            self.max_abs, self.worst = float(m), c.lo + int(i)

    def finish(self) -> dict[str, Any]:
        p = self.pair
        at = self.first_bad if self.first_bad >= 0 else self.worst
        idx = [int(v) for v in torch.unravel_index(torch.tensor(at), p.shape)] if p.shape else []
        return {
            "max_abs": math.inf if self.nonfinite else max(self.max_abs, 0.0),
            "nonfinite_mismatch": self.nonfinite,
            "worst_index": idx,
            "worst_values": [_json_float(float(p.a[at])), _json_float(float(p.b[at]))],
        }

    @classmethod
    def identical(cls, n: int) -> dict[str, Any]:
        return {"max_abs": 0.0, "nonfinite_mismatch": 0, "worst_index": None, "worst_values": None}


class _MeanAbs(Accumulator):
    fields = ("mean_abs",)

    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.total, self.n = 0.0, 0

    def add(self, c: Chunk) -> None:
        self.n += c.finite
        self.total += float(c.d.sum())

    def finish(self) -> dict[str, Any]:
        return {"mean_abs": self.total / self.n if self.n else 0.0}


class _Relative(Accumulator):
    """The element-wise relative difference, against ``max(|a|, |b|)`` so it stays bounded."""

    fields = ("max_rel", "mean_rel")

    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.max, self.total, self.n = 0.0, 0.0, 0

    def add(self, c: Chunk) -> None:
        self.n += c.finite
        self.max = max(self.max, float(c.rel.max()))
        self.total += float(c.rel.sum())

    def finish(self) -> dict[str, Any]:
        return {"max_rel": self.max, "mean_rel": self.total / self.n if self.n else 0.0}


class _Energy(Accumulator):
    """The measures made of the sums ``a.a``, ``b.b``, ``a.b`` and ``d.d``."""

    fields = ("cosine", "rel_diff", "snr_db", "rel_l2")

    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.sxx = self.syy = self.sxy = self.sdd = 0.0

    def add(self, c: Chunk) -> None:
        self.sxx += float(torch.dot(c.xs, c.xs))
        self.syy += float(torch.dot(c.ys, c.ys))
        self.sxy += float(torch.dot(c.xs, c.ys))
        self.sdd += float(torch.dot(c.d, c.d))

    def finish(self) -> dict[str, Any]:
        sxx, syy, sxy, sdd = self.sxx, self.syy, self.sxy, self.sdd
        return {
            "cosine": 1.0 if sxx == 0 and syy == 0 else (sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0),
            "rel_diff": 0.0 if sxx + syy == 0 else 1.0 - 2.0 * sxy / (sxx + syy),
            "snr_db": None if sdd == 0 else (10.0 * math.log10(sxx / sdd) if sxx > 0 else -math.inf),
            "rel_l2": math.sqrt(sdd / max(sxx, syy)) if max(sxx, syy) > 0 else (0.0 if sdd == 0 else math.inf),
        }

    @classmethod
    def identical(cls, n: int) -> dict[str, Any]:
        return {"cosine": 1.0, "rel_diff": 0.0, "snr_db": None, "rel_l2": 0.0}


class _Outside(Accumulator):
    """The elements outside the element-wise test, and the smallest ``atol`` that would have let them pass."""

    fields = ("frac_outside", "num_outside", "min_atol")

    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.outside, self.nonfinite, self.min_atol = 0, 0, 0.0

    def add(self, c: Chunk) -> None:
        self.nonfinite += c.nonfinite
        self.outside += c.nonfinite
        slack = c.d - self.pair.rtol * c.ay
        self.min_atol = max(self.min_atol, float(slack.max()))
        self.outside += int((slack > self.pair.atol).sum())

    def finish(self) -> dict[str, Any]:
        return {
            "frac_outside": self.outside / self.pair.a.numel(),
            "num_outside": self.outside,
            "min_atol": self.min_atol if not self.nonfinite else math.inf,
        }

    @classmethod
    def identical(cls, n: int) -> dict[str, Any]:
        return {"frac_outside": 0.0, "num_outside": 0, "min_atol": 0.0}


class _Quantiles(Accumulator):
    """The median and 99th percentile of ``|a-b|``, skipped on tensors over :data:`QUANTILE_MAX_ELEMENTS`."""

    fields = ("abs_p50", "abs_p99")

    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.parts: list[torch.Tensor] | None = [] if pair.a.numel() <= QUANTILE_MAX_ELEMENTS else None

    def add(self, c: Chunk) -> None:
        if self.parts is not None:
            self.parts.append(c.d)

    def finish(self) -> dict[str, Any]:
        if self.parts is None:
            return {}
        d = torch.cat(self.parts)
        k50, k99 = max(1, math.ceil(0.5 * d.numel())), max(1, math.ceil(0.99 * d.numel()))
        return {"abs_p50": float(d.kthvalue(k50).values), "abs_p99": float(d.kthvalue(k99).values)}

    @classmethod
    def identical(cls, n: int) -> dict[str, Any]:
        return {"abs_p50": 0.0, "abs_p99": 0.0} if n else {}


# -- columns: how each field is named, shown and documented -------------------------------


@dataclass(frozen=True)
class Column:
    """One field of :class:`TensorMetrics`: its JSON name, how reports head and format it, its one-line doc.

    ``style`` is how a report writes the cell: ``number`` (``digits`` significant digits), ``integer``, ``text``,
    ``outside`` (the count and its fraction) or ``worst`` (coordinates and both values). ``module``
    names the :class:`~tensorlog.compare.results.ModuleResult` field that holds the worst value over a
    module's outputs, and ``worst`` whether the worst is the ``max`` or the ``min``.
    """

    field: str
    header: str
    doc: str
    dtype: str = "float64"
    """The column's pandas dtype in ``Comparison.to_pandas()``."""
    digits: int = 3
    style: Literal["number", "integer", "text", "outside", "worst"] = "number"
    module: str | None = None
    worst: Literal["max", "min"] = "max"

    @property
    def numeric(self) -> bool:
        """Right-aligned in a table."""
        return self.style in ("number", "integer", "outside")


_BUILTIN_COLUMNS = (
    Column("allclose", "allclose", "the pair's verdict under the tolerance", "boolean", style="text"),
    Column("numel", "elements", "number of elements", "Int64", style="integer"),
    Column("exact", "exact", "bit-identical", "boolean", style="text"),
    Column("max_abs", "max abs", "largest `abs(a-b)`; `inf` when a NaN or Inf is on one side only", module="worst_max_abs"),
    Column("mean_abs", "mean abs", "mean `abs(a-b)` over the finite elements"),
    Column("max_rel", "max rel", "largest `abs(a-b) / max(abs(a), abs(b))` (bounded)", module="worst_max_rel"),
    Column("mean_rel", "mean rel", "mean of the same over the finite elements"),
    Column("cosine", "cosine", "cosine similarity of the two, flattened", digits=6, module="min_cosine", worst="min"),
    Column("rel_diff", "rel diff", "`1 - 2*sum(a*b)/(sum(a*a)+sum(b*b))`: scale-free, 0 when equal", module="worst_rel_diff"),
    Column("snr_db", "SNR dB", "run 1 as the signal; null when identical", module="min_snr_db", worst="min"),
    Column("frac_outside", "frac outside", "fraction of the elements outside the tolerance"),
    Column("num_outside", "outside tol", "elements outside the tolerance", "Int64", style="outside"),
    Column(
        "nonfinite_mismatch", "non-finite mismatches", "elements with a NaN or Inf on one side only", "Int64", style="integer"
    ),
    Column("worst_index", "worst at (a, b)", "coordinates of the worst element", "object", digits=6, style="worst"),
    Column("worst_values", "worst values", "both values of the worst element", "object", style="text"),
    Column("min_atol", "min atol to pass", "the smallest `atol` that would have passed at this `rtol`"),
    Column("abs_p50", "abs p50", "median `abs(a-b)` (null on tensors over 4M elements)"),
    Column("abs_p99", "abs p99", "99th percentile of `abs(a-b)` (null on tensors over 4M elements)"),
    Column("rel_l2", "rel L2", "`norm(a-b) / max(norm(a), norm(b))` over the finite elements"),
    Column(
        "judged_by",
        "judged by",
        "`exact`, `rounding of float32 (rel L2 <= 1.2e-04, max abs <= ...)` with this pair's budget, or `rtol=..., atol=...`",
        "string",
        style="text",
    ),
)

_BUILTIN_ACCUMULATORS: tuple[type[Accumulator], ...] = (_Worst, _MeanAbs, _Relative, _Energy, _Outside, _Quantiles)

_VIEWS: dict[str, tuple[str, ...]] = {
    "modules": ("max_abs", "max_rel", "rel_diff", "cosine", "snr_db"),
    "modules_brief": ("max_abs", "max_rel", "cosine"),
    "tensors": (
        *("max_abs", "mean_abs", "max_rel", "cosine", "rel_diff", "snr_db"),
        *("num_outside", "worst_index", "min_atol", "judged_by"),
    ),
    "tensors_brief": ("max_abs", "max_rel", "cosine"),
}
"""Which columns each report table shows, in order: ``modules`` (a step's module table, markdown and HTML),
``modules_brief`` (``compare_il``'s findings), ``tensors`` (markdown ``--verbose``), ``tensors_brief``
(HTML ``--verbose``). A registered metric's columns are added at the end of the tensor tables."""

_extra: list[tuple[type[Accumulator], tuple[Column, ...]]] = []
"""Registered metrics; replaced whole (never changed in place) under :data:`_registry_lock`, so a comparison's
threads each read one consistent list."""
_registry_lock = threading.Lock()


class MetricHandle:
    """Undoes one :func:`register_metric`; removing twice is harmless, and it works as a context manager."""

    def __init__(self, entry: tuple[type[Accumulator], tuple[Column, ...]]) -> None:
        self._entry = entry

    def remove(self) -> None:
        global _extra
        with _registry_lock:
            _extra = [e for e in _extra if e is not self._entry]

    def __enter__(self) -> MetricHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_metric(accumulator: type[Accumulator], *columns: Column) -> MetricHandle:
    """Add a metric to every comparison of this process: its fields join :class:`TensorMetrics` (and the JSON),
    its columns the tensor tables of the reports (markdown and HTML ``--verbose``).

    Args:
        accumulator (type[Accumulator]): computes the fields, chunk by chunk.
        columns (Column): one per field the accumulator adds, in order.

    Returns:
        MetricHandle: ``remove()`` unregisters it.

    Raises:
        UsageError: the columns do not match the fields, or a field is taken. A comparison on Ray refuses to
            run while a metric is registered: its workers compute the built-in metrics only.

    Example:
        >>> handle = register_metric(MyMetric, Column("my_metric", "my metric", "what it measures"))
        >>> handle.remove()
    """
    global _extra
    if any(c.module for c in columns):
        raise UsageError(f"metric {accumulator.__name__}: a registered metric has no module-level field (Column.module)")
    named = [c.field for c in columns]
    if sorted(named) != sorted(accumulator.fields):
        raise UsageError(
            f"metric {accumulator.__name__}: give one column per field it adds ({list(accumulator.fields)}), got {named}"
        )
    entry = (accumulator, columns)
    with _registry_lock:
        taken = (set(TensorMetrics.model_fields) | {c.field for _, cols in _extra for c in cols}) & set(named)
        if taken:
            raise UsageError(f"metric {accumulator.__name__}: {sorted(taken)} taken already (unregister the other first)")
        _extra = [*_extra, entry]
    return MetricHandle(entry)


def registered_metrics() -> list[str]:
    """The names of the accumulators added by :func:`register_metric`."""
    return [acc.__name__ for acc, _ in _extra]


def accumulators() -> list[type[Accumulator]]:
    """The metrics every comparison computes: the built-in ones, then the registered ones."""
    return [*_BUILTIN_ACCUMULATORS, *(acc for acc, _ in _extra)]


def columns(view: str | None = None) -> list[Column]:
    """Every column (``view=None``: in :class:`TensorMetrics`' field order, registered ones last), or the
    columns of one report table (see :data:`_VIEWS`)."""
    registered = _extra
    extra = [c for _, cols in registered for c in cols]
    if view is None:
        return [*_BUILTIN_COLUMNS, *extra]
    by_field = {c.field: c for c in _BUILTIN_COLUMNS}
    return [by_field[f] for f in _VIEWS[view]] + (extra if view.startswith("tensors") else [])


# -- the comparison --------------------------------------------------------------------------


def compare_tensors(
    a: torch.Tensor, b: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-8, tolerance: Tolerance | None = None
) -> TensorMetrics:
    """Compare two tensors of equal ``numel`` element by element (flattened).

    Each metric is an :class:`Accumulator`; this feeds them the chunks in order and joins their fields.

    Args:
        a (Tensor): run 1's tensor (the signal for SNR).
        b (Tensor): run 2's tensor.
        rtol (float, default 1e-5), atol (float, default 1e-8): the tolerance, when ``tolerance`` is not given.
        tolerance (Tolerance, optional): judge by rounding of the dtypes, exactly, or as allclose.

    Returns:
        TensorMetrics: all metrics; ``bool()`` of it is the verdict.

    Example:
        >>> compare_tensors(torch.ones(3), torch.ones(3) + 1e-3).max_abs
        0.0010000000474974513
    """
    if a.numel() != b.numel():
        raise ValueError(f"cannot compare tensors of {a.numel()} and {b.numel()} elements")
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    if fa.dtype.is_complex or fb.dtype.is_complex:  # real and imaginary parts as pairs of reals
        fa, fb = (torch.view_as_real(x.to(torch.complex128)).reshape(-1) for x in (fa, fb))
    n = fa.numel()
    if fa.device.type != "cpu":
        fa = fa.cpu()
    if fb.device.type != "cpu":
        fb = fb.cpu()
    tol = tolerance or Tolerance(mode="allclose", rtol=rtol, atol=atol)
    kinds = accumulators()
    if n == 0:
        return _identical(0, kinds)
    if fa.dtype == fb.dtype and not fa.dtype.is_complex and torch.equal(fa, fb):
        # Bit-identical (torch.equal is False when NaNs are present): no arithmetic needed.
        return _identical(n, kinds)
    l2_budget, scale_frac = tol.budget(a.dtype, b.dtype)
    if tol.mode == "allclose":
        rtol, atol, judged = tol.rtol, tol.atol, f"rtol={tol.rtol:g}, atol={tol.atol:g}"
    elif tol.mode == "exact" or l2_budget == 0.0:
        rtol, atol, l2_budget, judged = 0.0, 0.0, 0.0, "exact"
    else:
        scale = max(_finite_abs_max(fa), _finite_abs_max(fb))
        rtol, atol = 0.0, scale_frac * scale
        coarse = max((a.dtype, b.dtype), key=lambda d: rounding_budget(d)[0])
        judged = f"rounding of {str(coarse).removeprefix('torch.')} (rel L2 <= {l2_budget:.2g}, max abs <= {atol:.3g})"
    pair = Pair(a=fa, b=fb, shape=tuple(a.shape), rtol=rtol, atol=atol)
    accs = [kind(pair) for kind in kinds]
    for lo in range(0, n, CHUNK_ELEMENTS):
        hi = min(n, lo + CHUNK_ELEMENTS)
        chunk = Chunk(lo, fa[lo:hi].to(torch.float64), fb[lo:hi].to(torch.float64))
        for acc in accs:
            acc.add(chunk)
    found: dict[str, Any] = {}
    for acc in accs:
        found.update(acc.finish())
    return TensorMetrics(
        allclose=found["num_outside"] == 0 and (tol.mode == "allclose" or found["rel_l2"] <= l2_budget),
        numel=n,
        exact=False,
        judged_by=judged,
        **found,
    )


def _finite_abs_max(x: torch.Tensor) -> float:
    """The largest finite magnitude, without a float64 copy of the tensor."""
    try:
        lo, hi = torch.aminmax(x) if x.dtype != torch.bool else (x.min(), x.max())
        m = max(abs(float(lo)), abs(float(hi)))
        if math.isfinite(m):
            return m
    except (RuntimeError, NotImplementedError):  # no kernel for this dtype (float8 on CPU): the chunked way
        pass
    out = 0.0
    for i in range(0, x.numel(), CHUNK_ELEMENTS):
        c = x[i : i + CHUNK_ELEMENTS].to(torch.float64)
        c = c[torch.isfinite(c)]
        if c.numel():
            out = max(out, float(c.abs().max()))
    return out


def _identical(n: int, kinds: list[type[Accumulator]]) -> TensorMetrics:
    """The metrics of two equal tensors of ``n`` elements."""
    found: dict[str, Any] = {}
    for kind in kinds:
        found.update(kind.identical(n))
    return TensorMetrics(allclose=True, numel=n, exact=True, judged_by="exact", **found)


STAT_COMPARED = ("min", "max", "mean", "std", "abs_max", "l2_norm")
MEAN_NOISE = 8 * 2.0**-24
"""How far two float32 sums of the same values may differ, relative to the largest value: a few ulps."""


def compare_stats(
    s1: dict[str, Any],
    s2: dict[str, Any],
    *,
    rtol: float,
    atol: float,
    tolerance: Tolerance | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[bool, dict[str, float], float]:
    """Compare two statistics dicts: each statistic with the same tolerance test.

    A mean is also allowed the rounding of the float32 sums it came from
    (:data:`MEAN_NOISE` of the largest value): the mean of a normalised
    tensor is ~0 and its last bits depend on the summation order, which
    differs between tools (and between two builds of one), not between the
    models. Returns the verdict, the relative error of each statistic, and the worst one.
    """
    rel: dict[str, float] = {}
    ok = True
    scale = max(
        (abs(v) for v in (as_number(s1.get("abs_max")), as_number(s2.get("abs_max"))) if v is not None and math.isfinite(v)),
        default=0.0,
    )
    if tolerance is not None and tolerance.mode != "allclose":
        # statistics are sums taken in floating point, also of integer tensors: their rounding, at least float32's
        of = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        frac = tolerance.budget(of)[1] if tolerance.mode == "rounding" else 0.0
        rtol, atol = frac, frac * scale  # statistics of a tensor within rounding are within rounding of its scale
    else:
        rtol, atol = (tolerance.rtol, tolerance.atol) if tolerance is not None else (rtol, atol)
    for key in STAT_COMPARED:
        a, b = as_number(s1.get(key)), as_number(s2.get(key))
        if a is None or b is None:
            continue
        if (math.isnan(a) and math.isnan(b)) or a == b:
            rel[key] = 0.0
            continue
        d = abs(a - b)
        if not math.isfinite(d):
            ok = False
            rel[key] = math.inf
            continue
        rel[key] = d / max(abs(a), abs(b))
        if d > atol + rtol * abs(b) + (MEAN_NOISE * scale if key == "mean" else 0.0):
            ok = False
    for key in ("nan_count", "inf_count"):
        if (s1.get(key) or 0) != (s2.get(key) or 0):
            ok = False
            rel[key] = 1.0
    return ok, rel, max(rel.values(), default=0.0)
