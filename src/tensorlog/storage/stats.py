"""Per-tensor statistics in a few cheap reductions, and content checksums.

:func:`partial_stats` runs where the tensor lives (on the GPU for a CUDA
tensor) and returns small device tensors without reading them: the caller
stacks a whole step's worth and copies them to the host once. :func:`finish`
turns the host rows into the eight published statistics. ``abs_max`` comes
from min and max, ``std`` from the centred norm, and the L2 norm from both
(``sqrt(||x - mean||² + n·mean²)``), so no statistic needs a pass of its own;
NaN/Inf counts are taken only where min or max is not finite (NaN propagates
into both), except on CUDA, where checking would need a sync.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import NamedTuple

import numpy as np
import torch

from ..schema.records import STAT_KEYS

__all__ = [
    "Stats",
    "partial_stats",
    "HOST_CHECK_DEVICES",
    "gather",
    "split_rows",
    "finish",
    "host_stats",
    "PARTIAL",
    "checksum",
    "CHECKSUM_ALGORITHM",
    "small_values",
    "stat_source",
]


class Stats(NamedTuple):
    """A tensor's published statistics (:data:`~tensorlog.schema.records.STAT_KEYS`, in that order).

    The counts stay floats as the reductions give them; :meth:`published` makes them ints.
    """

    min: float
    max: float
    mean: float
    std: float
    abs_max: float
    l2_norm: float
    nan_count: float
    inf_count: float

    @property
    def nonfinite(self) -> bool:
        """The tensor holds a NaN or an Inf."""
        return self.nan_count > 0 or self.inf_count > 0

    def published(self) -> dict[str, float | int]:
        """As a step index stores them: keyed by name, the counts as ints."""
        d: dict[str, float | int] = self._asdict()
        d["nan_count"] = int(self.nan_count)
        d["inf_count"] = int(self.inf_count)
        return d


assert Stats._fields == STAT_KEYS

PARTIAL = 7
"""Columns of a partial row: min, max, mean, ``||x - mean||``, ``sum(x - mean)``, nan count, inf count."""


_NATIVE = (torch.float32, torch.float64)


def stat_source(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` in the precision its statistics are taken in (float32 or float64), or None where they cannot be."""
    if t.layout != torch.strided or t.is_complex() or t.numel() == 0:
        return None
    if t.dtype in _NATIVE:
        return t.detach()
    try:
        return t.detach().to(torch.float32 if t.dtype.is_floating_point else torch.float64)
    except (RuntimeError, TypeError):  # e.g. a float8 kind this build cannot convert
        return None


HOST_CHECK_DEVICES = frozenset({"cpu"})
"""Devices whose values are read on the spot to skip the NaN/Inf counts: free on the host, a sync elsewhere."""


def partial_stats(t: torch.Tensor) -> list[torch.Tensor]:
    """Five or seven 0-dim tensors on ``t``'s device, from cheap reductions; nothing is read back here.

    The spread is the corrected two-pass sum of squares: ``d = x - mean`` is
    exact where it matters, and ``sum(d)`` takes back the rounding of the mean
    itself (which, for values far from zero and close together, would
    otherwise swamp the variance). As exact as ``var_mean``'s Welford, at a
    fifth of its cost on CPU. NaN/Inf counts need two more passes; they are
    skipped where min and max, read on the host, are finite (NaN propagates
    into both), and always taken where that read would be a sync.
    """
    x = stat_source(t)
    if x is None:
        nan = torch.full((), math.nan, dtype=torch.float64, device=t.device)
        return [nan] * PARTIAL
    mn, mx = torch.aminmax(x)
    mean = x.mean()
    d = x - mean
    dsum, cnorm = d.sum(), torch.linalg.vector_norm(d)
    if x.device.type in HOST_CHECK_DEVICES and math.isfinite(mn) and math.isfinite(mx):
        return [mn, mx, mean, cnorm, dsum]
    nan = torch.isnan(x).sum().to(x.dtype)
    inf = torch.isinf(x).sum().to(x.dtype)
    return [mn, mx, mean, cnorm, dsum, nan, inf]


def gather(parts: list[list[torch.Tensor]]) -> list[tuple[torch.device, list[int], torch.Tensor]]:
    """One float64 tensor per device holding every partial scalar of ``parts``, in one stack each.

    Returns ``(device, row numbers, flat values)``; :func:`rows` splits the host copies back.
    """
    by_device: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
    for i, p in enumerate(parts):
        rows, flat = by_device.setdefault(p[0].device, ([], []))
        rows.append(i)
        flat.extend(p)
    return [(dev, rows, torch.stack(flat).to(torch.float64)) for dev, (rows, flat) in by_device.items()]


def split_rows(lengths: list[int], host: list[tuple[list[int], list[float]]]) -> list[list[float]]:
    """Partial rows (six columns each) from the host copies of :func:`gather`'s tensors.

    ``lengths[i]`` is how many scalars part ``i`` had (five or seven).
    """
    out: list[list[float]] = [[math.nan] * PARTIAL for _ in lengths]
    for row_ids, flat in host:
        pos = 0
        for i in row_ids:
            n = lengths[i]
            out[i] = flat[pos : pos + n] + [0.0] * (PARTIAL - n)
            pos += n
    return out


def finish(row: list[float], numel: int) -> Stats:
    """The published statistics (:data:`~tensorlog.schema.records.STAT_KEYS`) from a partial row."""
    mn, mx, mean, cnorm, dsum, nan, inf = row
    if math.isnan(mn) and math.isnan(mx) and math.isnan(mean) and numel == 0:
        return Stats(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0.0, 0.0)
    n = max(numel, 1)
    m2 = max(cnorm * cnorm - dsum * dsum / n, 0.0) if math.isfinite(cnorm) else cnorm  # centred on the true mean
    mean = mean + dsum / n
    var = m2 / (numel - 1) if numel > 1 else 0.0 * m2
    std = math.sqrt(var) if var >= 0 else math.nan
    sq = m2 + numel * mean * mean
    l2 = math.sqrt(sq) if sq >= 0 else math.nan
    return Stats(mn, mx, mean, std, max(abs(mn), abs(mx)), l2, 0.0 if math.isnan(nan) else nan, 0.0 if math.isnan(inf) else inf)


def host_stats(t: torch.Tensor) -> Stats | None:
    """The published statistics of a CPU tensor, now: the writer threads' path for the copies they hold.

    Taken with numpy, which runs on the calling thread alone: torch ops here
    would start OpenMP teams beside the model's own and thrash its cores.
    """
    a = _host_array(t)
    if a is None:
        return None
    n = a.size
    mn, mx = float(a.min()), float(a.max())
    nan = inf = 0.0
    if not (math.isfinite(mn) and math.isfinite(mx)):
        nan = float(np.count_nonzero(np.isnan(a)))
        inf = float(np.count_nonzero(np.isinf(a)))
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf: NaN, as torch gives it
        mean = a.mean(dtype=a.dtype)
        d = a - mean
        cnorm = math.sqrt(float(np.einsum("i,i", d, d)))  # einsum, not dot: no BLAS threads either
        dsum = float(d.sum())
    return finish([mn, mx, float(mean), cnorm, dsum, nan, inf], n)


def _host_array(t: torch.Tensor) -> np.ndarray | None:
    """``t`` flattened as a float32 (float64 for float64 and integers) array, converted without torch."""
    if t.layout != torch.strided or t.is_complex() or t.numel() == 0 or t.device.type != "cpu":
        return None
    t = t.detach().reshape(-1)
    if t.dtype == torch.bfloat16:  # no numpy bfloat16: its bits are the top half of a float32's
        return (t.view(torch.int16).numpy().astype(np.int32) << 16).view(np.float32)
    try:
        a = t.numpy()
    except (TypeError, RuntimeError):  # float8 and other kinds numpy lacks
        x = stat_source(t)
        return None if x is None else x.reshape(-1).numpy()
    if a.dtype in (np.float32, np.float64):
        return a
    return a.astype(np.float32 if a.dtype.kind == "f" else np.float64)


CHECKSUM_ALGORITHM = "blake2b-128"


def checksum(t: torch.Tensor) -> str:
    """A digest of dtype, shape and bytes: equal digests mean bit-identical tensors."""
    t = t.contiguous().reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(t.dtype).encode())
    h.update(json.dumps(list(t.shape)).encode())
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return h.hexdigest()


def small_values(t: torch.Tensor) -> object:
    """The values of a small host tensor as nested lists (non-finite floats stay floats)."""
    if t.is_complex():
        return [[z.real, z.imag] for z in t.reshape(-1).tolist()]
    x = t.float() if t.dtype in (torch.bfloat16, torch.float16) or "float8" in str(t.dtype) else t
    return x.tolist()
