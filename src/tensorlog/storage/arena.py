"""Reused staging memory for the packed layout: hooks copy into it, writer threads write it out whole.

A step's packed data is one byte stream; chunk ``k`` of the stream holds bytes
``[k·C, (k+1)·C)`` of the file's data section, so a full chunk goes to disk in
one aligned ``O_DIRECT`` write with no copy in between, and a tensor may lie
across two chunks. Chunks are page-aligned (pinned, for CUDA copies that do not
block), allocated on first use and reused, so the model's thread pays one
``memcpy`` per tensor and no page faults.

Bounded by construction: at most ``limit`` bytes of chunks exist. A hook that
needs a chunk while all are in flight waits for a writer thread to give one
back (writer threads never wait for hooks), or, with ``drop``, gives up.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Arena", "Chunk", "CHUNK_BYTES", "ALIGN"]

CHUNK_BYTES = 4 << 20
ALIGN = 64
"""Each tensor starts on this boundary of the stream (and so of the file's data section)."""
_KEEP_FREE = 4
"""Free chunks kept for reuse beyond this many are given back to the system."""


@dataclass(eq=False)
class Chunk:
    data: torch.Tensor
    """``uint8``, page-aligned."""
    stream_start: int = 0
    """Where this chunk's first byte lies in its step's data stream."""
    used: int = 0
    refs: int = 0
    """Who still needs it: its own write (and, while it is being filled, the stream)."""
    ready: list[object] = field(default_factory=list)
    """CUDA events after the copies into it."""

    @property
    def size(self) -> int:
        return int(self.data.numel())


class Arena:
    """Chunks for one writer. :meth:`place` runs on the model's thread; :meth:`release` on any."""

    def __init__(self, limit: int, *, pinned: bool = False, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = max(1 << 16, min(chunk_bytes, _round_down(limit // 2, 1 << 16)))
        self.max_chunks = max(2, limit // self.chunk_bytes)
        self.pinned = pinned
        self._cv = threading.Condition()
        self._free: list[Chunk] = []
        self._closed = False
        self._count = 0
        self._current: Chunk | None = None
        self._stream = 0

    def begin_stream(self) -> None:
        """A new step: its data stream starts at 0 in a fresh chunk."""
        self._stream = 0

    def append(
        self,
        src: torch.Tensor,
        submit: Callable[[Chunk], None],
        *,
        wait: bool,
        stopped: Callable[[], bool],
        stream: object = None,
    ) -> int | None:
        """Copy ``src`` (flat ``uint8``, any device) to the end of the stream; returns its stream offset.

        Each chunk filled on the way is handed to ``submit`` once its copy is
        issued, so this never waits while holding a chunk that no writer will
        free. None: dropped (``wait`` false) or logging stopped; the bytes
        copied so far stay in the stream, unnamed (the header names the gap).
        """
        cur = self._current
        pad = -self._stream % ALIGN
        if pad and cur is not None:  # chunk sizes are multiples of ALIGN: the padding stays in this chunk
            cur.data[cur.used : cur.used + pad].zero_()
            cur.used += pad
            self._stream += pad
            if cur.used == cur.size:
                self._current = None
                _mark_ready(cur, stream)
                submit(cur)
        offset = self._stream
        n, pos, first = int(src.numel()), 0, True
        while pos < n or first:
            first = False
            cur = self._current
            if cur is None or cur.used == cur.size:
                cur = self._take(wait, stopped)
                if cur is None:
                    return None
                cur.stream_start = self._stream
                cur.refs = 1  # its own write
                self._current = cur
            k = min(n - pos, cur.size - cur.used)
            if k:
                _copy(cur.data[cur.used : cur.used + k], src[pos : pos + k], stream)
            cur.used += k
            self._stream += k
            pos += k
            if cur.used == cur.size:
                self._current = None
                _mark_ready(cur, stream)
                submit(cur)
        return offset

    def seal(self, stream: object = None) -> Chunk | None:
        """The step's last, partly filled chunk (to be written), if any."""
        cur, self._current = self._current, None
        if cur is not None:
            _mark_ready(cur, stream)
        return cur

    def release(self, chunk: Chunk) -> None:
        with self._cv:
            chunk.refs -= 1
            if chunk.refs > 0:
                return
            chunk.used = 0
            chunk.ready = []
            if self._closed:  # in flight when the arena closed: its memory goes now, not with the arena
                chunk.data = torch.empty(0, dtype=torch.uint8)
                self._count -= 1
            elif len(self._free) < _KEEP_FREE:
                self._free.append(chunk)
            else:  # dropped, not closed: a view of it may still be alive, and keeps the memory valid
                self._count -= 1
            self._cv.notify_all()

    def _take(self, wait: bool, stopped: Callable[[], bool]) -> Chunk | None:
        with self._cv:
            while not self._free and self._count >= self.max_chunks:
                if not wait or stopped():
                    return None
                self._cv.wait(0.5)
            if self._free:
                return self._free.pop()
            self._count += 1
        return self._new_chunk()

    def _new_chunk(self) -> Chunk:
        if self.pinned:
            return Chunk(torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True))
        mm = mmap.mmap(-1, self.chunk_bytes)
        return Chunk(torch.frombuffer(mm, dtype=torch.uint8))

    def close(self) -> None:
        """Give the reusable chunks back to the system; chunks still in flight go when their jobs do."""
        with self._cv:
            self._closed = True
            for c in self._free:
                c.data = torch.empty(0, dtype=torch.uint8)
            self._count -= len(self._free)
            self._free = []
            self._current = None

    def wake(self) -> None:
        """Logging stopped: a hook waiting for a chunk gives up."""
        with self._cv:
            self._cv.notify_all()


def _copy(dst: torch.Tensor, src: torch.Tensor, stream: object) -> None:
    if stream is None:
        dst.copy_(src)
        return
    with torch.cuda.stream(stream):  # type: ignore[arg-type]
        dst.copy_(src, non_blocking=True)


def _mark_ready(chunk: Chunk, stream: object) -> None:
    """An event after the copies into ``chunk``: the writer waits on it before writing the chunk out."""
    if stream is not None:
        ev = torch.cuda.Event()
        ev.record(stream)  # type: ignore[arg-type]
        chunk.ready.append(ev)


def _round_down(n: int, k: int) -> int:
    return max(k, n // k * k)
