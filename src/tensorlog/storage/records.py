"""What capture hands to the writer: one :class:`CallRecord` per logged call, built in the hooks.

Each logged value is a frozen :class:`TensorPlan`, made by the hook, and the :class:`TensorOutcome` it
carries, filled in by the writer threads and the finisher.

These are in-memory work items, not the on-disk records: the writer turns them
into files and into the step's :class:`~tensorlog.schema.records.StepIndex`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .arena import Chunk
from .stats import Stats

__all__ = ["TensorPlan", "TensorOutcome", "CallRecord", "WriteJob", "ChunkJob", "StepEnd"]


@dataclass(slots=True, eq=False)
class TensorOutcome:
    """What becomes of a planned tensor: filled in after planning, each field by the one thread named beside it."""

    stats: Stats | None = None
    """Given at planning (a weight unchanged since an earlier step, a compiled graph's measurement), else the
    finisher's: from the step's read-back (``stats_row``) or, for a repeat, its first snapshot's."""
    stats_row: int | None = None
    """The hook's (its copy phase): this tensor's row in the step's device-side statistics."""
    packed_at: tuple[int, int] | None = None
    """The hook's (its copy phase), ``layout: packed``: where its bytes lie in the step's data stream (start, end)."""
    host_copy: torch.Tensor | None = None
    """The private host copy made by the hook's copy phase; from the hand-off on, the writer thread's that writes
    the call part or, when no writer thread is needed, the finisher's; whoever uses it drops it."""
    values: Any = None
    """Whoever holds ``host_copy`` (or the finisher, for a repeat): the values of a small tensor."""
    checksum: str | None = None
    """As ``values``: the digest of its bytes (``md5`` mode)."""
    written: str | None = None
    """Where the data went, relative to the step directory: the writer thread's (a file), or the finisher's
    (a hard link, a packed entry)."""


@dataclass(frozen=True, slots=True, eq=False)
class TensorPlan:
    """One value of a call as its hook planned it, from metadata alone: made by the recorder, never changed.

    The data to copy is not here: the hook holds the live tensor only until its copy phase, which leaves a
    private host copy in :attr:`TensorOutcome.host_copy`.
    """

    name: str
    """Pairing name: the tensor file's name without extension (``inputs_0_cpu``), also without a file."""
    kind: str
    key: str | None
    path: tuple[str, ...]
    stem: str
    result: TensorOutcome
    """What the writer threads and the finisher make of it (the plan's only mutable part)."""
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
    pack: bool = False
    """``layout: packed``: its bytes go into the step's data stream (where: :attr:`TensorOutcome.packed_at`)."""
    want_values: bool = False
    want_checksum: bool = False
    same_as: TensorPlan | None = None
    """An earlier snapshot of the same, unchanged tensor in this step: its file is linked, its statistics shared."""
    sidecar: dict[str, Any] | None = None
    graph: bool = False
    """Measured by a compiled graph (a native tap): its statistics are given, its data is the graph's staged view."""


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
    tensors: list[TensorPlan] = field(default_factory=list)
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
    snaps: list[TensorPlan]
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
