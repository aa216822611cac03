"""Small dumps in other tools' formats, written by hand from their documentation (no peer tool needed).

* vLLM's debug-tensor-dump proposal (``../shared/reference/vllm-debug-tensor-dump-proposal.md``):
  ``<folder>/TP<t>_PP<p>_Rank<r>_pid<pid>/Pass<NNNNN>.pt``, a dict of leaf module name -> CPU tensor.
* msProbe (``../shared/reference/msprobe-vllm-precision-collection.md`` and mindstudio-probe 26):
  ``<dump>/step<N>/rank<R>/dump.json`` (``task``, ``level``, ``framework``, ``data``), ``construct.json``
  (call -> parent call), ``dump_tensor_data/<data_name>.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def pass_dump(folder: Path, passes: list[dict[str, torch.Tensor]], *, tp: int = 0, rank: int = 0, pid: int = 4242) -> Path:
    d = folder / f"TP{tp}_PP0_Rank{rank}_pid{pid}"
    d.mkdir(parents=True, exist_ok=True)
    for i, tensors in enumerate(passes):
        torch.save(tensors, d / f"Pass{i:05d}.pt")
    return folder


def _leaf(t: torch.Tensor, data_name: str | None = None) -> dict:
    leaf = {
        "type": "torch.Tensor",
        "dtype": str(t.dtype),
        "shape": list(t.shape),
        "Max": t.max().item(),
        "Min": t.min().item(),
        "Mean": t.float().mean().item(),
        "Norm": t.float().norm().item(),
        "requires_grad": False,
    }
    if data_name:
        leaf["data_name"] = data_name
    return leaf


def msprobe_dump(root: Path, steps: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], *, task: str = "tensor") -> Path:
    """``steps[i]`` maps a module name to (input, output); each becomes ``Module.<name>.Linear.forward.0``."""
    for s, calls in enumerate(steps):
        d = root / f"step{s}" / "rank0"
        data_dir = d / "dump_tensor_data"
        data_dir.mkdir(parents=True, exist_ok=True)
        data, construct = {}, {}
        for name, (x, y) in calls.items():
            key = f"Module.{name}.Linear.forward.0"
            ins, outs = f"{key}.input.0.pt", f"{key}.output.0.pt"
            if task == "tensor":
                torch.save(x, data_dir / ins)
                torch.save(y, data_dir / outs)
            data[key] = {
                "input_args": [_leaf(x, ins if task == "tensor" else None)],
                "input_kwargs": {},
                "output": [_leaf(y, outs if task == "tensor" else None)],
            }
            construct[key] = None
        (d / "dump.json").write_text(
            json.dumps({"task": task, "level": "L0", "framework": "pytorch", "dump_data_dir": str(data_dir), "data": data})
        )
        (d / "construct.json").write_text(json.dumps(construct))
    return root
