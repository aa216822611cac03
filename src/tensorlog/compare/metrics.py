"""Tensor-pair metrics: pure computation, no I/O, no printing.

Everything is computed in float64 on the CPU in fixed-size chunks, so memory
stays bounded by the two input tensors (memory-mapped) plus a few chunks.
The tolerance test is ``torch.allclose(a, b, rtol, atol, equal_nan=True)``'s:
``|a - b| <= atol + rtol * |b|``, with NaNs in the same positions (and equal
infinities) counted as equal and any other non-finite value as a mismatch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from ..formats.safeio import as_number

__all__ = ["TensorMetrics", "Tolerance", "rounding_budget", "compare_tensors", "compare_stats", "CHUNK_ELEMENTS"]

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
    that would have passed at the ``rtol`` used.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

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


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else repr(v)


def compare_tensors(
    a: torch.Tensor, b: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-8, tolerance: Tolerance | None = None
) -> TensorMetrics:
    """Compare two tensors of equal ``numel`` element by element (flattened).

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
    if n == 0:
        return _identical(0, quantiles=False)
    if fa.dtype == fb.dtype and not fa.dtype.is_complex and torch.equal(fa, fb):
        # Bit-identical (torch.equal is False when NaNs are present): no arithmetic needed.
        return _identical(n, quantiles=True)
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
    sxx = syy = sxy = sdd = sabs = srel = 0.0
    max_abs, max_rel, min_atol = -1.0, 0.0, 0.0
    worst = 0
    outside = nonfinite = finite_n = 0
    first_bad = -1
    want_quantiles = n <= QUANTILE_MAX_ELEMENTS
    abs_all: list[torch.Tensor] | None = [] if want_quantiles else None
    for lo in range(0, n, CHUNK_ELEMENTS):
        hi = min(n, lo + CHUNK_ELEMENTS)
        x = fa[lo:hi].to(torch.float64)
        y = fb[lo:hi].to(torch.float64)
        d = (x - y).abs_()
        if bool(torch.isfinite(d).all()):  # NaN or Inf on either side makes d non-finite
            xs, ys, n_fin = x, y, hi - lo
        else:
            finite = torch.isfinite(x) & torch.isfinite(y)
            same = (x == y) | (torch.isnan(x) & torch.isnan(y))
            bad = ~finite & ~same
            nb = int(bad.sum())
            if nb and first_bad < 0:
                first_bad = lo + int(bad.nonzero()[0, 0])
            nonfinite += nb
            outside += nb
            zero = torch.zeros((), dtype=torch.float64)
            xs, ys = torch.where(finite, x, zero), torch.where(finite, y, zero)
            d = (xs - ys).abs_()
            n_fin = int(finite.sum())
        finite_n += n_fin
        sxx += float(torch.dot(xs, xs))
        syy += float(torch.dot(ys, ys))
        sxy += float(torch.dot(xs, ys))
        sdd += float(torch.dot(d, d))
        sabs += float(d.sum())
        m, i = torch.max(d, 0)
        if float(m) > max_abs:
            max_abs, worst = float(m), lo + int(i)
        ay = ys.abs()
        slack = d - rtol * ay
        min_atol = max(min_atol, float(slack.max()))
        outside += int((slack > atol).sum())
        rel = d / torch.maximum(xs.abs(), ay).clamp_min_(torch.finfo(torch.float64).tiny)  # 0/tiny where both are 0
        max_rel = max(max_rel, float(rel.max()))
        srel += float(rel.sum())
        if abs_all is not None:
            abs_all.append(d)
    cosine = 1.0 if sxx == 0 and syy == 0 else (sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0)
    rel_diff = 0.0 if sxx + syy == 0 else 1.0 - 2.0 * sxy / (sxx + syy)
    snr = None if sdd == 0 else (10.0 * math.log10(sxx / sdd) if sxx > 0 else -math.inf)
    worst_at = first_bad if first_bad >= 0 else worst
    idx = [int(v) for v in torch.unravel_index(torch.tensor(worst_at), tuple(a.shape))] if a.dim() else []
    p50 = p99 = None
    if abs_all is not None:
        all_d = torch.cat(abs_all)
        k50, k99 = max(1, math.ceil(0.5 * all_d.numel())), max(1, math.ceil(0.99 * all_d.numel()))
        p50, p99 = float(all_d.kthvalue(k50).values), float(all_d.kthvalue(k99).values)
    rel_l2 = math.sqrt(sdd / max(sxx, syy)) if max(sxx, syy) > 0 else (0.0 if sdd == 0 else math.inf)
    return TensorMetrics(
        allclose=outside == 0 and (tol.mode == "allclose" or rel_l2 <= l2_budget),
        rel_l2=rel_l2,
        judged_by=judged,
        numel=n,
        exact=False,
        max_abs=math.inf if nonfinite else max(max_abs, 0.0),
        mean_abs=sabs / finite_n if finite_n else 0.0,
        max_rel=max_rel,
        mean_rel=srel / finite_n if finite_n else 0.0,
        cosine=cosine,
        rel_diff=rel_diff,
        snr_db=snr,
        frac_outside=outside / n,
        num_outside=outside,
        nonfinite_mismatch=nonfinite,
        worst_index=idx,
        worst_values=[_json_float(float(fa[worst_at])), _json_float(float(fb[worst_at]))],
        min_atol=min_atol if not nonfinite else math.inf,
        abs_p50=p50,
        abs_p99=p99,
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


def _identical(n: int, *, quantiles: bool) -> TensorMetrics:
    """The metrics of two equal tensors of ``n`` elements."""
    return TensorMetrics(
        allclose=True,
        numel=n,
        exact=True,
        max_abs=0.0,
        mean_abs=0.0,
        max_rel=0.0,
        mean_rel=0.0,
        cosine=1.0,
        rel_diff=0.0,
        snr_db=None,
        frac_outside=0.0,
        num_outside=0,
        nonfinite_mismatch=0,
        worst_index=None,
        worst_values=None,
        min_atol=0.0,
        judged_by="exact",
        **({"abs_p50": 0.0, "abs_p99": 0.0} if quantiles else {}),
    )


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
