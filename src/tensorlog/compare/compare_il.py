"""The reference's comparison (vLLM's ``tools/compare_il.py``), reimplemented: same pairs, verdicts and counts.

It walks the two directories as the reference does (``step_*`` directories,
every directory in them a module, ``inputs_*.pt`` and ``output*.pt`` files a
tensor, ``inputs.json`` / ``outputs.json`` compared value by value) and judges
each tensor pair with ``torch.allclose`` in the tensors' own dtype. Only the
reading is tensorlog's: files are read as hostile (no links, no special files,
``weights_only``, no zero strides), and one that cannot be read is reported,
where the reference prints a message and counts a mismatch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RunReadError
from ..formats.safeio import SMALL_JSON, Listing, read_json
from ..storage.tensorfile import load_tensor_file

__all__ = ["reference_compare", "ReferenceReport", "RefTensor", "RefModule", "RefStep"]

_WHOLE_TENSOR = 64 << 20
"""Elements up to which a pair is compared whole, as the reference does; larger ones in chunks (same verdict)."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RefTensor(_M):
    match: bool
    error: str | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    max_rel_diff: float | None = None
    mean_rel_diff: float | None = None
    num_diff_elements: int | None = None
    total_elements: int | None = None
    file1: str | None = None
    file2: str | None = None


class RefCounts(_M):
    total: int = 0
    matching: int = 0
    mismatched: int = 0
    missing: int = 0


class RefModule(_M):
    error: str | None = None
    inputs: dict[str, RefTensor] = Field(default_factory=dict)
    outputs: dict[str, RefTensor] = Field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """``inputs`` / ``outputs`` -> ``{"match": bool, "mismatches": ..., "file1", "file2"}``."""
    tensors: RefCounts = Field(default_factory=RefCounts)


class RefStep(_M):
    modules: dict[str, RefModule] = Field(default_factory=dict)
    counts: RefCounts = Field(default_factory=RefCounts)


class ReferenceReport(_M):
    dir1: str
    dir2: str
    rtol: float
    atol: float
    steps: dict[str, RefStep] = Field(default_factory=dict)
    modules: RefCounts = Field(default_factory=RefCounts)
    tensors: RefCounts = Field(default_factory=RefCounts)
    unreadable: list[str] = Field(default_factory=list)
    """Files that could not be read safely (the reference would have printed an error and counted a mismatch)."""


def _files(d: Path, unreadable: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """step -> module -> {"inputs": {name: path}, "outputs": ..., "inputs_json": ..., "outputs_json": ...}."""
    top = Listing(d)
    unreadable.extend(top.refused)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for step, sd in top.dirs.items():
        if not re.fullmatch(r"step_.*", step, re.DOTALL):
            continue
        listing = Listing(sd)
        unreadable.extend(listing.refused)
        modules: dict[str, dict[str, Any]] = {}
        for module, md in listing.dirs.items():
            files = Listing(md)
            unreadable.extend(files.refused)
            entry: dict[str, Any] = {}
            ins = {n: p for n, p in files.files.items() if n.startswith("inputs_") and n.endswith(".pt")}
            outs = {n: p for n, p in files.files.items() if n.startswith("output") and n.endswith(".pt")}
            if ins:
                entry["inputs"] = ins
            if outs:
                entry["outputs"] = outs
            for kind in ("inputs", "outputs"):
                if f"{kind}.json" in files.files:
                    entry[f"{kind}_json"] = files.files[f"{kind}.json"]
            if entry:  # the reference lists a module only by the files it reads, a step only by its modules
                modules[module] = entry
        if modules:
            out[step] = modules
    return out


def _json_compare(a: Any, b: Any) -> dict[str, Any]:
    """The reference's value-by-value comparison of two json documents."""
    if type(a) is not type(b):
        return {"match": False, "error": f"Type mismatch: {type(a).__name__} vs {type(b).__name__}"}
    if isinstance(a, dict):
        mismatches: dict[Any, Any] = {}
        for key in set(a) | set(b):
            if key not in a:
                mismatches[key] = {"error": "Missing in first dict"}
            elif key not in b:
                mismatches[key] = {"error": "Missing in second dict"}
            else:
                c = _json_compare(a[key], b[key])
                if not c["match"]:
                    mismatches[key] = c
        return {"match": False, "mismatches": mismatches} if mismatches else {"match": True}
    if isinstance(a, list):
        if len(a) != len(b):
            return {"match": False, "error": f"Length mismatch: {len(a)} vs {len(b)}"}
        mismatches = {i: c for i, (x, y) in enumerate(zip(a, b)) if not (c := _json_compare(x, y))["match"]}
        return {"match": False, "mismatches": mismatches} if mismatches else {"match": True}
    if a == b:
        return {"match": True}
    return {"match": False, "value1": a, "value2": b}


def _load(path: Path, unreadable: list[str]) -> torch.Tensor | None:
    try:
        return load_tensor_file(path)
    except RunReadError as e:
        unreadable.append(str(e))
        return None


def _tensor_pair(t1: torch.Tensor | None, t2: torch.Tensor | None, rtol: float, atol: float) -> RefTensor:
    """As the reference's ``compare_tensors``: allclose in the tensors' dtype, then its difference measures."""
    if t1 is None or t2 is None:
        return RefTensor(match=False, error="One or both tensors are None")
    if t1.shape != t2.shape:
        return RefTensor(match=False, error=f"Shape mismatch: {t1.shape} vs {t2.shape}")
    if t1.dtype != t2.dtype:
        return RefTensor(match=False, error=f"Dtype mismatch: {t1.dtype} vs {t2.dtype}")
    try:
        if t1.numel() <= _WHOLE_TENSOR:
            close = torch.allclose(t1, t2, rtol=rtol, atol=atol)
        else:
            a, b = t1.reshape(-1), t2.reshape(-1)
            close = all(
                torch.allclose(a[i : i + _WHOLE_TENSOR], b[i : i + _WHOLE_TENSOR], rtol=rtol, atol=atol)
                for i in range(0, a.numel(), _WHOLE_TENSOR)
            )
    except Exception as e:
        return RefTensor(match=False, error=f"Error comparing tensors: {e}")
    if close:
        return RefTensor(match=True)
    try:
        abs_diff = (t1 - t2).abs()
        rel_diff = abs_diff / (t1.abs() + 1e-10)
        not_close = ~torch.isclose(t1, t2, rtol=rtol, atol=atol)
        return RefTensor(
            match=False,
            max_abs_diff=float(abs_diff.max().item()),
            mean_abs_diff=float(abs_diff.mean().item()),
            max_rel_diff=float(rel_diff.max().item()),
            mean_rel_diff=float(rel_diff.mean().item()),
            num_diff_elements=int(not_close.sum().item()),
            total_elements=int(t1.numel()),
        )
    except Exception as e:  # e.g. integer or bool tensors, whose difference the reference cannot average either
        return RefTensor(match=False, error=f"Error comparing tensors: {e}")


def reference_compare(
    dir1: str | Path,
    dir2: str | Path,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    steps: list[str] | None = None,
    modules: list[str] | None = None,
) -> ReferenceReport:
    """Compare two runs as the reference's ``compare_directories`` does.

    Args:
        steps: step numbers as strings (``["0", "1"]``), or None for all.
        modules: regexes searched in module directory names, or None for all.
    """
    d1, d2 = Path(dir1), Path(dir2)
    unreadable: list[str] = []
    f1, f2 = _files(d1, unreadable), _files(d2, unreadable)
    if steps or modules:
        keep = {f"step_{s}" for s in steps} if steps else None
        pats = [re.compile(p) for p in modules] if modules else None
        f1, f2 = (
            {
                s: kept
                for s, mods in f.items()
                if (keep is None or s in keep)
                and (kept := {m: v for m, v in mods.items() if not pats or any(p.search(m) for p in pats)})
            }
            for f in (f1, f2)
        )  # a step none of whose modules match is left out, as the reference's (its ``Steps`` count says 0)
    report = ReferenceReport(dir1=str(d1), dir2=str(d2), rtol=rtol, atol=atol)
    for step in sorted(set(f1) | set(f2)):
        sr = RefStep()
        m1, m2 = f1.get(step, {}), f2.get(step, {})
        for module in sorted(set(m1) | set(m2)):
            mr = RefModule()
            if module not in m1 or module not in m2:
                mr.error = f"Module missing in {d1 if module not in m1 else d2}"
                sr.counts.missing += 1
                sr.modules[module] = mr
                continue
            for kind in ("inputs", "outputs"):
                j1, j2 = m1[module].get(f"{kind}_json"), m2[module].get(f"{kind}_json")
                if j1 is not None and j2 is not None:
                    c = _json_compare(_safe_json(j1, unreadable), _safe_json(j2, unreadable))
                    if not c["match"]:
                        c.update(file1=str(j1), file2=str(j2))
                    mr.metadata[kind] = c
            for kind in ("inputs", "outputs"):
                t1: dict[str, Path] = m1[module].get(kind, {})
                t2: dict[str, Path] = m2[module].get(kind, {})
                side: dict[str, RefTensor] = getattr(mr, kind)
                for name in sorted(set(t1) | set(t2)):
                    mr.tensors.total += 1
                    if name not in t1 or name not in t2:
                        side[name] = RefTensor(match=False, error=f"Tensor missing in {d1 if name not in t1 else d2}")
                        mr.tensors.missing += 1
                        continue
                    r = _tensor_pair(_load(t1[name], unreadable), _load(t2[name], unreadable), rtol, atol)
                    if not r.match:
                        r.file1, r.file2 = str(t1[name]), str(t2[name])
                        mr.tensors.mismatched += 1
                    else:
                        mr.tensors.matching += 1
                    side[name] = r
            if mr.tensors.mismatched:
                sr.counts.mismatched += 1
            else:
                sr.counts.matching += 1
            sr.counts.total += 1
            sr.modules[module] = mr
        report.steps[step] = sr
    for sr in report.steps.values():
        for k in ("total", "matching", "mismatched", "missing"):
            setattr(report.modules, k, getattr(report.modules, k) + getattr(sr.counts, k))
        for mr in sr.modules.values():
            for k in ("total", "matching", "mismatched", "missing"):
                setattr(report.tensors, k, getattr(report.tensors, k) + getattr(mr.tensors, k))
    report.unreadable = unreadable
    return report


def _safe_json(path: Path, unreadable: list[str]) -> Any:
    try:
        return read_json(path, SMALL_JSON)
    except RunReadError as e:
        unreadable.append(str(e))
        return {}
