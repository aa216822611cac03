"""Reading msProbe (``mindstudio-probe``) PyTorch dumps into tensorlog's :class:`Run` objects.

So a run logged by msProbe's ``PrecisionDebugger`` can be compared with a
tensorlog run (or with another msProbe run) by the same code. Layout written
by msProbe 26.x (``task`` "statistics" or "tensor", ``level`` L0 / L1 / mix)::

    <dump_path>/step<N>/<rank dir>/dump.json        calls and per-tensor statistics
                                   /construct.json   call -> parent call (or null)
                                   /stack.json       Python stacks (not read)
                                   /dump_tensor_data/<data_name>.pt   (task "tensor")

``<rank dir>`` is ``rank<R>`` when torch.distributed is initialised, else
``proc<pid>`` (older releases wrote a bare ``rank``). ``dump.json`` is
``{"task", "level", "framework", "dump_data_dir", "data": {key: entry}}`` with keys

* ``Module.<name>.<Class>.forward.<k>`` (L0/mix; the root module passed to
  ``start`` is never hooked, only its submodules; ``Module.<i>.<name>...``
  when a list of models is passed) and ``...backward.<k>`` and
  ``Module.<name>.<Class>.parameters_grad.<k>``;
* ``<Api>.<op>.<k>.forward`` / ``.backward`` for ops (L1/mix), ``<Api>`` being
  ``Functional``, ``Tensor``, ``Torch``, ``Distributed``, ``Aten``, ...

``k`` counts the calls of that module (or op) within the step, from 0. A forward
entry holds ``input_args`` (list), ``input_kwargs`` (dict), ``output`` (always a
list: a single output is a list of one) and, for modules, ``parameters``. Leaves
are ``{"type", "dtype", "shape", "Max", "Min", "Mean", "Norm", "requires_grad",
"md5"?, "data_name"?}`` for tensors and ``{"type", "value"}`` for Python values;
lists and dicts nest. ``data_name`` is the file in ``dump_tensor_data``
(``<key>.input.0.pt``, ``<key>.output.1.pt``, ``<key>.parameters.weight.pt``),
written with plain ``torch.save(tensor)`` and so readable with
``weights_only=True``.

Nothing here unpickles: json is parsed, tensors load lazily through
:meth:`TensorRecord.load` (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import RunReadError
from ..schema import names as _layout
from ..schema.records import RunManifest, TensorEntry
from .model import FileSource, ModuleCall, Run, Step, TensorRecord, unique_dirnames
from .safeio import INDEX_JSON, Listing, as_number, first_error, read_json

__all__ = ["is_msprobe_dump", "load_msprobe_dump"]

# Numbers are capped at 9 digits: a longer one is not a call index or a step, and Python refuses to parse
# one of over 4,300 digits.
_STEP_DIR = re.compile(r"^step(\d{1,9})$")
_RANK_DIR = re.compile(r"^(?:rank|proc)(\d{0,9})$")
_MODULE_KEY = re.compile(r"^(?:Module|Cell)\.(?P<name>.+)\.(?P<cls>[^.]+)\.(?P<dir>forward|backward)\.(?P<k>\d{1,9})$")
_API_KEY = re.compile(r"^(?P<api>(?P<type>[A-Za-z_]\w*)\.(?P<op>.+))\.(?P<k>\d{1,9})\.(?P<dir>forward|backward)$")
_DUMP_FILE = "dump.json"
_CONSTRUCT_FILE = "construct.json"
_DATA_DIR = "dump_tensor_data"
_DEVICE = "cpu"  # msProbe does not record the device; tensor files load on the CPU anyway
# msProbe value types whose tensorlog spelling (type(value).__name__) differs.
_VALUE_TYPES = {"torch.dtype": "dtype", "torch.device": "device"}


# --------------------------------------------------------------------------- layout


def _step_of(d: Path) -> int | None:
    m = _STEP_DIR.match(d.name)
    return int(m.group(1)) if m else None


def _dirs_in_step(step: int, d: Path) -> list[tuple[int, str | None, Path]]:
    """The rank directories of one ``step<N>`` dir (or the step dir itself when it holds dump.json)."""
    if (d / _DUMP_FILE).is_file():
        return [(step, None, d)]
    try:
        subs = sorted(r for r in d.iterdir() if r.is_dir() and _RANK_DIR.match(r.name))
    except OSError:
        return []
    return [(step, r.name, r) for r in subs]


def _dump_dirs(path: Path) -> list[tuple[int, str | None, Path]]:
    """``(step, rank dir name or None, dir holding dump.json)`` for every dump under ``path``.

    ``path`` may be the dump_path, one ``step<N>`` dir, or one rank dir.
    """
    if (path / _DUMP_FILE).is_file():
        step = _step_of(path)
        if step is not None:
            return [(step, None, path)]
        if _RANK_DIR.match(path.name):
            return [(_step_of(path.parent) or 0, path.name, path)]
        return [(0, None, path)]
    step = _step_of(path)
    if step is not None:
        return _dirs_in_step(step, path)
    try:
        steps = sorted(((s, d) for d in path.iterdir() if d.is_dir() and (s := _step_of(d)) is not None), key=lambda x: x[0])
    except OSError:
        return []
    return [x for s, d in steps for x in _dirs_in_step(s, d)]


def _looks_like_dump_json(f: Path) -> bool:
    """A cheap sniff of the first bytes: msProbe writes ``"task"`` first and ``"data"`` last."""
    import os

    from ..storage.tensorfile import open_regular

    try:
        fd = open_regular(f)
    except RunReadError:
        return False
    try:
        head = os.read(fd, 512)
    except OSError:
        return False
    finally:
        os.close(fd)
    return head.lstrip().startswith(b"{") and any(k in head for k in (b'"task"', b'"framework"', b'"data"'))


def is_msprobe_dump(path: Path) -> bool:
    """True when ``path`` holds an msProbe dump: ``dump.json`` in it, in ``step<N>/`` or ``step<N>/<rank>/``.

    Only stats directories and reads the head of one ``dump.json``.
    """
    path = Path(path)
    if (path / "run.json").exists():  # a tensorlog run
        return False
    for _, _, d in _dump_dirs(path):
        f = d / _DUMP_FILE
        if f.is_file() and not f.is_symlink():  # a linked one is refused when loading, as a problem of the dump
            return _looks_like_dump_json(f)
    return False


def _assign_ranks(names: set[str]) -> dict[str, int | None]:
    """``rank<R>`` -> R; a single rank dir -> None (one process); other dirs (``proc<pid>``) numbered after."""
    if len(names) <= 1:
        return {n: None for n in names}
    ranks: dict[str, int | None] = {}
    for n in sorted(names):
        m = _RANK_DIR.match(n)
        if n.startswith("rank") and m and m.group(1):
            ranks[n] = int(m.group(1))
    nxt = max((r for r in ranks.values() if r is not None), default=-1) + 1
    for n in sorted(names - set(ranks), key=lambda s: (len(s), s)):
        ranks[n] = nxt
        nxt += 1
    return ranks


# --------------------------------------------------------------------------- entries -> records


@dataclass
class _Entry:
    """One dump.json key, parsed, before it becomes a ModuleCall."""

    key: str
    module: str
    cls: str | None
    call_index: int
    backward: bool
    data: dict[str, Any]
    done: int  # index in dump.json order = completion order
    seq_start: int = 0
    seq_end: int = 0
    children: list[_Entry] = field(default_factory=list)


def _parse_key(key: str) -> tuple[str, str | None, int, bool] | None:
    """``(module, class, k, is_backward)``, or None for keys that are not calls (``parameters_grad``).

    Modules keep their name, so their dirnames match tensorlog's (``block.proj``,
    ``block.proj_1``). Ops keep the API prefix as their "module"
    (``Functional.linear``, dirname ``Functional.linear_3``): ``Tensor.add`` and
    ``Torch.add`` are different ops, and a bare ``gelu`` could collide with a
    submodule named ``gelu`` in a mix-level dump. The class of an op is its API
    type (``Functional``).
    """
    m = _MODULE_KEY.match(key)
    if m:
        return m.group("name"), m.group("cls"), int(m.group("k")), m.group("dir") == "backward"
    m = _API_KEY.match(key)
    if m:
        return m.group("api"), m.group("type"), int(m.group("k")), m.group("dir") == "backward"
    return None


def _is_leaf(v: Any) -> bool:
    return not isinstance(v, (list, dict)) or (isinstance(v, dict) and (isinstance(v.get("type"), str) or not v))


def _walk(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Leaves of a nested msProbe structure, with tensorlog's (the reference's) paths: ``(i, j)``, ``(i, key)``."""
    if isinstance(value, dict) and value.get("type") == "torch.Size" and isinstance(value.get("value"), list):
        # tensorlog walks a torch.Size like any tuple: one int per element.
        for i, v in enumerate(value["value"]):
            yield (*path, str(i)), {"type": "int", "value": v}
    elif _is_leaf(value):
        yield path, value
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, (*path, str(i)))
    else:
        for k, v in value.items():
            yield from _walk(v, (*path, str(k)))


def _inputs(args: Any, kwargs: Any) -> list[tuple[tuple[str, ...], Any]]:
    """Positional inputs by position and nesting, keyword inputs by name: as tensorlog names them."""
    out: list[tuple[tuple[str, ...], Any]] = []
    for i, a in enumerate(args if isinstance(args, list) else []):
        out.extend(_walk(a, (str(i),)))
    for k, v in (kwargs if isinstance(kwargs, dict) else {}).items():
        out.extend(_walk(v, (str(k),)))
    return out


def _outputs(output: Any) -> list[tuple[tuple[str, ...], Any]]:
    """msProbe always lists outputs; a list of one leaf is tensorlog's single output (path ``()``).

    A module that returns a 1-tuple therefore reads as a single output.
    A dict (or ModelOutput / namedtuple, which msProbe turns into dicts) keys by field.
    """
    if not isinstance(output, list):
        return [] if output is None else [((), output)]
    if len(output) == 1 and isinstance(output[0], dict) and not _is_leaf(output[0]):
        return [x for key, item in output[0].items() for x in _walk(item, (str(key),))]
    if len(output) == 1 and _is_leaf(output[0]):
        return [((), output[0])]
    return [x for i, item in enumerate(output) for x in _walk(item, (str(i),))]


def _stat(v: Any) -> float | None:
    if isinstance(v, bool):  # bool tensors: Max = any(), Min = all()
        return float(v)
    return as_number(v)


def _stats(leaf: dict[str, Any]) -> dict[str, Any] | None:
    """msProbe's Max/Min/Mean/Norm as tensorlog stats.

    ``abs_max`` is derived exactly from min and max. For a 0-dim tensor msProbe
    writes the value itself as "Norm" (it can be negative), so its absolute
    value is used. Mean/Norm are missing for integer and bool tensors; complex
    tensors get statistics of their absolute values (msProbe's choice).
    """
    mx, mn, mean, norm = (_stat(leaf.get(k)) for k in ("Max", "Min", "Mean", "Norm"))
    out: dict[str, Any] = {}
    if mn is not None:
        out["min"] = mn
    if mx is not None:
        out["max"] = mx
    if mean is not None:
        out["mean"] = mean
    if mn is not None and mx is not None:
        out["abs_max"] = max(abs(mn), abs(mx)) if not (math.isnan(mn) or math.isnan(mx)) else math.nan
    if norm is not None:
        out["l2_norm"] = abs(norm)
    for k in ("nan_count", "inf_count"):  # not written by msProbe 26 for PyTorch; kept if a release adds them
        if isinstance(leaf.get(k), int) and not isinstance(leaf.get(k), bool):
            out[k] = leaf[k]
    return out or None


def _checksum(leaf: dict[str, Any]) -> dict[str, Any] | None:
    """msProbe's ``"md5"`` field, which is not an MD5.

    summary_mode "md5" writes ``zlib.crc32`` of the tensor's raw bytes as 8 hex
    digits (releases before 26 upcast bfloat16 to float32 first); summary_mode
    "xor" writes its own 64-bit xor checksum as ``0x`` + 16 hex digits (and, for a
    0-dim tensor, the value itself, which is not kept). Neither is comparable
    with tensorlog's blake2b digests, so the algorithm is named.
    """
    v = leaf.get("md5")
    if not isinstance(v, str):
        return None
    algorithm = "msprobe-xor64" if v.startswith("0x") else "crc32"
    return {"algorithm": algorithm, "digest": v}


def _value_desc(leaf: Any) -> dict[str, Any]:
    """A Python value as tensorlog records it. JSON null is None, or a type msProbe does not describe."""
    if leaf is None:
        return {"type": "NoneType", "value": None}
    if not isinstance(leaf, dict):  # a bare field inside a described object (P2POp's "peer")
        return {"type": type(leaf).__name__, "value": _plain(leaf)}
    if not leaf:
        return {"type": "unknown", "value": None}
    t = str(leaf.get("type"))
    return {"type": _VALUE_TYPES.get(t, t), "value": _plain(leaf.get("value"))}


def _plain(v: Any) -> Any:
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)[:200]


def _is_tensor_leaf(leaf: Any) -> bool:
    return isinstance(leaf, dict) and "dtype" in leaf and "shape" in leaf and leaf.get("type") != "torch.Size"


def _tensor_fields(leaf: dict[str, Any]) -> dict[str, Any]:
    shape = leaf.get("shape")
    ok = isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    shape = shape if ok else None
    dtype = leaf.get("dtype")
    fields: dict[str, Any] = {
        "shape": shape,
        "dtype": dtype if isinstance(dtype, str) else None,
        "device": _DEVICE,
        "numel": math.prod(shape) if shape is not None else None,
        "stats": _stats(leaf),
        "checksum": _checksum(leaf),
    }
    return fields


class _DataFiles:
    """The files of one ``dump_tensor_data`` dir, listed once (links refused); names must stay inside it."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.listing = Listing(d) if d.is_dir() and not d.is_symlink() else None
        self.refused = ([f"refusing {d}: a symbolic link"] if d.is_symlink() else []) + (
            self.listing.refused if self.listing else []
        )

    def resolve(self, name: Any) -> tuple[Path | None, str | None]:
        """``(path, why not)`` for a ``data_name``."""
        if not isinstance(name, str) or _layout.safe_name(name) != name:
            return None, f"unusable data_name {str(name)[:80]!r}"
        if self.listing is None or name not in self.listing.files:
            return None, f"tensor file {name} is missing from {self.dir}"
        if not name.endswith(".pt"):  # numpy arrays are saved as .npy, which torch.load cannot read
            return None, f"{name} is not a torch file"
        return self.listing.files[name], None


def _record(kind: str, path: tuple[str, ...], leaf: Any, rank: int | None, files: _DataFiles, errors: list[str]) -> TensorRecord:
    key = "_".join(path) if path else None
    stem = _layout.tensor_stem(kind, path)
    if not _is_tensor_leaf(leaf):
        name = f"{stem}_value" + ("" if rank is None else f"_rank{rank}")
        entry = TensorEntry.model_validate(
            {"name": name, "kind": kind, "key": key, "path": list(path), "tensor": False, "value": _value_desc(leaf)}
        )
        return TensorRecord(entry=entry)
    name = _layout.tensor_file(stem, _DEVICE, rank, "x")[:-2]
    fields = {"name": name, "kind": kind, "key": key, "path": list(path), **_tensor_fields(leaf)}
    source, error = None, None
    if fields["shape"] is None or fields["dtype"] is None:
        error = (
            f"msProbe entry {name}: shape {str(leaf.get('shape'))[:40]!r} or dtype {str(leaf.get('dtype'))[:40]!r} is not valid"
        )
        errors.append(error)
    if "data_name" in leaf:
        found, why = files.resolve(leaf["data_name"])
        if why:
            fields["skipped"] = why
            errors.append(why)
        elif found is not None:
            source = FileSource(found)
    try:
        entry = TensorEntry.model_validate(fields)
    except ValidationError as e:
        error = f"msProbe entry {name}: {first_error(e)}"
        errors.append(error)
        entry = TensorEntry(name=name, kind=kind, key=key, path=list(path))  # type: ignore[arg-type]
    return TensorRecord(entry=entry, source=source if error is None else None, error=error)


# --------------------------------------------------------------------------- order


def _nest(entries: list[_Entry], parents: dict[str, Any], seq0: int) -> tuple[list[_Entry], int]:
    """Start order and nested seq_start/seq_end, rebuilt from completion order plus parents.

    msProbe writes an entry when the call ends (it even moves a module's key to
    the end of dump.json in its forward hook), so dump.json order is completion
    order: children before their parents. construct.json names each call's
    parent call; a pre-order walk of that tree, siblings in completion order
    (siblings do not overlap), gives the start order, and one counter ticked on
    entry and exit gives tensorlog-style nested sequence numbers. A parent that
    is not a loaded entry (the root model, "optimizer", a filtered module), or
    one that completed before its child (inconsistent), makes the call a root.
    Without construct.json (level L1 writes ``{}``) every call is a root and the
    order stays completion order, which for leaf ops is also start order.
    """
    by_key = {e.key: e for e in entries}
    roots: list[_Entry] = []
    for e in entries:
        p = parents.get(e.key)
        if isinstance(p, list):  # megatron writes [parent, micro_step]
            p = p[0] if p else None
        parent = by_key.get(p) if isinstance(p, str) else None
        if parent is not None and parent.done > e.done:
            parent.children.append(e)
        else:
            roots.append(e)
    order: list[_Entry] = []
    seq = seq0
    for root in roots:
        root.seq_start, seq = seq, seq + 1
        order.append(root)
        stack: list[tuple[_Entry, Iterator[_Entry]]] = [(root, iter(root.children))]
        while stack:
            node, it = stack[-1]
            child = next(it, None)
            if child is None:
                node.seq_end, seq = seq, seq + 1
                stack.pop()
            else:
                child.seq_start, seq = seq, seq + 1
                order.append(child)
                stack.append((child, iter(child.children)))
    return order, seq


# --------------------------------------------------------------------------- loading


def _read_json(f: Path) -> Any:
    return read_json(f, INDEX_JSON)


def _load_rank_dir(
    step: int, rank: int | None, d: Path, include_backward: bool, problems: list[str], info: dict[str, Any]
) -> tuple[list[ModuleCall], dict[str, int]]:
    """The calls of one ``dump.json``, in start order, and counts of the entries left out."""
    skipped = {"backward": 0, "parameters_grad": 0, "unrecognised": 0}
    try:
        doc = _read_json(d / _DUMP_FILE)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
            raise RunReadError(f'{d / _DUMP_FILE}: not an msProbe dump.json (no "data" object)')
    except RunReadError as e:
        problems.append(str(e))
        return [], skipped
    for name in ("task", "level", "framework"):
        if name in doc:
            info.setdefault(name, doc[name])
    parents: dict[str, Any] = {}
    if (d / _CONSTRUCT_FILE).is_file():
        try:
            c = _read_json(d / _CONSTRUCT_FILE)
            parents = c if isinstance(c, dict) else {}
        except RunReadError as err:
            problems.append(f"{err} (call nesting unknown: calls kept in completion order)")
    forward: list[_Entry] = []
    backward: list[_Entry] = []
    for i, (key, data) in enumerate(doc["data"].items()):
        if not isinstance(data, dict):
            problems.append(f"{d / _DUMP_FILE}: entry {key[:80]!r} is a {type(data).__name__}, not an object")
            continue
        parsed = _parse_key(key)
        if parsed is None:
            skipped["parameters_grad" if ".parameters_grad." in key else "unrecognised"] += 1
            continue
        module, cls, call_index, is_bw = parsed
        if is_bw and not include_backward:
            skipped["backward"] += 1
            continue
        entry = _Entry(key, module, cls, call_index, is_bw, data if isinstance(data, dict) else {}, i)
        (backward if is_bw else forward).append(entry)
    order, seq = _nest(forward, parents, 0)
    bw_order, _ = _nest(backward, parents, seq)  # backward runs after the forward of the step
    files = _DataFiles(d / _DATA_DIR)
    problems.extend(files.refused)
    return [_to_call(e, step, rank, pos, files) for pos, e in enumerate(order + bw_order)], skipped


def _to_call(e: _Entry, step: int, rank: int | None, position: int, files: _DataFiles) -> ModuleCall:
    ins: list[tuple[tuple[str, ...], Any]]
    outs: list[tuple[tuple[str, ...], Any]]
    if e.backward:  # msProbe's backward "input" is the grad arriving at the outputs, "output" the grad produced
        ins = [((str(i),), v) for i, v in enumerate(_leaves(e.data.get("input")))]
        outs = [((str(i),), v) for i, v in enumerate(_leaves(e.data.get("output")))]
    else:
        ins = list(_inputs(e.data.get("input_args"), e.data.get("input_kwargs")))
        outs = _outputs(e.data.get("output"))
    extra: dict[str, Any] = {"msprobe_key": e.key}
    params = e.data.get("parameters")
    if isinstance(params, dict) and params:
        extra["parameters"] = {p: _tensor_fields(v) if _is_tensor_leaf(v) else _value_desc(v) for p, v in params.items()}
    errors: list[str] = []
    return ModuleCall(
        step=step,
        dirname=_layout.call_dir(e.module, e.call_index) + (".backward" if e.backward else ""),
        module=e.module,
        call_index=e.call_index,
        cls=e.cls,
        seq_start=e.seq_start,
        seq_end=e.seq_end,
        rank=rank,
        position=position,
        inputs=[_record("inputs", k, v, rank, files, errors) for k, v in ins],
        outputs=[_record("outputs", k, v, rank, files, errors) for k, v in outs],
        errors=errors,
        extra=extra,
    )


def _leaves(value: Any) -> list[Any]:
    return [v for _, v in _walk(value, ())] if isinstance(value, list) else []


def load_msprobe_dump(path: Path, *, include_backward: bool = False) -> Run:
    """Read an msProbe dump (dump_path, one ``step<N>`` dir, or one rank dir) as a :class:`Run`.

    One :class:`ModuleCall` per forward entry of ``dump.json``, in start order
    (see :func:`_nest`). Backward and ``parameters_grad`` entries are left out
    by default, as tensorlog logs forward calls only; with ``include_backward``
    backward entries become calls named ``<dirname>.backward`` after the
    forward calls. Module parameters are kept as json in ``call.extra["parameters"]``.

    Raises:
        RunReadError: ``path`` holds no msProbe dump.
    """
    path = Path(path)
    dirs = _dump_dirs(path)
    if not dirs:
        raise RunReadError(f"{path} is not an msProbe dump (no dump.json, step<N>/ or step<N>/<rank>/)")
    ranks = _assign_ranks({n for _, n, _ in dirs if n is not None})
    problems: list[str] = []
    info: dict[str, Any] = {}
    steps: dict[int, Step] = {}
    for step, rank_name, d in dirs:
        rank = ranks.get(rank_name) if rank_name is not None else None
        if not (d / _DUMP_FILE).is_file() or (d / _DUMP_FILE).is_symlink():
            problems.append(f"{d}: no {_DUMP_FILE} (dump cut short?)")
            continue
        calls, skipped = _load_rank_dir(step, rank, d, include_backward, problems, info)
        s = steps.setdefault(step, Step(index=step, calls=[], extra={"msprobe_dirs": {}, "skipped_entries": {}}))
        s.calls.extend(calls)
        s.extra["msprobe_dirs"][rank_name or "."] = str(d)
        for k, v in skipped.items():
            s.extra["skipped_entries"][k] = s.extra["skipped_entries"].get(k, 0) + v
    for s in steps.values():  # by rank (None first), each rank in start order, like tensorlog runs
        s.calls.sort(key=lambda c: (-1 if c.rank is None else c.rank, c.position))
        unique_dirnames(s.calls)
    manifest = RunManifest.model_validate(
        {
            "layout": "msprobe",
            "layout_version": 0,
            "complete": not problems,
            "msprobe": {k: v for k, v in info.items() if isinstance(v, str)},
            "world_size": max(1, len(ranks)),
            "ranks": {
                r: {"dir": n, **({"pid": int(n[4:])} if n.startswith("proc") and n[4:].isdigit() and len(n) < 14 else {})}
                for n, r in sorted(ranks.items())
                if r is not None
            },
            "incomplete_reason": ("; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")) if problems else None,
        }
    )
    return Run(path=path, manifest=manifest, steps=dict(sorted(steps.items())), layout="msprobe", problems=problems)
