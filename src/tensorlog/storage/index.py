"""A finished step's records as the bytes of its ``tensorlog_index.json``.

The document is the one :class:`~tensorlog.schema.records.StepIndex` defines,
built as plain dicts and serialised in one call by pydantic-core's encoder
(four times as fast as ``json``'s): building a pydantic model per tensor costs
more than the forward of a small model. Only
fields that differ from their defaults are written; the reader validates the
file against the model, which fills in the rest. ``test_index_matches_schema``
holds the two together.
"""

from __future__ import annotations

from typing import Any

import pydantic_core
import torch

from ..schema.records import INDEX_FORMAT, INDEX_VERSION
from . import stats as _stats
from .records import CallRecord, StepEnd, TensorPlan

__all__ = ["index_bytes", "index_doc", "index_json", "origin"]

_DTYPES: dict[torch.dtype, str] = {}


def origin(s: TensorPlan) -> TensorPlan:
    """The first snapshot of a tensor that was logged again unchanged (``s`` itself when it is new)."""
    while s.same_as is not None:
        s = s.same_as
    return s


def index_bytes(end: StepEnd, *, rank: int | None, layout: str, packed: str | None) -> bytes:
    return index_json(index_doc(end, rank=rank, layout=layout, packed=packed))


def index_json(doc: dict[str, Any]) -> bytes:
    return pydantic_core.to_json(doc, inf_nan_mode="constants")


def index_doc(end: StepEnd, *, rank: int | None, layout: str, packed: str | None) -> dict[str, Any]:
    """The step index as plain dicts (what Parquet rows are made from too)."""
    doc: dict[str, Any] = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "step": end.step, "layout": layout}
    if rank is not None:
        doc["rank"] = rank
    if not end.complete:
        doc["complete"] = False
        doc["incomplete_reason"] = end.incomplete_reason
    doc["calls"] = [_call(rec, packed) for rec in end.calls]
    if end.info:
        doc["info"] = end.info
    if end.dropped:
        doc["dropped"] = end.dropped
    return doc


def _call(rec: CallRecord, packed: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "module": rec.module,
        "dirname": rec.dirname,
        "class_name": rec.cls,
        "call_index": rec.call_index,
        "seq_start": rec.seq_start,
        "seq_end": rec.seq_end,
        "tensors": [_tensor(s, packed) for s in rec.tensors],
    }
    if rec.backward:
        d["backward"] = True
    if rec.structure is not None:
        d["structure"] = rec.structure
    if rec.grafted:
        d["grafted"] = True
    return d


def _tensor(s: TensorPlan, packed: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {"name": s.name, "kind": s.kind}
    if s.key is not None:
        d["key"] = s.key
    if s.path:
        d["path"] = list(s.path)
    if not s.tensor:
        d["tensor"] = False
        d["value"] = s.value
        return d
    if s.shape is not None:
        d["shape"] = list(s.shape)
    if s.dtype is not None:
        name = _DTYPES.get(s.dtype)
        if name is None:
            name = _DTYPES[s.dtype] = str(s.dtype)
        d["dtype"] = name
    d["device"] = s.device
    if s.stride is not None:
        d["stride"] = list(s.stride)
    d["numel"] = s.numel
    r = s.result
    if r.stats is not None:
        d["stats"] = r.stats.published()
    if r.values is not None:
        d["values"] = r.values
    if r.checksum is not None:
        d["checksum"] = {"algorithm": _stats.CHECKSUM_ALGORITHM, "digest": r.checksum}
    if s.skipped is not None:
        d["skipped"] = s.skipped
    if s.parameter:
        d["parameter"] = True
    first = origin(s).result
    if packed is not None and first.written is not None:
        d["packed"] = {"file": packed, "key": first.written}
    elif r.written is not None:
        d["file"] = r.written
    return d
