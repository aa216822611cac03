"""What every reader returns: a :class:`Run` of steps, of module calls, of tensors loaded on demand.

The same objects come from tensorlog's layouts, a reference (vLLM) dump, a
Pass dump and an msProbe dump, so compare, inspect and replay never ask which
tool wrote a run. A tensor's metadata is a typed
:class:`~tensorlog.schema.records.TensorEntry`; where its data comes from is a
typed :class:`Source`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import AlignmentError, DependencyError, RunReadError
from ..schema.columns import Columns
from ..schema.records import RankEntry, RunManifest, StepInfo, TensorEntry
from ..storage.parquet import arrow_table
from ..storage.stats import host_stats

if TYPE_CHECKING:
    import pandas

__all__ = [
    "Source",
    "FileSource",
    "PackedSource",
    "MemorySource",
    "DerivedSource",
    "TensorRecord",
    "ModuleCall",
    "Step",
    "Run",
    "dtype_of",
    "unique_dirnames",
    "rank_entry",
    "listed_ranks",
    "call_doc",
    "step_docs",
    "require_pandas",
]


class Source:
    """Where a tensor's data is; :meth:`load` reads it (memory-mapped where the format allows)."""

    def load(self) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class FileSource(Source):
    path: Path

    def load(self) -> torch.Tensor:
        from ..storage.tensorfile import load_tensor_file

        return load_tensor_file(self.path)


@dataclass(frozen=True)
class PackedSource(Source):
    """A tensor inside a step's packed safetensors file."""

    path: Path
    key: str
    header: dict[str, Any] = field(compare=False, repr=False)
    data_start: int = 0

    def load(self) -> torch.Tensor:
        from ..storage.tensorfile import read_safetensors_entry

        return read_safetensors_entry(self.path, self.key, self.header, self.data_start)


@dataclass(frozen=True)
class MemorySource(Source):
    """A tensor already read, with the rest of its file (a Pass dump holds a step's tensors in one file)."""

    tensor: torch.Tensor = field(repr=False)

    def load(self) -> torch.Tensor:
        return self.tensor


@dataclass(frozen=True)
class DerivedSource(Source):
    """A tensor made from others when two runs are aligned (split, summed, merged across ranks, gathered)."""

    make: Callable[[], torch.Tensor] = field(repr=False)
    notes: list[str] = field(default_factory=list, compare=False)
    """What the alignment found while making it (how ranks were merged; ranks that disagree)."""
    faults: list[str] = field(default_factory=list, compare=False)
    """What it found that makes the pair a mismatch whatever the values compared (ranks whose copies disagree)."""

    def load(self) -> torch.Tensor:
        return self.make()


@dataclass(frozen=True)
class TensorRecord:
    """One logged value of a module call. ``name`` pairs it across runs (``inputs_0_cuda_0``, ``outputs_cpu``)."""

    entry: TensorEntry
    source: Source | None = None
    mapping: str | None = None
    """The alignment rules that produced it (``split qkv_proj -> part 0``; ``2 ranks: replicated``)."""
    error: str | None = None
    """Why its data cannot be read, found while reading the run (a refused or missing file)."""

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def key(self) -> str | None:
        return self.entry.key

    @property
    def is_tensor(self) -> bool:
        return self.entry.tensor

    @property
    def shape(self) -> tuple[int, ...] | None:
        return tuple(self.entry.shape) if self.entry.shape is not None else None

    @property
    def dtype(self) -> str | None:
        return self.entry.dtype

    @functools.cached_property
    def stats(self) -> dict[str, Any] | None:
        """As captured, or, where capture kept the data instead (tensor mode on CPU), taken from it now."""
        if self.entry.stats is not None:
            return self.entry.stats.model_dump()
        if self.source is None or self.error is not None:
            return None
        try:
            row = host_stats(self.load())
        except (RunReadError, AlignmentError):
            return None
        return row.published() if row is not None else None

    @property
    def checksum(self) -> str | None:
        return self.entry.checksum.digest if self.entry.checksum is not None else None

    @property
    def checksum_algorithm(self) -> str | None:
        return self.entry.checksum.algorithm if self.entry.checksum is not None else None

    @property
    def has_data(self) -> bool:
        return self.source is not None or self.error is not None

    @property
    def nbytes(self) -> int:
        numel = self.entry.numel or 0
        try:
            return numel * dtype_of(self.dtype).itemsize
        except ValueError:
            return numel * 4

    def load(self) -> torch.Tensor:
        """The tensor's data.

        Raises:
            RunReadError: no data was kept (statistics only, over ``max_tensor_size``),
                or the file cannot be read safely.
        """
        if self.error is not None:
            raise RunReadError(self.error)
        if self.source is None:
            raise RunReadError(f"{self.name}: no tensor data was saved ({self.entry.skipped or 'statistics only'})")
        t = self.source.load()
        if isinstance(self.source, (FileSource, PackedSource)):
            _check_against_entry(t, self.entry, self.source)
        return t

    def with_(self, **changes: Any) -> TensorRecord:
        return replace(self, **changes)


def _check_against_entry(t: torch.Tensor, e: TensorEntry, where: Source) -> None:
    """A tensor file that contradicts its own description (index or structure json) is unreadable: which of the
    two is right cannot be known, and comparing either would be a verdict on a guess."""
    what = getattr(where, "path", where)
    if e.dtype is not None and str(t.dtype) != e.dtype:
        raise RunReadError(f"{what}: holds {t.dtype}, but its index says {e.dtype}")
    if e.shape is not None and list(t.shape) != list(e.shape):
        raise RunReadError(f"{what}: holds shape {list(t.shape)}, but its index says {list(e.shape)}")
    if e.values is None or t.numel() > 4096 or t.dtype.is_complex:
        return
    exact = torch.bool if t.dtype == torch.bool else (torch.float64 if t.is_floating_point() else torch.int64)
    try:
        recorded = torch.tensor(e.values, dtype=exact)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise RunReadError(f"{what}: its index's values are not numbers of its shape") from None
    actual = t.detach().to(exact)
    if exact != torch.float64:
        if recorded.shape != actual.shape or not torch.equal(recorded, actual):
            raise RunReadError(f"{what}: its values disagree with those its index records")
        return
    if recorded.shape != actual.shape or not torch.equal(recorded.isnan(), actual.isnan()):
        raise RunReadError(f"{what}: its values disagree with those its index records")
    both = ~actual.isnan()
    if not torch.equal(recorded[both], actual[both]):
        raise RunReadError(f"{what}: its values disagree with those its index records")


@dataclass
class ModuleCall:
    """One logged call of one module in one step (on one rank)."""

    step: int
    dirname: str
    module: str
    call_index: int = 0
    cls: str | None = None
    seq_start: int | None = None
    seq_end: int | None = None
    rank: int | None = None
    position: int = 0
    """Index in the step's start order."""
    inputs: list[TensorRecord] = field(default_factory=list)
    outputs: list[TensorRecord] = field(default_factory=list)
    post_fwd_inputs: list[TensorRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    structure: dict[str, Any] | None = None
    """How the inputs nest (for replay); see :class:`~tensorlog.schema.records.CallStructure`."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tensors(self) -> list[TensorRecord]:
        return self.inputs + self.outputs

    @property
    def key(self) -> tuple[int | None, str]:
        return (self.rank, self.dirname)


@dataclass
class Step:
    index: int
    calls: list[ModuleCall]
    """In the order the calls started (per rank)."""
    info: StepInfo | None = None
    complete: bool = True
    incomplete_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def by_completion(self) -> list[ModuleCall]:
        """Calls in the order they finished: children before their parents."""
        return sorted(self.calls, key=lambda c: (c.rank or 0, c.seq_end if c.seq_end is not None else 1 << 60, c.position))

    def call(self, dirname: str, rank: int | None = None) -> ModuleCall | None:
        for c in self.calls:
            if c.dirname == dirname and c.rank == rank:
                return c
        return None


@dataclass
class Run:
    """A run read from disk. ``steps`` maps step index to :class:`Step`."""

    path: Path
    manifest: RunManifest
    steps: dict[int, Step]
    layout: str = "tensorlog"
    problems: list[str] = field(default_factory=list)
    """Files that could not be read (each also marks what it belonged to); a run with problems
    compares with exit code 2."""
    parts: list[Path] = field(default_factory=list)
    """Directories the run was read from, when its ranks were spread over several."""
    modules: dict[str, str] | None = None
    """Every module of the model (name -> class) from ``modules.json``, when the run has one."""

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def incomplete_reason(self) -> str | None:
        return None if self.complete else (self.manifest.incomplete_reason or "not marked complete, and no reason given")

    @property
    def world_size(self) -> int:
        return int(self.manifest.world_size or 1)

    def calls(self) -> Iterator[ModuleCall]:
        for s in sorted(self.steps):
            yield from self.steps[s].calls

    def __repr__(self) -> str:
        n = sum(len(s.calls) for s in self.steps.values())
        return f"<tensorlog Run {self.path} ({self.layout}): {len(self.steps)} steps, {n} module calls>"

    def to_pandas(self) -> pandas.DataFrame:
        """One row per tensor per call: the rows, columns and types of ``tensorlog export RUN --parquet DIR``.

        The frame is the export's own ``pyarrow.Table`` (:data:`~tensorlog.schema.columns.COLUMNS`, in that
        order) converted with ``pandas.ArrowDtype``, so every column keeps its Parquet type, nulls included
        (``rank`` is null in a single-process run; statistics are null where none were taken or the data cannot
        be read): ``pandas.read_parquet(DIR, dtype_backend="pyarrow")`` of an export gives the same values.
        A tensor run's statistics are computed from its files, as the export does. Rows are in step order;
        within a step, by rank (in the order the ranks' calls appear), then in call start order. Non-tensor
        arguments have no row. The whole run is held in memory: for a run too long for that, export it and
        query the Parquet files.

        Raises:
            DependencyError: pandas or pyarrow is missing (``pip install 'tensorlog[pandas]'``).
        """
        pd = require_pandas(pyarrow=True)
        cols = Columns()
        problems: list[str] = []  # already in self.problems, or a null statistic in its row
        for index in sorted(self.steps):
            step = self.steps[index]
            info = step.info.model_dump() if step.info else None
            for rank, calls in step_docs(step, problems).items():
                cols.add_step(step.index, rank, calls, info)
        return arrow_table(cols).to_pandas(types_mapper=pd.ArrowDtype)


def require_pandas(*, pyarrow: bool = False) -> Any:
    """The ``pandas`` module, imported only when a frame is asked for: pandas is an optional dependency."""
    try:
        import pandas
    except ImportError:
        raise DependencyError("to_pandas needs pandas: pip install 'tensorlog[pandas]'") from None
    if pyarrow:
        try:
            import pyarrow as _  # noqa: F401
        except ImportError:
            raise DependencyError("Run.to_pandas needs pyarrow: pip install 'tensorlog[pandas]'") from None
    return pandas


def call_doc(c: ModuleCall, problems: list[str]) -> dict[str, Any]:
    """A call as a step index's document, statistics computed where only the data was kept: what the Parquet
    rows are built from (:class:`~tensorlog.schema.columns.Columns`). A tensor without statistics adds a problem."""
    tensors = []
    for rec in c.inputs + c.outputs + c.post_fwd_inputs:
        d = rec.entry.model_dump(include={"name", "kind", "key", "tensor", "shape", "dtype", "numel", "checksum"})
        d["stats"] = rec.stats if rec.is_tensor else None
        if rec.is_tensor and d["stats"] is None and rec.has_data:
            problems.append(f"step {c.step} {c.dirname} {rec.name}: no statistics ({rec.error or 'its data cannot be read'})")
        tensors.append(d)
    return {
        "module": c.module,
        "dirname": c.dirname,
        "class_name": c.cls,
        "call_index": c.call_index,
        "seq_start": c.seq_start,
        "seq_end": c.seq_end,
        "tensors": tensors,
    }


def step_docs(step: Step, problems: list[str]) -> dict[int | None, list[dict[str, Any]]]:
    """A step's calls as documents (:func:`call_doc`), by rank, ranks in the order their calls appear."""
    by_rank: dict[int | None, list[dict[str, Any]]] = {}
    for c in step.calls:
        by_rank.setdefault(c.rank, []).append(call_doc(c, problems))
    return by_rank


def rank_entry(m: RunManifest) -> RankEntry:
    """What a merged manifest's ``ranks`` keeps of one rank's ``run.json``."""
    return RankEntry(
        complete=m.complete,
        incomplete_reason=m.incomplete_reason,
        pid=m.pid,
        host=m.host,
        steps_written=m.steps_done(),
        node=m.node,
        removed_through=m.removed_through,
    )


def listed_ranks(m: RunManifest) -> dict[int, RankEntry]:
    """A merged manifest's ``ranks`` (rank -> :func:`rank_entry`), or none."""
    return m.ranks or {}


def unique_dirnames(calls: list[ModuleCall]) -> None:
    """Give calls whose names collide once made safe for a file system (``a/b`` and ``a_b``) distinct
    directory names, ``~<n>`` as capture does: otherwise one would silently hide the other in a compare."""
    taken: set[tuple[int | None, str]] = set()
    for c in calls:
        name, n = c.dirname, 0
        while (c.rank, name) in taken:
            n += 1
            name = f"{c.dirname}~{n}"
        taken.add((c.rank, name))
        c.dirname = name


def dtype_of(name: str | None) -> torch.dtype:
    if not name or not name.startswith("torch."):
        raise ValueError(name)
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(name)
    return dt
