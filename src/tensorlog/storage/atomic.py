"""Whole-or-nothing file writes: a temporary name unique to the process and thread, then a rename.

A crash (kill -9, power loss of the process) never leaves a half-written file
under a real name; what it can leave is a temporary file, which readers never
read and :func:`sweep_temps` removes, on the writer's own host, once its process is gone. Big payloads go
through ``O_DIRECT`` where the file system allows it: buffered writes of new
files run at a fraction of the disk's speed on many VMs.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from ..schema import names

__all__ = ["write_atomic", "write_in_place", "link_atomic", "make_dir", "sweep_temps", "DIRECT_MIN_BYTES", "Chunk"]

Chunk = bytes | bytearray | memoryview
DIRECT_MIN_BYTES = 8 << 20
_ALIGN = 4096
_BOUNCE = 4 << 20
_local = threading.local()


_HOST = names.host_tag(socket.gethostname())


def _tmp(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, names.temp_name(name, os.getpid(), threading.get_native_id(), _HOST))


def write_atomic(path: str | Path, chunks: Sequence[Chunk]) -> int:
    """Write ``chunks`` to ``path`` as one file that appears only when whole; returns the bytes written."""
    path = os.fspath(path)
    tmp = _tmp(path)
    views = [memoryview(c).cast("B") for c in chunks]
    total = sum(len(v) for v in views)
    try:
        if not (total >= DIRECT_MIN_BYTES and hasattr(os, "O_DIRECT") and _write_direct(tmp, views, total)):
            _write_buffered(tmp, views)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return total


def make_dir(d: Path) -> None:
    """``mkdir -p`` at the cost of one ``mkdir`` when the parent exists (almost always)."""
    try:
        os.mkdir(d)
    except FileExistsError:
        pass
    except FileNotFoundError:
        d.mkdir(parents=True, exist_ok=True)


def _write_buffered(path: str, views: list[memoryview]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pending = [v for v in views if len(v)]
        while pending:
            n = os.writev(fd, pending[:512])
            while n and pending:
                if n >= len(pending[0]):
                    n -= len(pending[0])
                    pending.pop(0)
                else:
                    pending[0] = pending[0][n:]
                    n = 0
    finally:
        os.close(fd)


def _bounce() -> tuple[mmap.mmap, torch.Tensor]:
    """A page-aligned staging buffer, one per thread, reused: O_DIRECT needs aligned memory."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        mm = mmap.mmap(-1, _BOUNCE)
        buf = _local.buf = (mm, torch.frombuffer(mm, dtype=torch.uint8))
    return buf  # type: ignore[no-any-return]


def _write_direct(path: str, views: list[memoryview], total: int) -> bool:
    """Stream ``views`` through the aligned buffer with O_DIRECT; the unaligned tail is appended normally.

    Large pieces are copied with torch (which lets go of the GIL), so the model's
    thread keeps running while a big tensor is staged. False where O_DIRECT is refused.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    mm, stage = _bounce()
    fill = 0
    written = 0
    try:
        for v in views:
            pos = 0
            while pos < len(v):
                n = min(len(v) - pos, _BOUNCE - fill)
                if n >= 1 << 16:
                    stage[fill : fill + n].copy_(torch.frombuffer(v[pos : pos + n], dtype=torch.uint8))
                else:
                    mm[fill : fill + n] = v[pos : pos + n]
                fill += n
                pos += n
                if fill == _BOUNCE:
                    _write_all(fd, memoryview(mm)[:fill])
                    written += fill
                    fill = 0
        aligned = fill // _ALIGN * _ALIGN
        if aligned:
            _write_all(fd, memoryview(mm)[:aligned])
            written += aligned
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EINVAL:  # the file system takes O_DIRECT at open but not at write
            _unlink_quietly(path)
            return False
        raise
    os.close(fd)
    if fill > aligned:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            _write_all(fd, memoryview(mm)[aligned:fill])
        finally:
            os.close(fd)
    return True


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def write_in_place(path: str | Path, data: bytes) -> None:
    """Overwrite an existing file without allocating a new one: the last resort when the disk is full.

    ``data`` is padded with spaces (valid JSON whitespace) to the file's size; a
    longer ``data`` is written whole (the file grows, which may fail).
    """
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        os.pwrite(fd, data + b" " * max(0, size - len(data)), 0)
    finally:
        os.close(fd)


def link_atomic(src: str | Path, dst: str | Path) -> None:
    """``dst`` becomes another name of the finished file ``src`` (a hard link appears whole)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        tmp = _tmp(os.fspath(dst))
        os.link(src, tmp)
        os.replace(tmp, dst)


def sweep_temps(directory: str | Path, *, recursive: bool = True) -> list[str]:
    """Remove temporary files that a writer of this host left when it died; returns what was removed.

    Only a writer calls this, on the run it claims. A temporary name carries its writer's host and pid:
    another host's files (a shared file system) and a live process's are left alone.
    """
    removed: list[str] = []
    stack = [os.fspath(directory)]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if recursive:
                    stack.append(e.path)
            elif (owner := names.temp_owner(e.name)) is not None and owner[1] == _HOST and not _alive(owner[0]):
                try:
                    os.unlink(e.path)
                    removed.append(e.path)
                except OSError:
                    pass
    return removed


def _alive(pid: int | None) -> bool:
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
