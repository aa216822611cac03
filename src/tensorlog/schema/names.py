"""File and directory names of the on-disk layout, shared by writer and reader.

The single-process layout is the reference's, byte for byte::

    <output_dir>/<run_name>/run.json
    <output_dir>/<run_name>/step_<N>/module_calls.txt
    <output_dir>/<run_name>/step_<N>/<module>[_<k>]/inputs_<i>_<device>.pt
                                                 /inputs.json, outputs_<device>.pt, outputs.json

When several ranks share a run directory, each rank's metadata gets a
``.rank<R>`` infix (``inputs.rank1.json``, ``module_calls.rank1.txt``,
``run.rank1.json``) and tensor files a ``_rank<R>`` suffix to the device tag,
so no two processes ever write the same file.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "STEP_PREFIX",
    "step_dir",
    "call_dir",
    "device_tag",
    "tensor_file",
    "meta_file",
    "calls_file",
    "run_file",
    "safe_name",
]

STEP_PREFIX = "step_"
_UNSAFE = re.compile(r"[/\\\x00-\x1f]")
_MAX_NAME = 180


def safe_name(name: str) -> str:
    """A name that is one path component and cannot climb out of its parent.

    Names that are already safe are returned unchanged (every real module name
    is); the original name is always kept in the json beside the files.
    """
    safe = _UNSAFE.sub("_", name)
    if safe in ("", ".", "..") or safe.startswith("."):
        safe = "_" + safe
    if len(safe) > _MAX_NAME:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        safe = f"{safe[: _MAX_NAME - 13]}~{digest}"
    return safe


def step_dir(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def call_dir(module: str, call_index: int) -> str:
    """The k-th call (k >= 1) of a module within a step goes to ``<module>_<k>``."""
    base = safe_name(module) if module else "_root"
    return base if call_index == 0 else safe_name(f"{base}_{call_index}")


def rank_infix(rank: int | None) -> str:
    return "" if rank is None else f".rank{rank}"


def device_tag(device: str, rank: int | None = None) -> str:
    tag = device.replace(":", "_")
    return tag if rank is None else f"{tag}_rank{rank}"


def tensor_file(kind: str, key: str | None, device: str, rank: int | None = None, ext: str = "pt") -> str:
    """``inputs_0_cuda_0.pt``, ``outputs_cuda_0.pt`` (single output), ``outputs_1_cpu.pt``."""
    stem = kind if key is None else f"{kind}_{key}"
    return safe_name(f"{stem}_{device_tag(device, rank)}.{ext}")


def meta_file(kind: str, rank: int | None = None) -> str:
    return f"{kind}{rank_infix(rank)}.json"


def calls_file(rank: int | None = None) -> str:
    return f"module_calls{rank_infix(rank)}.txt"


def run_file(rank: int | None = None) -> str:
    return f"run{rank_infix(rank)}.json"


RUN_FILE_RE = re.compile(r"^run(?:\.rank(\d+))?\.json$")
