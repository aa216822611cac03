"""Per-tensor statistics in two reductions, and content checksums.

:func:`partial_stats` runs where the tensor lives (on the GPU for a CUDA
tensor) and returns small device tensors without reading them: the caller
stacks a whole step's worth and copies them to the host once. :func:`finish`
turns the host rows into the eight published statistics. ``abs_max`` comes
from min and max, ``std`` from the variance, and the L2 norm from both
(``sqrt((n-1)·var + n·mean²)``), so no statistic needs a pass of its own;
NaN/Inf counts are taken only where min or max is not finite (NaN propagates
into both), except on CUDA, where checking would need a sync.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

from ..schema.records import STAT_KEYS

__all__ = [
    "partial_stats",
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

PARTIAL = 6
"""Columns of a partial row: min, max, mean, var, nan count, inf count."""


def stat_source(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor flattened in the precision its statistics are taken in, or None where they cannot be."""
    if t.layout != torch.strided or t.is_complex() or t.numel() == 0:
        return None
    x = t.detach()
    if x.dtype not in (torch.float32, torch.float64):
        try:
            x = x.to(torch.float32 if x.dtype.is_floating_point else torch.float64)
        except (RuntimeError, TypeError):  # e.g. a float8 kind this build cannot convert
            return None
    return x.reshape(-1)


def partial_stats(t: torch.Tensor) -> list[torch.Tensor]:
    """Four or six 0-dim tensors on ``t``'s device; nothing is read back here."""
    x = stat_source(t)
    if x is None:
        nan = torch.full((), math.nan, dtype=torch.float64, device=t.device)
        return [nan, nan, nan, nan, nan, nan]
    mn, mx = torch.aminmax(x)
    var, mean = torch.var_mean(x, correction=1 if x.numel() > 1 else 0)
    if x.device.type == "cpu" and math.isfinite(mn) and math.isfinite(mx):  # no NaN (it would propagate), no Inf
        return [mn, mx, mean, var]
    nan = torch.isnan(x).sum().to(x.dtype)
    inf = torch.isinf(x).sum().to(x.dtype)
    return [mn, mx, mean, var, nan, inf]


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

    ``lengths[i]`` is how many scalars part ``i`` had (four or six).
    """
    out: list[list[float]] = [[math.nan] * PARTIAL for _ in lengths]
    for row_ids, flat in host:
        pos = 0
        for i in row_ids:
            n = lengths[i]
            out[i] = flat[pos : pos + n] + [0.0] * (PARTIAL - n)
            pos += n
    return out


def finish(row: list[float], numel: int) -> list[float]:
    """The published statistics (:data:`~tensorlog.schema.records.STAT_KEYS`) from a partial row."""
    mn, mx, mean, var, nan, inf = row
    if math.isnan(mn) and math.isnan(mx) and math.isnan(mean) and numel == 0:
        return [math.nan] * 6 + [0.0, 0.0]
    std = math.sqrt(var) if var >= 0 else math.nan
    sq = (numel - 1) * var + numel * mean * mean if numel > 1 else mean * mean
    l2 = math.sqrt(sq) if sq >= 0 else math.nan
    return [mn, mx, mean, std, max(abs(mn), abs(mx)), l2, 0.0 if math.isnan(nan) else nan, 0.0 if math.isnan(inf) else inf]


def host_stats(t: torch.Tensor) -> list[float] | None:
    """The published statistics of a host tensor, now (the writer's path for tensors it holds a copy of)."""
    x = stat_source(t)
    if x is None:
        return None
    p = partial_stats(x)
    row = [float(v) for v in p] + [0.0] * (PARTIAL - len(p))
    return finish(row, x.numel())


assert len(STAT_KEYS) == 8

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
