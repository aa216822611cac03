"""What capture hands to the writer: one :class:`CallRecord` per logged call, built in the hooks.

These are in-memory work items, not the on-disk records: the writer turns them
into files and into the step's :class:`~tensorlog.schema.records.StepIndex`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .arena import Chunk
from .stats import Stats

__all__ = ["TensorSnap", "CallRecord", "WriteJob", "ChunkJob", "StepEnd"]


@dataclass(slots=True, eq=False)
class TensorSnap:
    """One value of a call: its metadata, taken in the hook, and its data (a private host copy) or not."""

    name: str
    """Pairing name: the tensor file's name without extension (``inputs_0_cpu``), also without a file."""
    kind: str
    key: str | None
    path: tuple[str, ...]
    stem: str
    tensor: bool = True
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    """As torch gives them (made strings once, by the writer): the hook does no formatting."""
    device: str | None = None
    stride: tuple[int, ...] | None = None
    numel: int | None = None
    parameter: bool = False
    value: dict[str, Any] | None = None
    skipped: str | None = None
    file: str | None = None
    """The file to write, in the call's directory (or, packed, the key)."""
    host: torch.Tensor | None = None
    stats_row: int | None = None
    """Row of this tensor's statistics in the step's device-side statistics (computed in the hook)."""
    want_values: bool = False
    want_checksum: bool = False
    same_as: TensorSnap | None = None
    """An earlier snapshot of the same, unchanged tensor in this step: its file is linked, its statistics shared."""
    sidecar: dict[str, Any] | None = None
    packed_at: tuple[int, int] | None = None
    """``layout: packed``: where its bytes lie in the step's data stream (start, end)."""
    graph: bool = False
    """Measured by a compiled graph (a native tap): its statistics are given, ``host`` is the staged data."""
    # filled in by the writer
    stats: Stats | None = None
    values: Any = None
    checksum: str | None = None
    written: str | None = None
    """Where the data went, relative to the step directory."""


@dataclass(slots=True, eq=False)
class CallRecord:
    step: int
    module: str
    dirname: str
    cls: str
    call_index: int
    seq_start: int
    seq_end: int | None = None
    backward: bool = False
    tensors: list[TensorSnap] = field(default_factory=list)
    structure: dict[str, Any] | None = None
    grafted: bool = False
    dropped: str | None = None
    """What back-pressure dropped of this call (``outputs``), when ``on_backpressure`` is ``drop``."""


@dataclass(slots=True, eq=False)
class ChunkJob:
    """A full staging chunk of a step's packed data, to write at its place in the step's file."""

    step: int
    chunk: Chunk


@dataclass(slots=True, eq=False)
class WriteJob:
    """One part of a call to write: its inputs (submitted when the call starts) or its outputs (when it ends).

    Writing the inputs while the module still runs means an open call holds no
    reserved memory, so a nested call never waits for its parent's bytes.
    """

    record: CallRecord
    snaps: list[TensorSnap]
    docs: dict[str, Any]
    nbytes: int = 0
    """Bytes of host copies reserved against ``max_pending_bytes``; given back once written."""
    ready: Any = None
    """A CUDA event that the non-blocking copies of this part are done."""

    @property
    def step(self) -> int:
        return self.record.step

    @property
    def needs_worker(self) -> bool:
        """Files to write or reserved copies to free; otherwise the step's finisher takes it, with no
        thread woken in the middle of the forward."""
        return bool(self.nbytes or self.docs or any(s.file is not None and s.same_as is None for s in self.snaps))


@dataclass(slots=True, eq=False)
class StepEnd:
    """The end of a step: what the writer needs to finish it after its calls."""

    step: int
    order: list[str]
    """Directory names of the logged calls, in the order they started."""
    calls: list[CallRecord]
    stats: tuple[list[int], list[tuple[list[int], torch.Tensor]]] | None = None
    """Statistics computed on device during the step, copied to the host in one go: the number of
    partial values of each row, and per device the rows it holds and their values (flat, on the host)."""
    ready: list[Any] = field(default_factory=list)
    """CUDA events to wait for before reading ``stats`` and any copy no writer thread waited for."""
    info: dict[str, Any] | None = None
    complete: bool = True
    incomplete_reason: str | None = None
    dropped: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    """Fields of ``run.json`` that capture learned in this step (what a compiled graph let it see)."""
    progress: dict[str, Any] | None = None
    """Fields of ``run.json`` that only count (steps replayed): written with the next scheduled rewrite."""
