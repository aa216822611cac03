"""A run as columns: one row per tensor per call, for Parquet (``parquet_window``, ``tensorlog export --parquet``).

A long statistics run is millions of small records; as Parquet they are a few
files that DuckDB, pandas or Spark query directly. Rows are built from a step
index's documents (the dicts of :class:`~.records.StepIndex`), whether the
writer has just made them or a reader has read them back, so a live run and an
export give the same rows. This module holds only names and plain Python; the
Arrow schema is built on demand, so nothing here imports pyarrow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .records import STAT_KEYS

__all__ = ["COLUMNS", "PARQUET_DIR", "parquet_file", "Columns", "arrow_schema"]

PARQUET_DIR = "parquet"
"""Inside the run directory: ``<run>/parquet/stats[.rank<R>].steps<first>-<last>.parquet``."""

COLUMNS: dict[str, str] = {
    "step": "int64",
    "rank": "int32",
    "module": "string",
    "dirname": "string",
    "class_name": "string",
    "call_index": "int32",
    "seq_start": "int64",
    "seq_end": "int64",
    "kind": "string",
    "name": "string",
    "key": "string",
    "dtype": "string",
    "shape": "list<int64>",
    "numel": "int64",
    **{k: "float64" for k in STAT_KEYS if not k.endswith("_count")},
    "nan_count": "int64",
    "inf_count": "int64",
    "checksum": "string",
    "checksum_algorithm": "string",
    "request_ids": "list<string>",
}
"""Column name -> Arrow type. ``rank`` is null in a single-process run; statistics are null where none were taken."""


def parquet_file(rank: int | None, first: int, last: int) -> str:
    """Zero-padded steps, so that the files sort in step order."""
    infix = f".rank{rank}" if rank is not None else ""
    return f"stats{infix}.steps{first:09d}-{last:09d}.parquet"


class Columns:
    """Rows added step by step, kept column by column (what Arrow wants)."""

    def __init__(self) -> None:
        self.data: dict[str, list[Any]] = {name: [] for name in COLUMNS}

    def __len__(self) -> int:
        return len(self.data["step"])

    def add_step(self, step: int, rank: int | None, calls: Iterable[Mapping[str, Any]], info: Mapping[str, Any] | None) -> None:
        """One step's calls, as a step index's ``calls`` (dicts with ``tensors``); values (non-tensors) are skipped."""
        req_ids = list((info or {}).get("req_ids") or []) or None
        d = self.data
        for call in calls:
            for t in call.get("tensors", ()):
                if t.get("tensor", True) is False:
                    continue
                stats = t.get("stats") or {}
                checksum = t.get("checksum") or {}
                d["step"].append(step)
                d["rank"].append(rank)
                d["module"].append(call["module"])
                d["dirname"].append(call["dirname"])
                d["class_name"].append(call.get("class_name") or None)
                d["call_index"].append(call.get("call_index", 0))
                d["seq_start"].append(call.get("seq_start"))
                d["seq_end"].append(call.get("seq_end"))
                d["kind"].append(t["kind"])
                d["name"].append(t["name"])
                d["key"].append(t.get("key"))
                d["dtype"].append(t.get("dtype"))
                d["shape"].append(t.get("shape"))
                d["numel"].append(t.get("numel"))
                for k in STAT_KEYS:
                    d[k].append(stats.get(k))
                d["checksum"].append(checksum.get("digest"))
                d["checksum_algorithm"].append(checksum.get("algorithm"))
                d["request_ids"].append(req_ids)

    def clear(self) -> None:
        for v in self.data.values():
            v.clear()


def arrow_schema() -> Any:
    """The columns as a ``pyarrow.Schema`` (imports pyarrow)."""
    import pyarrow as pa

    types = {
        "int64": pa.int64(),
        "int32": pa.int32(),
        "string": pa.string(),
        "float64": pa.float64(),
        "list<int64>": pa.list_(pa.int64()),
        "list<string>": pa.list_(pa.string()),
    }
    return pa.schema([(name, types[t]) for name, t in COLUMNS.items()])
