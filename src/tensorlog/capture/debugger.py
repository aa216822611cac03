"""``Debugger``: start/stop/step for callers who own the loop (msProbe's PrecisionDebugger API).

Safe to drive from a model runner's ``execute_model``::

    dbg = tensorlog.Debugger("config.json")
    def execute_model(self, ...):
        dbg.start(model=self.model)
        try:
            ...
        finally:
            dbg.stop()
            dbg.step()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigLike, load_config
from ..errors import UsageError
from .handle import CaptureHandle

__all__ = ["Debugger"]


class Debugger:
    """Capture driven by explicit ``start()`` / ``stop()`` / ``step()`` calls.

    Args:
        config (LogConfig | dict | str | PathLike, optional): as for :func:`tensorlog.capture`.
        **overrides: config keys that replace the config's own.

    Example:
        >>> dbg = tensorlog.Debugger({"log_step_ids": [0, 1], "mode": "statistics"})
        >>> for batch in loader:
        ...     dbg.start(model); model(batch); dbg.stop(); dbg.step()
        >>> dbg.close()
    """

    def __init__(self, config: ConfigLike | None = None, /, **overrides: Any) -> None:
        cfg = load_config(config if config is not None else {})
        self.config = cfg.with_overrides(**overrides) if overrides else cfg
        self._handle: CaptureHandle | None = None
        self._model_id: int | None = None

    @property
    def path(self) -> Path:
        return self._handle.path if self._handle is not None else self.config.run_dir

    @property
    def handle(self) -> CaptureHandle | None:
        return self._handle

    def start(self, model: torch.nn.Module | None = None) -> None:
        """Begin (or resume) logging; the first call needs the model and registers nothing else twice."""
        if self._handle is None:
            if model is None:
                raise UsageError("Debugger.start() needs the model on its first call: dbg.start(model)")
            self._handle = CaptureHandle(model, self.config, auto_step=False)
            self._model_id = id(model)
        elif model is not None and id(model) != self._model_id:
            raise UsageError("Debugger.start() got a different model than on its first call; use one Debugger per model")
        self._handle.begin_step()
        self._handle.resume()

    def stop(self) -> None:
        """Pause logging (hooks stay registered and return at once) until the next ``start()``."""
        if self._handle is not None:
            self._handle.pause()

    def step(self) -> None:
        """End the current step (its files are on disk when this returns); the next ``start()`` opens the next one."""
        if self._handle is not None:
            self._handle.end_step()

    @property
    def enabled(self) -> bool:
        return self._handle is not None and not self._handle.paused

    @enabled.setter
    def enabled(self, on: bool) -> None:
        """Turn logging on or off at runtime without re-registering hooks."""
        if self._handle is not None:
            (self._handle.resume if on else self._handle.pause)()

    def close(self) -> None:
        """Flush everything and finalise ``run.json``; idempotent."""
        if self._handle is not None:
            self._handle.remove()

    def __enter__(self) -> Debugger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
