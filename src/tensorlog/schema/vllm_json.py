"""The reference logger's json files, byte for byte: ``inputs.json``, ``outputs.json`` and the size sidecar.

The reference describes a value's *structure* (type, shape, dtype, numel),
never its contents, so two runs whose tensors match write identical files.
Two deliberate differences keep that promise: an object's default ``repr``
loses its memory address (``<Cache object>`` instead of ``<Cache object at
0x7f..>``), and nesting deeper than :data:`MAX_DEPTH` is cut (the reference
recurses until Python gives up).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import torch

from .leaves import MAX_DEPTH, unique_key

__all__ = ["describe", "dumps", "sidecar", "MAX_DEPTH", "BIG_CONTAINER"]

BIG_CONTAINER = 20
"""Containers longer than this are summarised (``length``, ``sample``, ``note``), as the reference does."""

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe(value: Any, depth: int = 0) -> Any:
    """The reference's json form of one value (``convert_intermediates_to_json``)."""
    if isinstance(value, torch.Tensor):
        try:
            return {"type": "tensor", "shape": list(value.shape), "dtype": str(value.dtype), "numel": value.numel()}
        except Exception as e:  # a tensor subclass whose metadata raises
            return {"type": "tensor_error", "error": str(e), "tensor_type": str(type(value))}
    if depth >= MAX_DEPTH and isinstance(value, (list, tuple, dict)):
        return {"type": type(value).__name__, "string_repr": "<nesting too deep>"}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        if len(value) > BIG_CONTAINER:
            # The reference's sample takes up to 100 items while its note says 20: both kept as written.
            return {
                "type": kind,
                "length": len(value),
                "sample": [describe(v, depth + 1) for v in value[:100]],
                "note": f"Showing only first {BIG_CONTAINER} of {len(value)} items",
            }
        return {"type": kind, "items": [describe(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        keys = _keys(value)
        if len(value) > BIG_CONTAINER:
            return {
                "type": "dict",
                "length": len(value),
                "keys": keys,
                "sample": {k: describe(v, depth + 1) for k, v in zip(keys[:BIG_CONTAINER], value.values())},
                "note": f"Showing only first {BIG_CONTAINER} of {len(value)} items",
            }
        return {"type": "dict", "items": {k: describe(v, depth + 1) for k, v in zip(keys, value.values())}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    given = getattr(value, "__tensorlog_reference__", None)
    if isinstance(given, dict):  # an argument a compiled graph did not keep (capture.compiled)
        return given
    try:
        text = str(value)
    except Exception as e:
        text = f"<str() raised {type(e).__name__}>"
    return {"type": type(value).__name__, "string_repr": _ADDRESS.sub("", text)}


def _key(k: Any) -> Any:
    return k if k is None or isinstance(k, (str, int, float, bool)) else str(k)


def _keys(d: dict[Any, Any]) -> list[Any]:
    """The json keys of ``d``; where json would write two alike (``0`` and ``"0"``), every key as its files name it.

    The reference writes such a key twice, and a reader keeps only the last value; here each entry
    describes the file it names (``0`` and ``0~1``, :func:`.leaves.unique_key`).
    """
    if all(isinstance(k, str) for k in d):
        return list(d)
    keys = [_key(k) for k in d]
    texts = [k if isinstance(k, str) else json.dumps(k) for k in keys]
    if len(set(texts)) == len(texts):
        return keys
    names: dict[str, None] = {}
    for k in d:
        names[unique_key(str(k), names)] = None
    return list(names)


@functools.lru_cache(maxsize=4096)
def _pretty(compact: str) -> bytes:
    return json.dumps(json.loads(compact), indent=2).encode()


def dumps(doc: Any) -> bytes:
    """Formatted as the reference writes it: ``json.dump(doc, f, indent=2)``.

    ``indent`` takes json's pure-Python encoder; a call's description is the
    same every step, so it is formatted once per distinct document.
    """
    return _pretty(json.dumps(doc))


def sidecar(t: torch.Tensor, limit: int) -> dict[str, Any]:
    """What the reference writes as ``<stem>.json`` in place of a tensor over ``max_tensor_size``."""
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype),
        "device": str(t.device),
        "numel": t.numel(),
        "skipped": f"Tensor size {t.numel()} exceeds max_tensor_size {limit}",
    }
