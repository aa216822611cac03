"""``stack: true``: the Python stack of each unique call site of a logged module, for ``stack.json``."""

from __future__ import annotations

import json
import sys
import traceback
import types
from pathlib import Path
from typing import Any

from ..storage.atomic import write_atomic

__all__ = ["StackRecorder"]

_SKIP = ("torch/nn/modules/module.py", "/tensorlog/capture/", "torch/overrides")


class StackRecorder:
    def __init__(self) -> None:
        self._stacks: dict[tuple[str, str, int], list[str]] = {}

    def record(self, name: str) -> None:
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None and any(s in frame.f_code.co_filename for s in _SKIP):
            frame = frame.f_back
        if frame is None:
            return
        site = (name, frame.f_code.co_filename, frame.f_lineno)
        if site not in self._stacks:
            self._stacks[site] = [f"{f.filename}:{f.lineno}:{f.name}" for f in traceback.extract_stack(frame, limit=40)]

    def entries(self) -> list[dict[str, Any]]:
        return [{"module": n, "call_site": f"{f}:{line}", "stack": st} for (n, f, line), st in self._stacks.items()]

    def write(self, path: Path) -> None:
        """``stack.json``; a failure to write it costs the stacks, never the run."""
        try:
            write_atomic(path, [json.dumps(self.entries()).encode()])
        except OSError:
            pass
