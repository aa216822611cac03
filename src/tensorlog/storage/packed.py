"""``layout: "packed"``: every tensor of a step and rank in one safetensors file.

Tensors are appended as they arrive through a page-aligned staging buffer and
written with ``O_DIRECT`` in whole aligned blocks where the file system
allows it; the header (safetensors puts it first) is written last, into a
region reserved at the start and padded with spaces, as the format permits.
One file per step instead of one per tensor: the file-creation cost that
dominates small tensors is paid once.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from pathlib import Path

import torch

from ..schema import names
from .tensorfile import st_dtype_name

__all__ = ["PackedFile"]

_ALIGN = 4096
_STAGE = 16 << 20


class PackedFile:
    """One step's packed file, appended to by any writer thread; :meth:`close` writes its header."""

    def __init__(self, path: Path, header_bytes: int) -> None:
        self.path = path
        self.tmp = path.with_name(names.temp_name(path.name, os.getpid(), threading.get_native_id()))
        self.header_room = _round_up(8 + max(header_bytes, 4096), _ALIGN) - 8
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, object]] = {}
        self._size = 0  # bytes of tensor data appended
        self._direct = True
        try:
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o644)
        except (OSError, AttributeError):
            self._direct = False
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._mm = mmap.mmap(-1, _STAGE)
        self._stage = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._fill = 0  # bytes staged, starting at file offset self._flushed
        self._flushed = 8 + self.header_room

    @property
    def bytes_written(self) -> int:
        return self._size

    def append(self, key: str, t: torch.Tensor) -> None:
        """Add ``t`` (a contiguous CPU tensor) under ``key``."""
        n = t.numel() * t.element_size()
        data = t.reshape(-1).view(torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        with self._lock:
            self._entries[key] = {
                "dtype": st_dtype_name(t.dtype),
                "shape": list(t.shape),
                "data_offsets": [self._size, self._size + n],
            }
            self._size += n
            pos = 0
            while pos < n:
                k = min(n - pos, _STAGE - self._fill)
                self._stage[self._fill : self._fill + k].copy_(data[pos : pos + k])
                self._fill += k
                pos += k
                if self._fill == _STAGE:
                    self._drain(_STAGE)

    def _drain(self, nbytes: int) -> None:
        view = memoryview(self._mm)[:nbytes]
        try:
            _pwrite_all(self._fd, view, self._flushed)
        except OSError as e:
            if not self._direct or e.errno != 22:  # EINVAL: O_DIRECT taken at open, refused at write
                raise
            os.close(self._fd)
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CLOEXEC)
            self._direct = False
            _pwrite_all(self._fd, view, self._flushed)
        self._flushed += nbytes
        rest = self._fill - nbytes
        if rest:
            self._mm.move(0, nbytes, rest)
        self._fill = rest

    def close(self) -> int:
        """Write the rest and the header, and give the file its name; returns the file's size."""
        with self._lock:
            try:
                aligned = self._fill // _ALIGN * _ALIGN
                if aligned:
                    self._drain(aligned)
                if self._direct:
                    os.close(self._fd)
                    self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CLOEXEC)
                    self._direct = False
                if self._fill:
                    _pwrite_all(self._fd, memoryview(self._mm)[: self._fill], self._flushed)
                    self._flushed += self._fill
                    self._fill = 0
                header = json.dumps(self._entries, separators=(",", ":")).encode()
                if len(header) > self.header_room:
                    self._grow_header(len(header))
                _pwrite_all(self._fd, memoryview(struct.pack("<Q", self.header_room) + header.ljust(self.header_room)), 0)
                end = 8 + self.header_room + self._size
                os.ftruncate(self._fd, end)
            finally:
                os.close(self._fd)
                self._mm.close()
            os.replace(self.tmp, self.path)
            return end

    def abort(self) -> None:
        with self._lock:
            try:
                os.close(self._fd)
            except OSError:
                pass
            try:
                os.unlink(self.tmp)
            except OSError:
                pass

    def _grow_header(self, need: int) -> None:
        """The header outgrew its room (rare: the room is sized from the previous step): move the data up."""
        room = _round_up(8 + need + 4096, _ALIGN) - 8
        shift = room - self.header_room
        fd = os.open(self.tmp, os.O_RDWR | os.O_CLOEXEC)
        try:
            start = 8 + self.header_room
            end = start + self._size
            chunk = 8 << 20
            pos = end
            while pos > start:  # back to front, so nothing is overwritten before it is moved
                lo = max(start, pos - chunk)
                buf = os.pread(fd, pos - lo, lo)
                _pwrite_all(fd, memoryview(buf), lo + shift)
                pos = lo
        finally:
            os.close(fd)
        self.header_room = room


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k
