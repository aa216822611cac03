"""``reload_input_dir``: run each logged module on the inputs another run recorded for it, live.

The reference's way of isolating one layer's own error: if run B's module,
fed run A's inputs, still differs from run A's output, the difference is
born in that module. Unlike the reference, a missing tensor, or one whose
shape or dtype differs from the live input, is a :class:`GraftError` before
anything is substituted (the reference warns and runs on), and the run's
``run.json`` records where its inputs came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import GraftError, RunReadError
from ..schema import names
from ..schema.tree import flatten_call, unflatten
from ..storage.records import CallRecord
from ..storage.tensorfile import load_tensor_file

__all__ = ["Graft"]


class Graft:
    def __init__(self, source: str | Path, rank: int | None = None) -> None:
        self.rank = rank
        path = Path(source).expanduser()
        if not path.is_dir():
            raise GraftError(f"reload_input_dir {path} is not a directory")
        if not any(names.STEP_DIR_RE.match(p.name) for p in path.iterdir()):
            raise GraftError(f"reload_input_dir {path} holds no step_<N> directories: pass the run directory itself")
        self.source = path

    def inputs_for(
        self, rec: CallRecord, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's inputs with every tensor replaced by the source run's, or a GraftError; all or nothing."""
        d = self.source / names.step_dir(rec.step) / rec.dirname
        if not d.is_dir():
            raise GraftError(f"reload_input_dir: {d} is missing: the source run did not log {rec.dirname!r} at step {rec.step}")
        loaded: dict[tuple[str, ...], torch.Tensor] = {}
        for s in rec.tensors:
            if s.kind != "inputs" or not s.tensor or s.skipped is not None:
                continue
            files = [d / names.tensor_file(s.stem, s.device or "cpu", self.rank, ext) for ext in ("pt", "safetensors")]
            f = next((c for c in files if c.exists()), files[0])
            try:
                t = load_tensor_file(f)
            except RunReadError as e:
                raise GraftError(f"reload_input_dir: cannot use {f}: {e}") from None
            if t.shape != s.shape or t.dtype != s.dtype:
                raise GraftError(
                    f"reload_input_dir: {f} is {list(t.shape)} {t.dtype}, but {rec.dirname!r} was called "
                    f"with {list(s.shape or ())} {s.dtype} ({s.kind} {s.key})"
                )
            loaded[s.path] = t
        if not loaded:
            return args, kwargs
        leaves, spec = flatten_call(args, kwargs)
        new = [_replaced(path, v, loaded) for path, v in leaves]
        new_args, new_kwargs = unflatten(spec, new)
        return new_args, new_kwargs


def _replaced(path: tuple[str, ...], value: Any, loaded: dict[tuple[str, ...], torch.Tensor]) -> Any:
    """The source run's tensor at ``path``, on the live one's device and with its ``requires_grad``."""
    new = loaded.get(path) if isinstance(value, torch.Tensor) else None
    return value if new is None else new.to(device=value.device).requires_grad_(value.requires_grad)
