"""What a writer thread does with one job: a call part's files, or a chunk of a step's packed file.

:class:`RunFiles` owns everything the writer threads share about the files
themselves (the directories already made, the open packed files, the bytes
written against ``max_total_bytes``), behind one lock of its own; the
queue and the threads are the :class:`~tensorlog.storage.writer.Writer`'s.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence
from pathlib import Path

from ..schema import names
from ..schema import vllm_json as ref
from .atomic import Chunk, make_dir, write_atomic
from .finisher import derive
from .packed import PackedFile
from .records import ChunkJob, WriteJob
from .tensorfile import encode_pt, encode_safetensors

__all__ = ["RunFiles", "BudgetReached", "describe_fault"]


class BudgetReached(Exception):
    """``max_total_bytes`` would be passed: logging stops, cleanly."""


def describe_fault(e: BaseException) -> str:
    if isinstance(e, BudgetReached):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"disk full or file too large: {e}"
    return f"{type(e).__name__}: {e}"


class RunFiles:
    def __init__(self, run_dir: Path, *, rank: int | None, layout: str, fmt: str, max_total_bytes: int | None) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.layout = layout
        self.fmt = fmt
        self.max_total_bytes = max_total_bytes
        self._lock = threading.Lock()
        self._bytes = 0
        self._made: dict[int, set[str]] = {}
        """Call directories already made, per step (until the step is finished)."""
        self._packed: dict[int, PackedFile] = {}
        self._header_hint = 64 << 10
        """Room for the packed header, from the largest so far: it rarely has to be moved."""

    @property
    def bytes_written(self) -> int:
        return self._bytes

    def account(self, nbytes: int) -> None:
        """Count ``nbytes`` about to be written; BudgetReached if that would pass ``max_total_bytes``."""
        with self._lock:
            if self.max_total_bytes is not None and self._bytes + nbytes > self.max_total_bytes:
                raise BudgetReached(f"max_total_bytes reached ({self._bytes} of {self.max_total_bytes} bytes written)")
            self._bytes += nbytes

    def write_call(self, job: WriteJob) -> None:
        """A call part: what is taken from its copies, and in the reference layout its files."""
        rec = job.record
        if job.ready is not None:
            job.ready.synchronize()
        for s in job.snaps:
            derive(s)
        if self.layout != "reference":  # statistics: nothing but the index; packed: the data went with the chunks
            return
        d = self.run_dir / names.step_dir(rec.step) / rec.dirname
        self._make_call_dir(rec.step, rec.dirname, d)
        for s in job.snaps:
            if s.sidecar is not None:
                self._write(d / names.sidecar_file(s.stem, self.rank), [ref.dumps(s.sidecar)])
            data = s.result.host_copy
            if data is not None and s.file is not None and s.same_as is None:
                chunks = encode_safetensors(data) if self.fmt == "safetensors" else encode_pt(data)
                self._write(d / s.file, chunks)
                s.result.written = f"{rec.dirname}/{s.file}"
        for kind, doc in job.docs.items():
            self._write(d / names.ref_meta_file(kind, self.rank), [ref.dumps(doc)])

    def write_chunk(self, job: ChunkJob) -> None:
        for ev in job.chunk.ready:
            ev.synchronize()  # type: ignore[attr-defined]
        self.account(job.chunk.used)
        self._packed_file(job.step).write_chunk(job.chunk)

    def take_packed(self, step: int) -> PackedFile | None:
        """The step's packed file, handed to the finishing thread (its chunks are all written)."""
        with self._lock:
            self._made.pop(step, None)
            return self._packed.pop(step, None)

    def packed_closed(self, f: PackedFile) -> None:
        with self._lock:
            self._header_hint = max(self._header_hint, f.header_room)

    def abort_packed(self) -> None:
        """Logging ended with steps unfinished: their packed files never get a name."""
        with self._lock:
            files, self._packed = list(self._packed.values()), {}
        for f in files:
            f.abort()

    def _write(self, path: Path, chunks: Sequence[Chunk]) -> None:
        self.account(sum(len(c) for c in chunks))
        write_atomic(path, chunks)

    def _make_call_dir(self, step: int, dirname: str, d: Path) -> None:
        """A call's parts share a directory: one ``mkdir``, not one each."""
        with self._lock:
            made = self._made.setdefault(step, set())
            if dirname in made:
                return
        make_dir(d)  # both parts may get here at once; make_dir lets the second one through
        with self._lock:
            made.add(dirname)

    def _packed_file(self, step: int) -> PackedFile:
        with self._lock:
            f = self._packed.get(step)
            if f is None:
                d = self.run_dir / names.step_dir(step)
                make_dir(d)
                f = self._packed[step] = PackedFile(d / names.packed_file(self.rank), self._header_hint)
            return f
