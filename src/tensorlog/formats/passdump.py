"""Readers for dumps written by other tools, returning the same :class:`Run` objects.

* msProbe (``mindstudio-probe``) dumps: ``dump_path/step<N>/rank<R>/dump.json`` (see ``_msprobe``).
* The vLLM debug-tensor-dump proposal: ``<folder>/TP<t>_PP<p>_Rank<r>_pid<pid>/Pass<NNNNN>.pt``,
  each a dict of leaf module name -> CPU output tensor (extra outputs of one
  module as ``<name>.1``, ``<name>.2``; the k-th call of a shared module as ``<name>_<k>``).

Each reader has a cheap ``detect`` test on the directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from .tensorlog import ModuleCall, Run, RunReadError, Step, TensorRecord

__all__ = ["detect"]

_RANK_DIR = re.compile(r"^TP(\d+)_PP(\d+)_Rank(\d+)_pid(\d+)$")
_PASS_FILE = re.compile(r"^Pass(\d+)\.pt$")


def _pass_rank_dirs(path: Path) -> list[Path]:
    if _RANK_DIR.match(path.name) and any(_PASS_FILE.match(f.name) for f in path.iterdir()):
        return [path]
    try:
        return sorted(d for d in path.iterdir() if d.is_dir() and _RANK_DIR.match(d.name))
    except OSError:
        return []


def _is_pass_dump(path: Path) -> bool:
    return bool(_pass_rank_dirs(path)) and not (path / "run.json").exists()


def _load_pass_file(path: Path) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RunReadError(f"cannot read {path}: {type(e).__name__}: {first}") from None
    if not isinstance(data, dict):
        raise RunReadError(f"{path}: expected a dict of module name -> tensor, found {type(data).__name__}")
    return data


def _split_key(key: str, keys: set[str]) -> tuple[str, int | None]:
    """``"norm.1"`` is output 1 of ``norm`` when ``norm`` is also a key; otherwise a module name."""
    base, dot, idx = key.rpartition(".")
    if dot and idx.isdigit() and base in keys:
        return base, int(idx)
    return key, None


def _load_pass_dump(path: Path) -> Run:
    rank_dirs = _pass_rank_dirs(path)
    multi = len(rank_dirs) > 1
    steps: dict[int, list[ModuleCall]] = {}
    problems: list[str] = []
    ranks = {}
    for d in rank_dirs:
        tp, pp, rank, pid = (int(x) for x in _RANK_DIR.match(d.name).groups())  # type: ignore[union-attr]
        ranks[rank] = {"tp_rank": tp, "pp_rank": pp, "pid": pid, "dir": d.name}
        for f in sorted(d.iterdir()):
            m = _PASS_FILE.match(f.name)
            if not m:
                continue
            try:
                data = _load_pass_file(f)
            except RunReadError as e:
                problems.append(str(e))
                continue
            calls: dict[str, ModuleCall] = {}
            r = rank if multi else None
            tag = "cpu" if r is None else f"cpu_rank{r}"
            keys = set(data)
            for key, tensor in data.items():
                base, idx = _split_key(key, keys)
                call = calls.get(base)
                if call is None:
                    call = calls[base] = ModuleCall(step=int(m.group(1)), dirname=base, module=base, rank=r, position=len(calls))
                    call.seq_end = call.position  # dict order = completion order (forward hooks)
                if not isinstance(tensor, torch.Tensor):
                    call.errors.append(f"{f}: {key!r} is a {type(tensor).__name__}, not a tensor")
                    continue
                call.outputs.append(
                    TensorRecord(
                        name=f"outputs_{tag}" if idx is None else f"outputs_{idx}_{tag}",
                        kind="outputs",
                        key=None if idx is None else str(idx),
                        meta={"kind": "tensor", "shape": list(tensor.shape), "dtype": str(tensor.dtype), "device": "cpu",
                              "numel": tensor.numel(), "_tensor": tensor},
                    )
                )
            for call in calls.values():  # "<name>" is output 0 when "<name>.1" exists
                if len(call.outputs) > 1 and call.outputs[0].key is None:
                    first = call.outputs[0]
                    call.outputs[0] = TensorRecord(name=f"outputs_0_{tag}", kind="outputs", key="0", meta=first.meta)
            steps.setdefault(int(m.group(1)), []).extend(calls.values())
    manifest = {"layout": "vllm-debug-tensor-dump", "complete": True, "ranks": ranks, "world_size": len(rank_dirs)}
    return Run(path=path, manifest=manifest, steps={i: Step(index=i, calls=c) for i, c in sorted(steps.items())},
               layout="pass-dump", problems=problems)


def _is_msprobe(path: Path) -> bool:
    from .msprobe import is_msprobe_dump

    return is_msprobe_dump(path)


def _load_msprobe(path: Path) -> Run:
    from .msprobe import load_msprobe_dump

    return load_msprobe_dump(path)


_READERS: list[tuple[Callable[[Path], bool], Callable[[Path], Run]]] = [(_is_pass_dump, _load_pass_dump), (_is_msprobe, _load_msprobe)]


def detect(path: Path) -> Callable[[Path], Run] | None:
    """The loader for a foreign dump at ``path``, or None when it is not one."""
    for test, loader in _READERS:
        if test(path):
            return loader
    return None
