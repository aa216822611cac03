"""Whole-or-nothing file writes: a temporary name unique to the process and thread, then a rename.

A crash (kill -9, power loss of the process) never leaves a half-written file
under a real name; what it can leave is a temporary file, which readers never
read and :func:`sweep_temps` removes, on the writer's own host, once its process is gone. Big payloads go
through ``O_DIRECT`` where the file system allows it: buffered writes of new
files run at a fraction of the disk's speed on many VMs.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import socket
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch

from ..schema import names

__all__ = [
    "write_atomic",
    "write_in_place",
    "link_atomic",
    "make_dir",
    "sweep_temps",
    "open_file",
    "remove_file",
    "remove_tree",
    "replace_file",
    "temp_path",
    "process_alive",
    "prune_dirs",
    "remove_matching",
    "RunRoot",
    "RunEscapeError",
    "DIRECT_MIN_BYTES",
    "Chunk",
]

Chunk = bytes | bytearray | memoryview
DIRECT_MIN_BYTES = 8 << 20
_ALIGN = 4096
_BOUNCE = 4 << 20
_local = threading.local()


_HOST = names.host_tag(socket.gethostname())


class RunEscapeError(OSError):
    """A path under a run resolved through a symbolic link, or the run directory itself was moved or replaced:
    writing there could land outside the run, so nothing is written."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RunRoot:
    """A claimed run directory, held open: every file the writer makes, links or removes under it is reached
    from this descriptor, one component at a time, never through a symbolic link (``openat`` with
    ``O_NOFOLLOW``). A planted link, or the run directory renamed and replaced, is a :class:`RunEscapeError`."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _live: ClassVar[dict[str, tuple[RunRoot, int]]] = {}

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.fd = os.open(self.path, _DIR_FLAGS) if fd is None else fd
        st = os.fstat(self.fd)
        self.ident = (st.st_dev, st.st_ino)

    @classmethod
    def adopt(cls, path: Path, fd: int) -> RunRoot:
        """Hold the directory ``fd`` already opened (without following a link) as ``path``'s root: the claim's own
        descriptor, so no rename between the claim and this can put another directory in its place."""
        key = os.path.abspath(os.fspath(path))
        with cls._lock:
            if key in cls._live:
                os.close(fd)
                root, n = cls._live[key]
                cls._live[key] = (root, n + 1)
                return root
            root = cls(path, fd)
            cls._live[key] = (root, 1)
            return root

    @classmethod
    def claim(cls, path: Path) -> RunRoot:
        """Hold ``path`` (a real directory, not a link) as a run's root until :meth:`release`; nested claims count."""
        key = os.path.abspath(os.fspath(path))
        with cls._lock:
            root, n = cls._live.get(key, (None, 0))
            if root is None:
                try:
                    root = cls(path)
                except OSError as e:
                    raise RunEscapeError(e.errno, f"the run directory {key} cannot be held: {e.strerror}") from None
            cls._live[key] = (root, n + 1)
            return root

    def release(self) -> None:
        with self._lock:
            root, n = self._live.get(self.path, (None, 0))
            if root is not self:
                return
            if n > 1:
                self._live[self.path] = (self, n - 1)
                return
            del self._live[self.path]
        os.close(self.fd)

    @classmethod
    def of(cls, path: str) -> RunRoot | None:
        """The live root that the absolute ``path`` lies under, else None."""
        with cls._lock:
            for key, (root, _) in cls._live.items():
                if path.startswith(key) and path[len(key) : len(key) + 1] == "/":
                    return root
        return None

    def check(self) -> None:
        """The run directory is still where it was claimed."""
        try:
            st = os.lstat(self.path)
            same = (st.st_dev, st.st_ino) == self.ident
        except OSError:
            same = False
        if not same:
            raise RunEscapeError(errno.ENOENT, f"the run directory {self.path} was moved or replaced while logging")

    def parent(self, path: str) -> tuple[int, str]:
        """(a new descriptor of the directory that holds ``path``, its last name): the caller closes it."""
        self.check()
        parts = path[len(self.path) + 1 :].split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise RunEscapeError(errno.EINVAL, f"{path}: not a plain path under its run")
        fd = os.dup(self.fd)
        try:
            for i, comp in enumerate(parts[:-1]):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = os.path.join(self.path, *parts[: i + 1])
                        raise RunEscapeError(e.errno, f"{where} is a symbolic link or not a directory") from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]


class _At:
    """``path`` as (directory descriptor, name) under its run's root, or as itself outside any run."""

    def __init__(self, path: str | Path) -> None:
        self.path = os.path.abspath(os.fspath(path))
        root = RunRoot.of(self.path)
        self.fd: int | None
        self.name: str
        self.fd, self.name = root.parent(self.path) if root is not None else (None, self.path)

    def __enter__(self) -> _At:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def open(self, name: str, flags: int, mode: int = 0o644) -> int:
        """Under a run: never through a link, never blocking on a FIFO, and an existing file opened for writing must
        be a plain file with one name (a hard link planted there would carry the writes outside the run)."""
        if self.fd is None:
            return os.open(name, flags | os.O_CLOEXEC, mode)
        writes = flags & (os.O_WRONLY | os.O_RDWR)
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if writes else 0), mode, dir_fd=self.fd)
        if writes and not flags & os.O_EXCL:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                os.close(fd)
                where = os.path.join(os.path.dirname(self.path), name)
                raise RunEscapeError(errno.EEXIST, f"{where} is not a plain file of the run (a hard link or a special file)")
        return fd

    def tmp(self) -> str:
        return names.temp_name(os.path.basename(self.name), os.getpid(), threading.get_native_id(), _HOST)

    def sibling(self, name: str) -> str:
        """``name`` in the same directory: relative to the descriptor, or a full path outside any run."""
        return name if self.fd is not None else os.path.join(os.path.dirname(self.name), name)


def temp_path(path: Path) -> Path:
    """A temporary name for ``path`` unique to this host, process and thread."""
    return path.with_name(names.temp_name(path.name, os.getpid(), threading.get_native_id(), _HOST))


def prune_dirs(path: str | Path) -> None:
    """Remove the empty directories under ``path`` and ``path`` itself if then empty; never through a link."""
    try:
        fd = open_file(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        for _top, dirs, _files, dfd in os.fwalk(".", topdown=False, dir_fd=fd):
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.rmdir(d, dir_fd=dfd)  # only when empty
    finally:
        os.close(fd)
    with contextlib.suppress(OSError), _At(path) as at:
        os.rmdir(at.name, dir_fd=at.fd)


def remove_matching(path: str | Path, keep: Callable[[str], bool]) -> None:
    """Unlink the files under ``path`` (a directory of a run) for which ``keep`` is False; never through a link."""
    try:
        fd = open_file(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        for _top, _dirs, files, dfd in os.fwalk(".", dir_fd=fd):
            for f in files:
                if not keep(f):
                    with contextlib.suppress(OSError):
                        os.unlink(f, dir_fd=dfd)
    finally:
        os.close(fd)


def open_file(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of a file, confined to its run (never through a link) when it lies under one."""
    with _At(path) as at:
        return at.open(at.name, flags, mode)


def replace_file(src: str | Path, dst: str | Path) -> None:
    """``os.replace`` within one directory of a run, confined to it."""
    with _At(dst) as at:
        os.replace(at.sibling(os.path.basename(os.fspath(src))), at.name, src_dir_fd=at.fd, dst_dir_fd=at.fd)


def remove_file(path: str | Path) -> None:
    """Unlink a file (never what a link points to); a missing one is fine."""
    try:
        with _At(path) as at:
            os.unlink(at.name, dir_fd=at.fd)
    except FileNotFoundError:
        pass


def remove_tree(path: str | Path) -> None:
    """Remove a directory and what it holds, reached under its run without following a link."""
    import shutil

    try:
        with _At(path) as at:
            if at.fd is None:
                shutil.rmtree(at.name)
            else:
                shutil.rmtree(at.name, dir_fd=at.fd)
    except FileNotFoundError:
        pass


def write_atomic(path: str | Path, chunks: Sequence[Chunk]) -> int:
    """Write ``chunks`` to ``path`` as one file that appears only when whole; returns the bytes written."""
    views = [memoryview(c).cast("B") for c in chunks]
    total = sum(len(v) for v in views)
    with _At(path) as at:
        tmp = at.sibling(at.tmp())
        try:
            if not (total >= DIRECT_MIN_BYTES and hasattr(os, "O_DIRECT") and _write_direct(at, tmp, views, total)):
                _write_buffered(at, tmp, views)
            os.replace(tmp, at.name, src_dir_fd=at.fd, dst_dir_fd=at.fd)
        except BaseException:
            _unlink_quietly(at, tmp)
            raise
    return total


def make_dir(d: Path) -> None:
    """``mkdir -p`` at the cost of one ``mkdir`` when the parent exists (almost always); under a run, never
    through a link (an existing name is checked when a file is made in it)."""
    try:
        with _At(d) as at:
            os.mkdir(at.name, dir_fd=at.fd)
    except FileExistsError:
        pass
    except FileNotFoundError:
        parent = Path(d).parent
        if parent == Path(d) or RunRoot.of(os.fspath(d)) is None:
            Path(d).mkdir(parents=True, exist_ok=True)
            return
        make_dir(parent)
        make_dir(d)


def _write_buffered(at: _At, path: str, views: list[memoryview]) -> None:
    fd = at.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # a fresh temporary: nothing planted is ever reused
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


def _write_direct(at: _At, path: str, views: list[memoryview], total: int) -> bool:
    """Stream ``views`` through the aligned buffer with O_DIRECT; the unaligned tail is appended normally.

    Large pieces are copied with torch (which lets go of the GIL), so the model's
    thread keeps running while a big tensor is staged. False where O_DIRECT is refused.
    """
    try:
        fd = at.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT)
    except RunEscapeError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise
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
            _unlink_quietly(at, path)
            return False
        raise
    os.close(fd)
    if fill > aligned:
        fd = at.open(path, os.O_WRONLY | os.O_APPEND)
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
    fd = open_file(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        os.pwrite(fd, data + b" " * max(0, size - len(data)), 0)
    finally:
        os.close(fd)


def link_atomic(src: str | Path, dst: str | Path) -> None:
    """``dst`` becomes another name of the finished file ``src`` (a hard link appears whole); never of what a
    link at ``src`` points to."""
    with _At(src) as a, _At(dst) as b:
        try:
            os.link(a.name, b.name, src_dir_fd=a.fd, dst_dir_fd=b.fd, follow_symlinks=False)
        except FileExistsError:
            tmp = b.sibling(b.tmp())
            os.link(a.name, tmp, src_dir_fd=a.fd, dst_dir_fd=b.fd, follow_symlinks=False)
            os.replace(tmp, b.name, src_dir_fd=b.fd, dst_dir_fd=b.fd)


def sweep_temps(directory: str | Path, *, recursive: bool = True) -> list[str]:
    """Remove temporary files that a writer of this host left when it died; returns what was removed.

    Only a writer calls this, on the run it claims. A temporary name carries its writer's host and pid:
    another host's files (a shared file system) and a live process's are left alone.
    """
    removed: list[str] = []
    root = RunRoot.of(os.path.join(os.path.abspath(os.fspath(directory)), "x"))
    try:
        # by descriptor, never into a link; from the run's own descriptor when it is held
        walk = os.fwalk(".", dir_fd=root.fd) if root is not None else os.fwalk(os.fspath(directory))
        for top, dirs, files, fd in walk:
            if not recursive:
                dirs.clear()
            for name in files:
                owner = names.temp_owner(name)
                if owner is not None and owner[1] == _HOST and not process_alive(owner[0]):
                    try:
                        os.unlink(name, dir_fd=fd)
                        removed.append(os.path.normpath(os.path.join(os.fspath(directory), top, name)))
                    except OSError:
                        pass
    except OSError:
        pass
    return removed


def process_alive(pid: int | None) -> bool:
    """A process of this host that may still write: not gone, and not a zombie (killed, not yet reaped)."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _unlink_quietly(at: _At, path: str) -> None:
    try:
        os.unlink(path, dir_fd=at.fd)
    except OSError:
        pass
