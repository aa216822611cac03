"""Flattening hook arguments into named entries, and per-tensor statistics.

Names follow the reference layout: positional inputs are numbered in their
flattened order (``inputs_0``), keyword inputs keep their name
(``inputs_hidden_states``); a single output is ``outputs``, a tuple/list gives
``outputs_<i>`` and a dict ``outputs_<key>``. Nested containers add ``.<i>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

__all__ = ["flatten_inputs_with_structure", "flatten_outputs", "stats_tensor", "describe_value", "STAT_KEYS"]

STAT_KEYS = ("min", "max", "mean", "std", "abs_max", "l2_norm", "nan_count", "inf_count")

_MAX_DEPTH = 4


def _walk(value: Any, prefix: str, depth: int) -> Iterator[tuple[str, Any]]:
    if depth < _MAX_DEPTH and isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        for i, v in enumerate(value):
            yield from _walk(v, f"{prefix}.{i}", depth + 1)
    elif depth < _MAX_DEPTH and isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{prefix}.{k}", depth + 1)
    else:
        yield prefix, value


def flatten_inputs_with_structure(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """Also return how to rebuild the call: ``{"args": [...], "kwargs": {...}}`` whose leaves are
    entry keys and whose lists/dicts mirror the original containers (``tensorlog replay`` uses it)."""
    out: list[tuple[str, Any]] = []
    counter = [0]

    def positional(v: Any, depth: int) -> Any:
        if depth < _MAX_DEPTH and isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
            return [positional(x, depth + 1) for x in v]
        if depth < _MAX_DEPTH and isinstance(v, dict):
            return {str(k): positional(x, depth + 1) for k, x in v.items()}
        key = str(counter[0])
        counter[0] += 1
        out.append((key, v))
        return key

    def keyword(v: Any, prefix: str, depth: int) -> Any:
        if depth < _MAX_DEPTH and isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
            return [keyword(x, f"{prefix}.{i}", depth + 1) for i, x in enumerate(v)]
        if depth < _MAX_DEPTH and isinstance(v, dict):
            return {str(k): keyword(x, f"{prefix}.{k}", depth + 1) for k, x in v.items()}
        out.append((prefix, v))
        return prefix

    structure = {"args": [positional(a, 1) for a in args], "kwargs": {k: keyword(v, k, 1) for k, v in (kwargs or {}).items()}}
    return out, structure


def flatten_outputs(output: Any) -> list[tuple[str | None, Any]]:
    """``[(key, value)]``; key ``None`` means the output is a single value."""
    if isinstance(output, (tuple, list)):
        return [(sub, v) for i, item in enumerate(output) for sub, v in _walk(item, str(i), 1)]
    if isinstance(output, dict):  # also HF ModelOutput
        return [(sub, v) for k, item in output.items() for sub, v in _walk(item, str(k), 1)]
    return [(None, output)]


def describe_value(value: Any) -> dict[str, Any]:
    """A json-safe description of a non-tensor argument: recorded, never pickled."""
    if value is None or isinstance(value, (bool, int, str)):
        return {"type": type(value).__name__, "value": value}
    if isinstance(value, float):
        return {"type": "float", "value": value if math.isfinite(value) else repr(value)}
    if isinstance(value, (torch.dtype, torch.device)):
        return {"type": type(value).__name__, "value": str(value)}
    if isinstance(value, torch.nn.Module):
        return {"type": "module", "class": type(value).__name__}
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}"}


@dataclass(frozen=True)
class TensorMeta:
    shape: list[int]
    dtype: str
    device: str
    stride: list[int]
    contiguous: bool
    numel: int

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorMeta":
        return cls(
            shape=list(t.shape),
            dtype=str(t.dtype),
            device=str(t.device),
            stride=list(t.stride()) if t.layout == torch.strided else [],
            contiguous=t.is_contiguous() if t.layout == torch.strided else False,
            numel=t.numel(),
        )


def _stat_source(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor upcast for statistics: floats to float32 (float64 stays), ints and bools to float64."""
    if t.layout != torch.strided or t.is_complex() or t.numel() == 0:
        return None
    if t.dtype in (torch.float64, torch.float32):
        return t
    try:
        return t.to(torch.float32 if t.dtype.is_floating_point else torch.float64)
    except (RuntimeError, TypeError):  # e.g. a float8 kind this build cannot convert
        return None


def stats_tensor(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """All statistics of all ``tensors`` stacked into one ``[n, 8]`` float64 tensor.

    Computed on the tensors' device so that a caller pays one device-to-host
    copy per hook call, not one per statistic. Four passes over the data
    (aminmax, mean, std, norm); ``abs_max`` is derived from min and max, and on
    the CPU the NaN/Inf counts are only counted when the mean is not finite.
    """
    rows = []
    for t in tensors:
        x = _stat_source(t.detach())
        if x is None:
            rows.append(torch.full((len(STAT_KEYS),), float("nan"), dtype=torch.float64, device=t.device))
            continue
        x = x.reshape(-1)
        mn, mx = torch.aminmax(x)
        mean = x.mean()
        std = x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
        norm = torch.linalg.vector_norm(x)
        if x.device.type == "cpu" and math.isfinite(float(mean)):
            nan = inf = torch.zeros((), dtype=x.dtype)
        else:
            nan, inf = torch.isnan(x).sum().to(x.dtype), torch.isinf(x).sum().to(x.dtype)
        rows.append(torch.stack([mn, mx, mean, std, torch.maximum(mn.abs(), mx.abs()), norm, nan, inf]))
    if not rows:
        return None
    return torch.stack([r.double() for r in rows]) if len({r.dtype for r in rows}) > 1 else torch.stack(rows).double()


def stats_row_to_dict(row: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in zip(STAT_KEYS, row):
        if key.endswith("_count"):
            out[key] = 0 if math.isnan(v) else int(v)
        else:
            out[key] = v if math.isfinite(v) else repr(v)
    return out


def small_values(t: torch.Tensor) -> Any:
    """The values of a small host tensor as json-safe nested lists."""
    if t.is_complex():
        return [[z.real, z.imag] for z in t.reshape(-1).tolist()]
    x = t.float() if t.dtype in (torch.bfloat16, torch.float16) or "float8" in str(t.dtype) else t
    vals = x.tolist()
    return _finite(vals)


def _finite(v: Any) -> Any:
    if isinstance(v, list):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v
