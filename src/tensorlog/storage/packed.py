"""``layout: "packed"``: every tensor of a step and rank in one safetensors file.

The data section is the step's staging stream (:mod:`~tensorlog.storage.arena`):
each full chunk is written at its own offset by whichever writer thread takes
it, in one ``O_DIRECT`` write where the file system allows it, so chunks go to
disk in parallel and nothing is copied on the way. Safetensors puts its header
first; it is written last, into room reserved at the start (sized from the
previous step, and moved out of the way in the rare case it outgrows it),
padded with spaces as the format permits. Tensors start on 64-byte boundaries;
the gaps are named ``__pad_<offset>`` so the data stays fully indexed, as the
format requires. One file per step instead of one per tensor: the cost of
creating files, which dominates small tensors, is paid once.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

from .arena import Chunk
from .atomic import RunEscapeError, open_file, remove_file, replace_file, temp_path

__all__ = ["PackedFile", "PAD_PREFIX"]

PAD_PREFIX = "__pad_"
_PAGE = 4096


class PackedFile:
    """One step's packed file. :meth:`write_chunk` from any writer thread; :meth:`close` once, at the end."""

    def __init__(self, path: Path, header_bytes: int) -> None:
        self.path = path
        self.tmp = temp_path(path)
        self.header_room = _round_up(8 + max(header_bytes, _PAGE), _PAGE) - 8
        self._lock = threading.Lock()
        self._fd = open_file(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        self._direct: int | None = None
        try:
            self._direct = open_file(self.tmp, os.O_WRONLY | os.O_DIRECT)
        except RunEscapeError:
            raise
        except (OSError, AttributeError):  # no O_DIRECT here (tmpfs, other systems): buffered writes
            pass
        self._size = 0

    @property
    def data_start(self) -> int:
        return 8 + self.header_room

    def write_chunk(self, chunk: Chunk) -> int:
        """Write a chunk's bytes at their place in the data section; returns how many."""
        n = chunk.used
        view = memoryview(chunk.data.numpy())[:n]  # type: ignore[arg-type]
        off = self.data_start + chunk.stream_start
        aligned = n // _PAGE * _PAGE if self._direct is not None else 0
        if aligned:
            try:
                _pwrite_all(self._direct, view[:aligned], off)  # type: ignore[arg-type]
            except OSError as e:
                if e.errno != 22:  # EINVAL: O_DIRECT was taken at open but is refused for this write
                    raise
                aligned = 0
        _pwrite_all(self._fd, view[aligned:], off + aligned)
        with self._lock:
            self._size = max(self._size, chunk.stream_start + n)
        return n

    def close(self, entries: list[tuple[str, str, list[int], int, int]]) -> int:
        """Write the header for ``entries`` ``(key, dtype, shape, start, end)`` and give the file its name."""
        try:
            header = json.dumps(_header(entries, self._size), separators=(",", ":")).encode()
            if len(header) > self.header_room:
                self._grow_header(len(header))
            _pwrite_all(self._fd, memoryview(struct.pack("<Q", self.header_room) + header.ljust(self.header_room)), 0)
            end = self.data_start + self._size
            os.ftruncate(self._fd, end)
        finally:
            self._close_fds()
        replace_file(self.tmp, self.path)
        return end

    def abort(self) -> None:
        self._close_fds()
        try:
            remove_file(self.tmp)
        except OSError:
            pass

    def _close_fds(self) -> None:
        for fd in (self._fd, self._direct):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd, self._direct = -1, None

    def _grow_header(self, need: int) -> None:
        """The header outgrew its room (rare: the room is sized from the previous step): move the data up."""
        room = _round_up(8 + need + _PAGE, _PAGE) - 8
        shift = room - self.header_room
        start = self.data_start
        pos = start + self._size
        while pos > start:  # back to front, so nothing is overwritten before it is moved
            lo = max(start, pos - (8 << 20))
            _pwrite_all(self._fd, memoryview(os.pread(self._fd, pos - lo, lo)), lo + shift)
            pos = lo
        self.header_room = room


def _header(entries: list[tuple[str, str, list[int], int, int]], size: int) -> dict[str, Any]:
    """The safetensors header: each tensor, and a ``__pad_`` entry for every gap, so no byte is unindexed."""
    out: dict[str, Any] = {}
    pos = 0
    for key, dtype, shape, start, end in sorted(entries, key=lambda e: e[3]):
        if start > pos:
            out[f"{PAD_PREFIX}{pos}"] = {"dtype": "U8", "shape": [start - pos], "data_offsets": [pos, start]}
        out[key] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        pos = max(pos, end)
    if size > pos:
        out[f"{PAD_PREFIX}{pos}"] = {"dtype": "U8", "shape": [size - pos], "data_offsets": [pos, size]}
    return out


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k
