"""Reading runs back: the only code that knows the on-disk layouts.

``load_run`` turns a run directory into plain objects (run -> steps -> module
calls -> tensors) with lazy tensor loading. Nothing on disk is unpickled
beyond tensors (``torch.load(weights_only=True)``, or safetensors). A file that
cannot be read is reported on the object that owns it (``ModuleCall.errors``)
instead of failing the whole run, so a run cut short by a crash still loads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..schema import names as _layout

__all__ = ["load_run", "Run", "Step", "ModuleCall", "TensorRecord", "RunReadError"]


class RunReadError(ValueError):
    """The path is not a run, or a run file cannot be read."""


@dataclass(frozen=True)
class TensorRecord:
    """One logged tensor (or non-tensor value) of a module call.

    ``name`` is the pairing key within its call, the tensor file's name
    without extension (``inputs_0_cuda_0``, ``outputs_cpu``).
    """

    name: str
    kind: str  # "inputs" | "outputs"
    key: str | None  # "0", "hidden_states", None for a single output
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def is_tensor(self) -> bool:
        return self.meta.get("kind", "tensor") == "tensor"

    @property
    def shape(self) -> tuple[int, ...] | None:
        s = self.meta.get("shape")
        return tuple(s) if s is not None else None

    @property
    def dtype(self) -> str | None:
        return self.meta.get("dtype")

    @property
    def stats(self) -> dict[str, Any] | None:
        return self.meta.get("stats")

    @property
    def checksum(self) -> str | None:
        c = self.meta.get("checksum")
        return c.get("digest") if isinstance(c, dict) else c

    @property
    def checksum_algorithm(self) -> str | None:
        c = self.meta.get("checksum")
        return c.get("algorithm") if isinstance(c, dict) else None

    @property
    def has_data(self) -> bool:
        return self.path is not None or "_tensor" in self.meta or "_loader" in self.meta

    @property
    def nbytes(self) -> int:
        numel = self.meta.get("numel") or 0
        try:
            return numel * _dtype(self.dtype).itemsize
        except (TypeError, ValueError, RuntimeError):
            return numel * 4

    def load(self) -> torch.Tensor:
        """Read the tensor from disk (memory-mapped where the format allows)."""
        if "_tensor" in self.meta:
            return self.meta["_tensor"]
        if "_loader" in self.meta:  # a tensor derived by alignment (split, summed, reassembled, gathered)
            return self.meta["_loader"]()
        if self.path is None:
            raise RunReadError(f"{self.name}: no tensor data was saved ({self.meta.get('skipped') or 'statistics only'})")
        return load_tensor_file(self.path)


def load_tensor_file(path: Path) -> torch.Tensor:
    try:
        if path.suffix == ".safetensors":
            return _mmap_safetensors(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RunReadError:
        raise
    except Exception as e:  # truncated, corrupted, or not a tensor file at all
        raise RunReadError(f"cannot read tensor file {path}: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(obj, torch.Tensor):
        raise RunReadError(f"{path}: holds a {type(obj).__name__}, not a tensor")
    return obj


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def _mmap_safetensors(path: Path) -> torch.Tensor:
    """The single tensor of a safetensors file, memory-mapped (no copy until it is used)."""
    import mmap

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise RunReadError(f"cannot read tensor file {path}: truncated header")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100_000_000:
            raise RunReadError(f"cannot read tensor file {path}: bad header length {n}")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise RunReadError(f"cannot read tensor file {path}: corrupt header") from None
        entries = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
        if len(entries) != 1:
            raise RunReadError(f"{path}: expected one tensor, found {len(entries)}")
        (info,) = entries.values()
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise RunReadError(f"cannot read tensor file {path}: corrupt header") from None
        if dtype is None:
            raise RunReadError(f"{path}: dtype {info.get('dtype')} is not supported by this torch")
        size = path.stat().st_size
        if 8 + n + end > size or start > end:
            raise RunReadError(f"cannot read tensor file {path}: truncated data")
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("ignore")  # frombuffer warns that the buffer is read-only; we never write to it
        t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=8 + n + start)
    return t.view(shape)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _dtype(name: str | None) -> torch.dtype:
    if not name or not name.startswith("torch."):
        raise ValueError(name)
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(name)
    return dt


@dataclass
class ModuleCall:
    """One logged call of one module in one step (on one rank)."""

    step: int
    dirname: str
    module: str
    call_index: int = 0
    cls: str | None = None
    seq_start: int | None = None
    seq_end: int | None = None
    rank: int | None = None
    position: int = 0  # index in the step's start order
    inputs: list[TensorRecord] = field(default_factory=list)
    outputs: list[TensorRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tensors(self) -> list[TensorRecord]:
        return self.inputs + self.outputs

    @property
    def key(self) -> tuple[int | None, str]:
        return (self.rank, self.dirname)


@dataclass
class Step:
    index: int
    calls: list[ModuleCall]  # in the order the calls started
    extra: dict[str, Any] = field(default_factory=dict)

    def by_completion(self) -> list[ModuleCall]:
        """Calls in the order they finished: children before their parents."""
        return sorted(self.calls, key=lambda c: (c.rank or 0, c.seq_end if c.seq_end is not None else 1 << 60, c.position))

    def call(self, dirname: str, rank: int | None = None) -> ModuleCall | None:
        for c in self.calls:
            if c.dirname == dirname and c.rank == rank:
                return c
        return None


@dataclass
class Run:
    """A run read from disk. ``steps`` maps step index to :class:`Step`."""

    path: Path
    manifest: dict[str, Any]
    steps: dict[int, Step]
    layout: str = "tensorlog"
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def incomplete_reason(self) -> str | None:
        return None if self.complete else self.manifest.get("incomplete_reason", "no manifest")

    def calls(self) -> Iterator[ModuleCall]:
        for s in sorted(self.steps):
            yield from self.steps[s].calls

    def __repr__(self) -> str:
        n = sum(len(s.calls) for s in self.steps.values())
        return f"<tensorlog Run {self.path} ({self.layout}): {len(self.steps)} steps, {n} module calls>"


_STEP_RE = re.compile(rf"^{_layout.STEP_PREFIX}(\d+)$")
_META_RE = re.compile(r"^(inputs|outputs)(?:\.rank(\d+))?\.json$")
_CALLS_RE = re.compile(r"^module_calls(?:\.rank(\d+))?\.txt$")
_TENSOR_FILE_RE = re.compile(r"^(inputs|outputs)(?:_(.*))?\.(pt|safetensors)$")


def resolve_run_dir(path: str | Path) -> Path:
    """A run directory itself, or an output dir that holds exactly one run."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RunReadError(f"no such directory: {p}")
    if not p.is_dir():
        raise RunReadError(f"not a directory: {p}")
    if _is_run_dir(p):
        return p
    runs = sorted(c for c in p.iterdir() if c.is_dir() and _is_run_dir(c))
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise RunReadError(f"{p} is not a tensorlog run (no run.json, step_N/ or Pass files) and holds no run")
    listing = ", ".join(r.name for r in runs[:5]) + (" ..." if len(runs) > 5 else "")
    raise RunReadError(f"{p} holds {len(runs)} runs ({listing}); pass one of them")


def _is_run_dir(p: Path) -> bool:
    from . import passdump as _foreign

    try:
        names = [c.name for c in p.iterdir()]
    except OSError:
        return False
    return any(n == "run.json" or _layout.RUN_FILE_RE.match(n) or _STEP_RE.match(n) for n in names) or _foreign.detect(p) is not None


def load_run(path: str | Path) -> Run:
    """Read a run: a tensorlog run, a PR-style ``Pass00000.pt`` dump, or an msProbe dump.

    Args:
        path (str | Path): the run directory, or an output directory that
            holds exactly one run.

    Returns:
        Run: steps, module calls in execution order, lazily loaded tensors.

    Raises:
        RunReadError: the path is missing, is not a run, or holds several.

    Example:
        >>> run = tensorlog.load_run("/tmp/tensorlog/baseline")
        >>> [c.dirname for c in run.steps[0].calls][:3]
        ['model.embed_tokens', 'model.layers.0', 'model.layers.0.input_layernorm']
    """
    from . import passdump as _foreign

    p = resolve_run_dir(path)
    foreign = _foreign.detect(p)
    if foreign is not None:
        return foreign(p)
    return _load_tensorlog_run(p)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunReadError(f"cannot read {path}: {type(e).__name__}: {_first_line(e)}") from None


def _load_tensorlog_run(p: Path) -> Run:
    problems: list[str] = []
    manifest: dict[str, Any] = {}
    rank_manifests: dict[int, dict[str, Any]] = {}
    for f in sorted(p.iterdir()):
        m = _layout.RUN_FILE_RE.match(f.name)
        if not m:
            continue
        try:
            data = _read_json(f)
            if not isinstance(data, dict):
                raise RunReadError(f"{f}: not a JSON object")
        except RunReadError as e:
            problems.append(str(e))
            continue
        if m.group(1) is None:
            manifest = data
        else:
            rank_manifests[int(m.group(1))] = data
    if rank_manifests:
        first = rank_manifests[min(rank_manifests)]
        manifest = {**first, **manifest}
        manifest["ranks"] = {r: {k: m.get(k) for k in ("complete", "incomplete_reason", "pid", "host", "steps_written")} for r, m in sorted(rank_manifests.items())}
        manifest["complete"] = all(m.get("complete") for m in rank_manifests.values())
        if not manifest["complete"]:
            bad = [f"rank {r}: {m.get('incomplete_reason')}" for r, m in sorted(rank_manifests.items()) if not m.get("complete")]
            manifest["incomplete_reason"] = "; ".join(bad)
    if not manifest:
        manifest = {"complete": False, "incomplete_reason": "run.json missing"}
    steps: dict[int, Step] = {}
    for d in sorted(p.iterdir()):
        m = _STEP_RE.match(d.name)
        if m and d.is_dir():
            steps[int(m.group(1))] = _load_step(int(m.group(1)), d, problems)
    return Run(path=p, manifest=manifest, steps=dict(sorted(steps.items())), problems=problems)


def _load_step(index: int, d: Path, problems: list[str]) -> Step:
    orders: dict[int | None, list[str]] = {}
    for f in d.iterdir():
        m = _CALLS_RE.match(f.name)
        if m:
            rank = int(m.group(1)) if m.group(1) is not None else None
            try:
                orders[rank] = [line for line in f.read_text(encoding="utf-8").splitlines() if line]
            except (OSError, UnicodeDecodeError) as e:
                problems.append(f"cannot read {f}: {e}")
    calls: list[ModuleCall] = []
    for sub in sorted(d.iterdir()):
        if sub.is_dir() and not sub.name.startswith("."):
            calls.extend(_load_call_dir(index, sub))
    ranks = sorted({c.rank for c in calls}, key=lambda r: -1 if r is None else r)
    ordered: list[ModuleCall] = []
    for rank in ranks:
        mine = [c for c in calls if c.rank == rank]
        order = orders.get(rank)
        if order is not None:
            pos = {name: i for i, name in enumerate(order)}
            mine.sort(key=lambda c: (pos.get(c.dirname, len(pos)), c.seq_start if c.seq_start is not None else 0))
        else:  # step cut short before module_calls.txt: start sequence numbers give the order
            mine.sort(key=lambda c: (c.seq_start if c.seq_start is not None else 1 << 60, c.dirname))
        for i, c in enumerate(mine):
            c.position = i
        ordered.extend(mine)
    return Step(index=index, calls=ordered)


def _load_call_dir(step: int, d: Path) -> list[ModuleCall]:
    """One ModuleCall per rank found in a module directory."""
    by_rank: dict[int | None, ModuleCall] = {}
    referenced: set[str] = set()
    for f in sorted(d.iterdir()):
        m = _META_RE.match(f.name)
        if not m:
            continue
        kind = m.group(1)
        rank = int(m.group(2)) if m.group(2) is not None else None
        call = by_rank.get(rank)
        try:
            meta = _read_json(f)
            if not isinstance(meta, dict):
                raise RunReadError(f"cannot read {f}: not a JSON object")
        except RunReadError as e:
            if call is None:
                call = by_rank[rank] = ModuleCall(step=step, dirname=d.name, module=d.name, rank=rank)
            call.errors.append(str(e))
            continue
        if call is None:
            call = by_rank[rank] = ModuleCall(step=step, dirname=d.name, module=d.name, rank=rank)
        call.module = str(meta.get("module", call.module))
        call.cls = meta.get("class", call.cls)
        call.call_index = int(meta.get("call_index", call.call_index) or 0)
        call.seq_start = meta.get("seq_start", call.seq_start)
        call.seq_end = meta.get("seq_end", call.seq_end)
        for k, v in meta.items():
            if k not in ("module", "class", "call_index", "seq_start", "seq_end", "step", "rank", "inputs", "outputs"):
                call.extra[k] = v
        records = []
        for e in meta.get(kind) or []:
            if not isinstance(e, dict):
                continue
            fname = e.get("file")
            path = None
            if isinstance(fname, str) and _layout.safe_name(fname) == fname:
                path = d / fname
                referenced.add(fname)
            key = e.get("name")
            name = Path(fname).stem if isinstance(fname, str) else _layout.tensor_file(kind, key, str(e.get("device", "value")), rank, "x")[:-2]
            records.append(TensorRecord(name=name, kind=kind, key=key, meta=e, path=path))
        setattr(call, kind, records)
    # Tensor files the json does not list: a reference-style dump, or a json lost to a crash.
    for f in sorted(d.iterdir()):
        m = _TENSOR_FILE_RE.match(f.name)
        if not m or f.name in referenced:
            continue
        rank_m = re.search(r"_rank(\d+)$", f.stem)
        rank = int(rank_m.group(1)) if rank_m else None
        call = by_rank.setdefault(rank, ModuleCall(step=step, dirname=d.name, module=d.name, rank=rank))
        rec = TensorRecord(name=f.stem, kind=m.group(1), key=None, meta={"kind": "tensor"}, path=f)
        getattr(call, m.group(1)).append(rec)
    return list(by_rank.values())
