"""Serialising snapshots to disk on a background thread.

Hooks only snapshot tensors and hand a :class:`CallRecord` to :class:`Writer`;
one thread turns records into files. Every file is written to a temporary
name in its final directory and renamed into place, so a crash never leaves a
half-written file under a real name. A write error (disk full, budget reached,
permissions) stops logging for the rest of the run and is recorded in
``run.json``; it never reaches the model.
"""

from __future__ import annotations

import errno
import io
import json
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..schema import names as _layout
from ..capture.flatten import STAT_KEYS, small_values, stats_row_to_dict, stats_tensor

__all__ = ["Writer", "CallRecord", "TensorSnapshot", "RunStopped", "atomic_write"]


class RunStopped(Exception):
    """Logging for this run has stopped (budget, disk full, error); the reason is in run.json."""


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


DIRECT_MIN_BYTES = 8 << 20
_ALIGN = 4096
_bounce = threading.local()


def _write_direct(path: str, data: memoryview) -> bool:
    """Write through O_DIRECT, bypassing the page cache (much faster for big files on some
    disks); the unaligned tail is appended normally. False where O_DIRECT is refused (tmpfs)."""
    import mmap

    aligned = len(data) // _ALIGN * _ALIGN
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = getattr(_bounce, "buf", None)
        if buf is None or len(buf) < aligned:  # page-aligned bounce buffer, reused by this thread
            buf = _bounce.buf = mmap.mmap(-1, max(aligned, 64 << 20))
        view = memoryview(buf)
        done = 0
        while done < aligned:
            n = min(aligned - done, len(buf))
            view[:n] = data[done : done + n]
            chunk = view[:n]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
            done += n
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EINVAL:  # the filesystem takes O_DIRECT at open but not at write
            os.unlink(path)
            return False
        raise
    os.close(fd)
    if aligned < len(data):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            tail = data[aligned:]
            while tail:
                tail = tail[os.write(fd, tail):]
        finally:
            os.close(fd)
    return True


def write_bytes_atomic(path: Path | str, data: bytes | memoryview) -> None:
    """``atomic_write`` for bytes already in memory, with plain ``os`` calls (the writer's hot loop)."""
    path = os.fspath(path)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.tmp{os.getpid()}")
    view = memoryview(data).cast("B")
    try:
        if len(view) >= DIRECT_MIN_BYTES and hasattr(os, "O_DIRECT") and _write_direct(tmp, view):
            os.replace(tmp, path)
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.replace(tmp, path)


_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))  # compact: the C encoder, ~10x faster than indent


def write_json(path: Path | str, obj: Any) -> None:
    write_bytes_atomic(path, _ENCODER.encode(obj).encode())


@dataclass
class TensorSnapshot:
    """One tensor of a call: metadata taken in the hook, data copied to host (or not)."""

    key: str | None
    meta: dict[str, Any]
    host: torch.Tensor | None = None  # a private host copy of the data
    write_file: bool = False  # save ``host`` as a tensor file
    want_values: bool = False  # small tensor: also put its values into the json
    want_checksum: bool = False
    stats: torch.Tensor | None = None  # [len(STAT_KEYS)] when computed on device in the hook
    skipped: str | None = None


@dataclass
class CallRecord:
    """Everything the writer needs to lay down one logged module call."""

    step: int
    module: str
    cls: str
    call_index: int
    seq_start: int
    seq_end: int = -1
    inputs: list[tuple[str, Any]] = field(default_factory=list)  # (key, TensorSnapshot | description)
    outputs: list[tuple[str | None, Any]] = field(default_factory=list)
    on_cuda: bool = False
    cuda_device: int | None = None
    ready: Any = None  # CUDA event guarding non-blocking copies
    nbytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    structure: dict[str, Any] | None = None  # how the inputs nest, to rebuild the call

    @property
    def dirname(self) -> str:
        return _layout.call_dir(self.module, self.call_index)


class Writer:
    """One background thread writing :class:`CallRecord` objects in submission order."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int | None,
        fmt: str,
        max_pending_bytes: int,
        on_backpressure: str,
        max_total_bytes: int | None,
        on_stop: Callable[[str], None],
    ) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.fmt = fmt
        self.max_pending_bytes = max_pending_bytes
        self.drop = on_backpressure == "drop"
        self.max_total_bytes = max_total_bytes
        self._on_stop = on_stop
        self.bytes_written = 0
        self.files_written = 0
        self.dropped: list[dict[str, Any]] = []
        self._linked: dict[int, tuple[Any, Path]] = {}
        self._stats_cache: dict[int, tuple[Any, list[float]]] = {}
        self._queue: deque[tuple[Callable[[], None], int]] = deque()
        self._pending = 0
        self._cv = threading.Condition()
        self._stopped: str | None = None
        self._closing = False
        self._held = 0
        self._flushing = 0
        self._thread = threading.Thread(target=self._loop, name="tensorlog-writer", daemon=True)
        self._thread.start()

    # -- producer side (hooks) -------------------------------------------------

    @property
    def stopped(self) -> str | None:
        return self._stopped

    def submit_call(self, rec: CallRecord) -> None:
        self._submit(lambda: self._write_call(rec), rec.nbytes, rec)

    def submit(self, job: Callable[[], None]) -> None:
        self._submit(job, 0, None)

    def _submit(self, job: Callable[[], None], nbytes: int, rec: CallRecord | None) -> None:
        with self._cv:
            if self._stopped:
                return
            if self._pending + nbytes > self.max_pending_bytes and self._queue:
                if self.drop and rec is not None:
                    self.dropped.append({"step": rec.step, "module": rec.dirname, "bytes": nbytes})
                    return
                while self._pending + nbytes > self.max_pending_bytes and self._queue and not self._stopped:
                    self._cv.wait()
            self._queue.append((job, nbytes))
            self._pending += nbytes
            self._cv.notify_all()

    def hold(self) -> None:
        """The model is running: stay off the GIL (unless too much is pending).

        The writer is mostly system calls, each of which gives up the GIL and then waits
        behind the hooks to get it back; writing while the model is idle is much cheaper
        for both sides than interleaving with it.
        """
        with self._cv:
            self._held += 1

    def release(self) -> None:
        with self._cv:
            self._held = max(0, self._held - 1)
            self._cv.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is on disk (or logging stopped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._flushing += 1
            self._cv.notify_all()
            try:
                while self._queue or self._busy:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cv.wait(remaining)
            finally:
                self._flushing -= 1
        return True

    def close(self) -> None:
        self.flush()
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # -- consumer side (thread) --------------------------------------------------

    _busy = False

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and (not self._queue or self._waiting_for_idle()):
                    self._cv.wait()
                if not self._queue:
                    return
                job, nbytes = self._queue.popleft()
                self._busy = True
            try:
                if not self._stopped:
                    job()
            except Exception as e:  # contained: the model must never see it
                self._stop(_describe_fault(e))
            finally:
                with self._cv:
                    self._pending -= nbytes
                    self._busy = False
                    self._cv.notify_all()

    def _waiting_for_idle(self) -> bool:
        return self._held > 0 and not self._flushing and self._pending * 2 < self.max_pending_bytes

    def _stop(self, reason: str) -> None:
        with self._cv:
            if self._stopped:
                return
            self._stopped = reason
            self._queue.clear()
            self._pending = 0
            self._cv.notify_all()
        self._on_stop(reason)

    def _account(self, nbytes: int) -> None:
        if self.max_total_bytes is not None and self.bytes_written + nbytes > self.max_total_bytes:
            raise _BudgetReached(
                f"max_total_bytes reached ({self.bytes_written} of {self.max_total_bytes} bytes written)"
            )
        self.bytes_written += nbytes

    def _write_call(self, rec: CallRecord) -> None:
        if rec.ready is not None:
            rec.ready.synchronize()
        d = self.run_dir / _layout.step_dir(rec.step) / rec.dirname
        payload: list[tuple[Path, torch.Tensor]] = []
        metas = {}
        for kind, entries in (("inputs", rec.inputs), ("outputs", rec.outputs)):
            items = []
            for key, val in entries:
                if isinstance(val, TensorSnapshot):
                    items.append(self._tensor_entry(kind, key, val, d, payload))
                else:
                    items.append({"name": key, "kind": "value", **val})
            metas[kind] = {
                "module": rec.module,
                "class": rec.cls,
                "step": rec.step,
                "call_index": rec.call_index,
                "seq_start": rec.seq_start,
                "seq_end": rec.seq_end,
                "rank": self.rank,
                **rec.extra,
                kind: items,
            }
        if rec.structure is not None:
            metas["inputs"]["structure"] = rec.structure
        self._account(sum(t.numel() * t.element_size() for _, t in payload if not self._is_linked(t)))
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        except FileNotFoundError:
            d.mkdir(parents=True, exist_ok=True)
        for path, t in payload:
            self._save_tensor(path, t)
        for kind, meta in metas.items():
            write_json(d / _layout.meta_file(kind, self.rank), meta)

    def _tensor_entry(
        self, kind: str, key: str | None, snap: TensorSnapshot, d: Path, payload: list[tuple[Path, torch.Tensor]]
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": key, "kind": "tensor", **snap.meta}
        host = snap.host
        if snap.stats is not None:
            row = snap.stats.tolist()
        elif host is not None:
            cached = self._stats_cache.get(id(host))
            if cached is not None and cached[0]() is host:  # a shared snapshot: same data, same statistics
                row = cached[1]
            else:
                st = stats_tensor([host])
                row = st[0].tolist() if st is not None else [float("nan")] * len(STAT_KEYS)
                if len(self._stats_cache) > 4096:
                    self._stats_cache = {k: v for k, v in self._stats_cache.items() if v[0]() is not None}
                self._stats_cache[id(host)] = (weakref.ref(host), row)
        else:
            row = None
        if row is not None:
            entry["stats"] = stats_row_to_dict(row)
        if host is not None and snap.want_values:
            entry["values"] = small_values(host)
        if host is not None and snap.want_checksum:
            entry["checksum"] = {"algorithm": CHECKSUM_ALGORITHM, "digest": _checksum(host)}
        if snap.skipped:
            entry["skipped"] = snap.skipped
        elif host is not None and snap.write_file:
            ext = "safetensors" if self.fmt == "safetensors" else "pt"
            name = _layout.tensor_file(kind, key, snap.meta["device"], self.rank, ext)
            entry["file"] = name
            payload.append((d / name, host))
        return entry

    def _is_linked(self, t: torch.Tensor) -> bool:
        prev = self._linked.get(id(t))
        return prev is not None and prev[0]() is t

    def _save_tensor(self, path: Path, t: torch.Tensor) -> None:
        prev = self._linked.get(id(t))
        if prev is not None and prev[0]() is t:
            try:  # the same snapshot under another name (an input that is the previous output)
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                os.link(prev[1], tmp)
                os.replace(tmp, path)
                self.files_written += 1
                return
            except OSError:
                pass
        self._write_tensor(path, t)
        if len(self._linked) > 4096:
            self._linked = {k: v for k, v in self._linked.items() if v[0]() is not None}
        try:
            self._linked[id(t)] = (weakref.ref(t), path)
        except TypeError:
            pass

    def _write_tensor(self, path: Path, t: torch.Tensor) -> None:
        if self.fmt == "safetensors":
            from safetensors.torch import save

            data = save({"tensor": t})
            atomic_write(path, lambda f: f.write(data))
        else:
            # Serialise in memory first: torch's zip writer reports a failed write (EFBIG, ENOSPC)
            # as a generic RuntimeError, while a plain write raises the OSError that says why.
            buf = io.BytesIO()
            torch.save(t, buf)
            write_bytes_atomic(path, buf.getbuffer())
        self.files_written += 1


class _BudgetReached(Exception):
    pass


CHECKSUM_ALGORITHM = "blake2b-128"


def _checksum(t: torch.Tensor) -> str:
    import hashlib

    t = t.contiguous().reshape(-1)  # 0-dim tensors cannot be viewed as bytes
    data = t.view(torch.uint8) if t.numel() else t
    h = hashlib.blake2b(digest_size=16)
    h.update(str(t.dtype).encode())
    h.update(json.dumps(list(t.shape)).encode())
    if t.numel():
        h.update(memoryview(data.numpy()))
    return h.hexdigest()


def _describe_fault(e: BaseException) -> str:
    if isinstance(e, _BudgetReached):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"disk full or file too large: {e}"
    return f"{type(e).__name__}: {e}"
