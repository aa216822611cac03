"""Reader of the vLLM debug-tensor-dump proposal's layout (written by tensorlog's vLLM plugin too).

``<folder>/TP<t>_PP<p>_Rank<r>_pid<pid>/Pass<NNNNN>.pt``, each a dict of leaf
module name -> CPU output tensor for one forward pass; extra outputs of one
module are ``<name>.1``, ``<name>.2``; the k-th call of a shared module within
a pass is ``<name>_<k>``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import RunReadError
from ..schema import names
from ..schema.records import RunManifest, TensorEntry
from ..storage import stats as _stats
from ..storage.tensorfile import check_dense, load_error_text, open_regular
from .model import MemorySource, ModuleCall, Run, Step, TensorRecord, unique_dirnames
from .safeio import Listing

__all__ = ["is_pass_dump", "load_pass_dump"]


def _rank_dirs(path: Path, listing: Listing) -> list[Path]:
    if names.PASS_RANK_DIR_RE.match(path.name) and any(names.PASS_FILE_RE.match(n) for n in listing.files):
        return [path]
    return [d for n, d in sorted(listing.dirs.items()) if names.PASS_RANK_DIR_RE.match(n)]


def is_pass_dump(path: Path, listing: Listing) -> bool:
    return bool(_rank_dirs(path, listing)) and not any(names.RUN_FILE_RE.match(n) for n in listing.files)


def _load_pass_file(path: Path) -> dict[Any, Any]:
    import os

    os.close(open_regular(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise RunReadError(f"cannot read {path}: {type(e).__name__}: {load_error_text(e)}") from None
    if not isinstance(data, dict):
        raise RunReadError(f"{path}: expected a dict of module name -> tensor, found {type(data).__name__}")
    return data


def _split_key(key: str, keys: set[str]) -> tuple[str, int | None]:
    """``"norm.1"`` is output 1 of ``norm`` when ``norm`` is also a key; otherwise a module name."""
    base, dot, idx = key.rpartition(".")
    if dot and idx.isdigit() and base in keys:
        return base, int(idx)
    return key, None


def _entry(name: str, key: str | None, t: torch.Tensor) -> TensorEntry:
    st = _stats.host_stats(t)
    return TensorEntry.model_validate(
        {
            "name": name,
            "kind": "outputs",
            "key": key,
            "path": [key] if key else [],
            "shape": list(t.shape),
            "dtype": str(t.dtype),
            "device": "cpu",
            "numel": t.numel(),
            "stats": st.published() if st else None,
        }
    )


def load_pass_dump(path: Path, listing: Listing) -> Run:
    rank_dirs = _rank_dirs(path, listing)
    multi = len(rank_dirs) > 1
    steps: dict[int, list[ModuleCall]] = {}
    problems: list[str] = list(listing.refused)
    ranks: dict[int, dict[str, Any]] = {}
    for d in rank_dirs:
        m = names.PASS_RANK_DIR_RE.match(d.name)
        assert m is not None
        tp, pp, rank, pid = (int(x) for x in m.groups())
        ranks[rank] = {"tp_rank": tp, "pp_rank": pp, "pid": pid, "dir": d.name}
        sub = listing if d == path else Listing(d)
        problems.extend(sub.refused if d != path else [])
        for fname, f in sorted(sub.files.items()):
            fm = names.PASS_FILE_RE.match(fname)
            if not fm:
                continue
            step = int(fm.group(1))
            try:
                data = _load_pass_file(f)
            except RunReadError as e:
                problems.append(str(e))
                continue
            r = rank if multi else None
            tag = "cpu" if r is None else f"cpu_rank{r}"
            calls: dict[str, ModuleCall] = {}
            keys = {k for k in data if isinstance(k, str)}
            for key, tensor in data.items():
                if not isinstance(key, str):
                    problems.append(f"{f}: a key of type {type(key).__name__} ({str(key)[:40]!r}); module names are strings")
                    continue
                base, idx = _split_key(key, keys)
                call = calls.get(base)
                if call is None:
                    call = calls[base] = ModuleCall(
                        step=step, dirname=names.safe_name(base), module=base, rank=r, position=len(calls)
                    )
                    call.seq_end = call.position  # dict order = completion order (forward hooks)
                if not isinstance(tensor, torch.Tensor):
                    call.errors.append(f"{f}: {key!r} is a {type(tensor).__name__}, not a tensor")
                    continue
                try:
                    check_dense(tensor, f"{f} [{key!r}]")
                except RunReadError as e:
                    call.errors.append(str(e))
                    continue
                k = None if idx is None else str(idx)
                call.outputs.append(
                    TensorRecord(entry=_entry("outputs_" + (f"{k}_" if k else "") + tag, k, tensor), source=MemorySource(tensor))
                )
            for call in calls.values():  # "<name>" is output 0 when "<name>.1" exists
                if len(call.outputs) > 1 and call.outputs[0].key is None:
                    first = call.outputs[0]
                    entry = first.entry.model_copy(update={"name": f"outputs_0_{tag}", "key": "0", "path": ["0"]})
                    call.outputs[0] = first.with_(entry=entry)
            steps.setdefault(step, []).extend(calls.values())
    manifest = RunManifest.model_validate(
        {
            "layout_version": 0,
            "complete": not problems,
            "world_size": len(rank_dirs) or 1,
            "incomplete_reason": "; ".join(problems[:3]) or None,
            "ranks": ranks,
            "layout": "vllm-debug-tensor-dump",
        }
    )
    return Run(
        path=path,
        manifest=manifest,
        steps={i: Step(index=i, calls=_unique(c)) for i, c in sorted(steps.items())},
        layout="pass-dump",
        problems=problems,
    )


def _unique(calls: list[ModuleCall]) -> list[ModuleCall]:
    unique_dirnames(calls)
    return calls
