"""A call's inputs and outputs as named leaves, as the reference names them (what the writer and the readers name files by).

The reference walks a value recursively: a tensor is a leaf, the items of a
list or tuple (named tuples included) add ``_<i>``, the values of a dict add
``_<key>``, and anything else is not saved. So ``m([k, k], {"k": k})`` writes
``inputs_0_0``, ``inputs_0_1``, ``inputs_1_k``, and a module returning
``(a, (b, c))`` writes ``outputs_0``, ``outputs_1_0``, ``outputs_1_1``; a single
tensor output is ``outputs``. Two keys of one dict that read the same (``0`` and
``"0"``) become ``0`` and ``0~1``. tensorlog also logs keyword inputs, named the
same way after the keyword (``inputs_position_ids``), and records non-tensor
leaves by type and value (never pickled).

The walk itself is :mod:`.tree`'s codec, which capture, compiled taps, replay and
``reload_input_dir`` share; this module names its leaves and structure as the
reference and the index do.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .tree import MAX_DEPTH, Leaf, call_structure, flatten, unique_key

__all__ = ["Leaf", "flatten_inputs", "flatten_value", "describe_value", "unique_key", "MAX_DEPTH"]


def flatten_value(value: Any, path: tuple[str, ...] = ()) -> list[Leaf]:
    """Leaves of ``value`` in the reference's order; a container deeper than :data:`MAX_DEPTH` is a leaf."""
    return flatten(value, path, live=False)[0]


def flatten_inputs(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> tuple[list[Leaf], dict[str, Any]]:
    """Leaves of positional then keyword inputs, and the structure that rebuilds the call.

    The structure is ``{"args": [node], "kwargs": {name: node}, "tuples": [key]}``: a
    node is a leaf's key, a list of nodes or a dict of nodes; ``tuples`` names the
    containers that were tuples, so a rebuilt call passes the same types
    (:func:`.tree.to_structure`, read back by :func:`.tree.from_structure`).
    """
    return call_structure(args, kwargs)


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
