"""Finishing live captures when the interpreter exits, and on SIGTERM.

The SIGTERM handler is installed only where SIGTERM has its default action
(the process would die without running ``atexit``), and restored when the
last capture is removed. It turns SIGTERM into ``SystemExit``, which unwinds
the forward in progress (its step is then marked incomplete) and runs
``atexit``.
"""

from __future__ import annotations

import atexit
import signal
import threading
import weakref
from typing import Any, Protocol

__all__ = ["EXIT"]


class _Closable(Protocol):
    def remove(self) -> None: ...


class _ExitFlush:
    def __init__(self) -> None:
        self.live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._registered = False
        self._installed = False

    def add(self, handle: _Closable) -> None:
        self.live.add(handle)
        if not self._registered:
            atexit.register(self.flush_all)
            self._registered = True
        if not self._installed and threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    signal.signal(signal.SIGTERM, _sigterm_exit)
                    self._installed = True
            except (ValueError, OSError):
                pass

    def discard(self, handle: _Closable) -> None:
        self.live.discard(handle)
        if not self.live and self._installed and threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) is _sigterm_exit:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
            except (ValueError, OSError):
                pass
            self._installed = False

    def flush_all(self) -> None:
        for handle in list(self.live):
            try:
                handle.remove()
            except Exception:
                pass


def _sigterm_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


EXIT = _ExitFlush()
