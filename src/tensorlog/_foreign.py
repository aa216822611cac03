"""Readers for dumps written by other tools, returning the same :class:`Run` objects.

Each reader is registered with a cheap ``detect`` test on the directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ._reader import Run

__all__ = ["detect"]

_Loader = Callable[[Path], Run]
_READERS: list[tuple[Callable[[Path], bool], _Loader]] = []


def detect(path: Path) -> _Loader | None:
    """The loader for a foreign dump at ``path``, or None when it is not one."""
    for test, loader in _READERS:
        if test(path):
            return loader
    return None
