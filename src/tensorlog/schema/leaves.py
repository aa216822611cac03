"""A call's inputs and outputs as named leaves, as the reference names them (the writer, readers and replay share it).

The reference walks a value recursively: a tensor is a leaf, the items of a
list or tuple (named tuples included) add ``_<i>``, the values of a dict add
``_<key>``, and anything else is not saved. So ``m([k, k], {"k": k})`` writes
``inputs_0_0``, ``inputs_0_1``, ``inputs_1_k``, and a module returning
``(a, (b, c))`` writes ``outputs_0``, ``outputs_1_0``, ``outputs_1_1``; a single
tensor output is ``outputs``. Two keys of one dict that read the same (``0`` and
``"0"``) become ``0`` and ``0~1``. tensorlog also logs keyword inputs, named the
same way after the keyword (``inputs_position_ids``), and records non-tensor
leaves by type and value (never pickled).
"""

from __future__ import annotations

import math
from collections.abc import Container
from typing import Any

import torch

__all__ = ["Leaf", "flatten_inputs", "flatten_value", "describe_value", "unique_key", "MAX_DEPTH"]

MAX_DEPTH = 32

Leaf = tuple[tuple[str, ...], Any]
"""``(path, value)``: the path's parts join into the file stem after the kind (``inputs`` + ``0_1``)."""


def flatten_value(value: Any, path: tuple[str, ...] = ()) -> list[Leaf]:
    """Leaves of ``value`` in the reference's order; a container deeper than :data:`MAX_DEPTH` is a leaf."""
    out: list[Leaf] = []
    _walk(value, path, out, None)
    return out


def _walk(value: Any, path: tuple[str, ...], out: list[Leaf], tuples: list[str] | None) -> Any:
    """Append leaves; return the structure node (a leaf's key, a list, or a dict of nodes)."""
    if isinstance(value, torch.Tensor) or len(path) > MAX_DEPTH:
        out.append((path, value))
        return "_".join(path)
    if isinstance(value, (list, tuple)):
        if tuples is not None and isinstance(value, tuple):
            tuples.append("_".join(path))
        return [_walk(v, (*path, str(i)), out, tuples) for i, v in enumerate(value)]
    if isinstance(value, dict):
        node: dict[str, Any] = {}
        for k, v in value.items():
            key = unique_key(str(k), node)
            node[key] = _walk(v, (*path, key), out, tuples)
        return node
    out.append((path, value))
    return "_".join(path)


def unique_key(key: str, taken: Container[str]) -> str:
    """``key``, or ``key~<n>`` when the dict already has a key that reads the same (``0`` and ``"0"``).

    Each value keeps its own leaf, file and json entry: the reference writes both to one file, the second
    overwriting the first.
    """
    out, n = key, 0
    while out in taken:
        n += 1
        out = f"{key}~{n}"
    return out


def flatten_inputs(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> tuple[list[Leaf], dict[str, Any]]:
    """Leaves of positional then keyword inputs, and the structure that rebuilds the call.

    The structure is ``{"args": [node], "kwargs": {name: node}, "tuples": [key]}``: a
    node is a leaf's key, a list of nodes or a dict of nodes; ``tuples`` names the
    containers that were tuples, so a rebuilt call passes the same types.
    """
    out: list[Leaf] = []
    tuples: list[str] = []
    structure = {
        "args": [_walk(a, (str(i),), out, tuples) for i, a in enumerate(args)],
        "kwargs": {str(k): _walk(v, (str(k),), out, tuples) for k, v in (kwargs or {}).items()},
        "tuples": tuples,
    }
    return out, structure


def describe_value(value: Any) -> dict[str, Any]:
    """A json-safe description of a non-tensor leaf: recorded, never pickled."""
    given = getattr(value, "__tensorlog_value__", None)
    if isinstance(given, dict):  # an argument a compiled graph did not keep (capture.compiled)
        return given
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 63:
            return {"type": "int", "value": str(value)}
        return {"type": type(value).__name__, "value": value if not isinstance(value, str) else value[:1000]}
    if isinstance(value, float):
        return {"type": "float", "value": value if math.isfinite(value) else repr(value)}
    if isinstance(value, (torch.dtype, torch.device)):
        return {"type": type(value).__name__, "value": str(value)}
    if isinstance(value, torch.nn.Module):
        return {"type": "module", "class_name": type(value).__name__}
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}"}
