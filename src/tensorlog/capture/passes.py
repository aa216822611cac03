"""The debug-tensor-dump proposal: every leaf module's output of one pass, as ``Pass<NNNNN>.pt``.

Configured by ``VLLM_DEBUG_TENSOR_DUMP_{OUTPUT_FOLDER,LAYERS,SKIP_PASSES}``
(:class:`PassDumpConfig`). The hooks copy each selected leaf's tensor outputs
to the CPU during the pass; at the pass's end :class:`PassDumper` hands them
to a :class:`~tensorlog.storage.passdump.PassWriter`, which writes them off the
model's thread, and waits for the file. An error, in a hook or in the writer,
stops the dump for good with one warning; it never reaches the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..schema import names
from ..storage.passdump import PassWriter

__all__ = ["PassDumpConfig", "PassDumper"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class PassDumpConfig:
    """The env-var proposal: ``VLLM_DEBUG_TENSOR_DUMP_{OUTPUT_FOLDER,LAYERS,SKIP_PASSES}``."""

    def __init__(self, folder: str, layers: set[int] | None, skip_passes: int) -> None:
        self.folder, self.layers, self.skip_passes = folder, layers, skip_passes

    @classmethod
    def from_env(cls) -> PassDumpConfig | None:
        folder = os.environ.get("VLLM_DEBUG_TENSOR_DUMP_OUTPUT_FOLDER")
        if not folder:
            return None
        layers_env = os.environ.get("VLLM_DEBUG_TENSOR_DUMP_LAYERS", "").strip()
        skip_env = os.environ.get("VLLM_DEBUG_TENSOR_DUMP_SKIP_PASSES", "0").strip() or "0"
        try:
            layers = {int(x) for x in layers_env.split(",") if x.strip()} if layers_env else None
            skip = int(skip_env)
        except ValueError:
            raise ConfigError(
                f"VLLM_DEBUG_TENSOR_DUMP_LAYERS must be comma-separated integers and "
                f"VLLM_DEBUG_TENSOR_DUMP_SKIP_PASSES an integer, got {layers_env!r} and {skip_env!r}"
            ) from None
        return cls(folder, layers, skip)

    def wants(self, name: str) -> bool:
        if self.layers is None:
            return True
        m = _LAYER.search(name)
        return m is None or int(m.group(1)) in self.layers


class PassDumper:
    """Writes ``<folder>/TP<t>_PP<p>_Rank<r>_pid<pid>/Pass<NNNNN>.pt``: leaf module name -> CPU tensor.

    ``warn`` receives the one message said when the dump stops, on the model's thread.
    """

    def __init__(
        self, model: torch.nn.Module, cfg: PassDumpConfig, *, tp: int, pp: int, rank: int, warn: Callable[[str], None]
    ) -> None:
        self.cfg = cfg
        self._warn = warn
        self._writer = PassWriter(Path(cfg.folder) / names.pass_rank_dir(tp, pp, rank, os.getpid()))
        self.pass_index = 0
        self._buf: dict[str, torch.Tensor] | None = None
        self._error: BaseException | None = None
        """A hook's error (the writer keeps its own)."""
        self._warned = False
        self._handles = []
        for name, mod in model.named_modules():
            if name and not any(True for _ in mod.children()) and cfg.wants(name):
                self._handles.append(mod.register_forward_hook(self._make_hook(name)))

    @property
    def dir(self) -> Path:
        return self._writer.dir

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            buf = self._buf
            if buf is None:
                return
            try:
                outs = output if isinstance(output, (tuple, list)) else (output,)
                key = name
                k = 1
                while key in buf:  # a shared module (rotary_emb) called again in this pass
                    key = f"{name}_{k}"
                    k += 1
                tensors = [o for o in outs if isinstance(o, torch.Tensor)]
                for i, t in enumerate(tensors):
                    buf[key if i == 0 else f"{key}.{i}"] = t.detach().to("cpu", copy=True)
            except Exception as e:  # never break the engine: this pass is still written, no later one is
                if self._error is None:
                    self._error = e
                self._report()

        return hook

    def begin(self) -> None:
        if self._error is None and self._writer.failure is None and self.pass_index >= self.cfg.skip_passes:
            self._buf = {}

    def end(self) -> None:
        """The pass is over: its file is on disk when this returns (unless the dump stopped)."""
        buf, self._buf = self._buf, None
        index = self.pass_index
        self.pass_index += 1
        if buf:
            self._writer.write(index, buf)
            self._report()

    def _report(self) -> None:
        failure = self._error or self._writer.failure
        if failure is not None and not self._warned:
            self._warned = True
            self._warn(f"debug tensor dump stopped: {type(failure).__name__}: {failure}")

    def remove(self) -> None:
        """Remove the hooks and end the writer's thread; idempotent."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._writer.close()
