"""The writer of the debug-tensor-dump proposal's ``Pass<NNNNN>.pt`` files, off the model's thread.

One thread of its own serialises each pass (``torch.save``) and writes it
whole (:func:`~tensorlog.storage.atomic.write_atomic`). The model's thread
hands over one pass and waits for its file (:meth:`PassWriter.write`), so a
pass's file is on disk when its step returns, and memory is bounded by
construction: one pass's host copies, never more. Every wait wakes at least
every :data:`RECHECK` seconds to ask whether the thread still runs, so a thread
that died cannot leave the model waiting. An error stops the writer for good;
it never reaches the model's thread, which reads it from :attr:`PassWriter.failure`.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import torch

from ..schema import names
from .atomic import write_atomic

__all__ = ["PassWriter", "RECHECK"]

RECHECK = 1.0
"""Seconds between two looks, by a waiting model thread, at whether the writer thread still runs."""


class PassWriter:
    """Writes one rank directory's pass files. :meth:`write` and :meth:`close` are called from the model's thread."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cv = threading.Condition()
        self._pass: tuple[int, dict[str, torch.Tensor]] | None = None
        """The pass handed over and not yet written: the only one held (the memory bound)."""
        self._done = -1
        """The index of the last pass the thread is through with (written, or given up)."""
        self._closing = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tensorlog-passdump", daemon=True)
        self._thread.start()

    @property
    def failure(self) -> BaseException | None:
        """What stopped the writer (set once), or None while it runs."""
        return self._failure

    def stop(self, error: BaseException) -> bool:
        """Write nothing more (from any thread); True for the call that stopped it."""
        with self._cv:
            if self._failure is not None:
                return False
            self._failure = error
            self._cv.notify_all()
            return True

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` to ``Pass<index>.pt`` and wait until the file is on disk (or the writer stopped).

        ``index`` grows from one call to the next. Never raises: a failure is in :attr:`failure`.
        """
        with self._cv:
            if self._failure is None and not self._closing and not self._thread.is_alive():
                self._failure = RuntimeError("the pass-dump writer thread is not running (a forked process?)")
            if self._failure is not None or self._closing:
                return
            self._pass = (index, tensors)
            self._cv.notify_all()
            while self._done < index and self._failure is None and self._thread.is_alive():
                self._cv.wait(RECHECK)
            if self._done < index and self._failure is None:
                self._failure = RuntimeError("the pass-dump writer thread died")

    def close(self, timeout: float = 60.0) -> None:
        """End the thread once it is through with the pass it holds; idempotent."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        """Passes as they come; whatever ends this thread, the writer stops and every waiter is woken."""
        try:
            while (job := self._take()) is not None:
                index, tensors = job
                try:
                    if self._failure is None:
                        data = io.BytesIO()
                        torch.save(tensors, data)
                        write_atomic(self.dir / names.pass_file(index), [data.getbuffer()])
                except Exception as e:  # contained: the model must never see it
                    self.stop(e)
                finally:
                    with self._cv:
                        self._pass = None
                        self._done = index
                        self._cv.notify_all()
        except BaseException as e:
            self.stop(e)

    def _take(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        with self._cv:
            while self._pass is None and not self._closing:
                self._cv.wait()
            return self._pass
