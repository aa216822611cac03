"""Reader of tensorlog runs (both layouts, and tensorlog 0.1's) and of the reference logger's own dumps.

A step is read from its index (``tensorlog_index.json``, written when the step
finished) when there is one. Without it (a reference dump, a step cut short by
a crash, a tensorlog 0.1 run) the module directories themselves are read:
tensor files by name, and the per-call json files for what they say.
Unreadable or refused files are reported on what they belong to (the call, or
the run's ``problems``), never raised, so a damaged run still loads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from ..errors import RunReadError
from ..schema import names
from ..schema.records import CallEntry, Checksum, ModuleNode, RunManifest, Stats, StepIndex, StepInfo, TensorEntry, ValueDesc
from ..storage.tensorfile import read_limited, read_safetensors_header
from .model import FileSource, ModuleCall, PackedSource, Run, Source, Step, TensorRecord, listed_ranks, rank_entry
from .safeio import INDEX_JSON, SMALL_JSON, Listing, first_error, read_json, read_model

__all__ = ["is_tensorlog_run", "load_tensorlog_run"]

_DEVICE_TAIL = re.compile(
    r"^(?P<rest>.*?)_?(?P<dev>cpu|meta|mps|(?:cuda|xpu|hpu|npu|privateuseone)(?:_\d+)?)(?:_rank(?P<rank>\d+))?$"
)


def is_tensorlog_run(listing: Listing) -> bool:
    return any(names.RUN_FILE_RE.match(n) for n in listing.files) or any(names.STEP_DIR_RE.match(n) for n in listing.dirs)


def load_tensorlog_run(p: Path, listing: Listing) -> Run:
    """Read a run; nothing is written or removed (a writer's temporary files are its own to sweep)."""
    run, _, steps = tensorlog_steps(p, listing, [])
    run.steps = {s.index: s for s in steps}
    incomplete = [f"step {s.index}: {s.incomplete_reason}" for s in run.steps.values() if not s.complete]
    if not run.manifest.tensorlog_version and any(s.extra.get("indexed_ranks") for s in run.steps.values()):
        incomplete.insert(0, "its run.json is missing (tensorlog's step indexes are here)")
    if incomplete and run.complete:
        run.manifest = run.manifest.model_copy(update={"complete": False, "incomplete_reason": "; ".join(incomplete[:3])})
    run.problems.extend(manifest_disagreements(run))
    return run


def manifest_disagreements(run: Run) -> list[str]:
    """Where ``run.json`` and the step indexes on disk disagree: the disk is what a compare reads, so it wins, and
    the disagreement is a problem (a run.json that lists steps nobody can read, or lags behind what is there)."""
    m = run.manifest
    if m.layout_version < 2 or not m.tensorlog_version:
        return []
    listed = listed_ranks(m)
    per_rank: dict[int | None, tuple[Any, Any]] = {r: (e.steps_written, e.removed_through) for r, e in listed.items()}
    if not per_rank:
        per_rank[None] = (m.steps_done(), m.removed_through)
    out = []
    for rank, (written, removed) in sorted(per_rank.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        if not isinstance(written, list):
            continue
        gone = removed if isinstance(removed, int) else -1
        claimed = {s for s in written if isinstance(s, int) and s > gone}
        on_disk = {i for i, s in run.steps.items() if i > gone and rank in s.extra.get("indexed_ranks", ())}
        who = f" (rank {rank})" if rank is not None else ""
        if missing := sorted(claimed - on_disk):
            out.append(f"run.json{who} lists step(s) {_some(missing)} as written, but their index is not on disk")
        if m.complete and (unlisted := sorted(on_disk - claimed)):
            out.append(f"run.json{who} says the run is complete, but step(s) {_some(unlisted)} on disk are not in it")
    return out


def _some(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:8])) + (f" and {len(steps) - 8} more" if len(steps) > 8 else "")


def tensorlog_steps(p: Path, listing: Listing, problems: list[str]) -> tuple[Run, list[int], Iterator[Step]]:
    """The run without its steps, their numbers, and the steps read one at a time (memory: one step).

    What cannot be read is appended to ``problems`` as the steps are read."""
    problems.extend(listing.refused)
    manifest = _with_journals(_read_manifests(p, listing, problems), listing, problems)
    legacy = _legacy_step_info(manifest)
    dirs = sorted((int(m.group(1)), d) for name, d in listing.dirs.items() if (m := names.STEP_DIR_RE.match(name)))
    shell = Run(path=p, manifest=manifest, steps={}, problems=problems, modules=_module_tree(listing, problems))
    return shell, [i for i, _ in dirs], (_load_step(i, d, manifest, problems, legacy.get(i)) for i, d in dirs)


def _module_tree(listing: Listing, problems: list[str]) -> dict[str, str] | None:
    f = next((listing.files[n] for n in sorted(listing.files) if names.MODULES_FILE_RE.match(n)), None)
    if f is None:
        return None
    try:
        tree = TypeAdapter(dict[str, ModuleNode]).validate_json(read_limited(f, SMALL_JSON))
    except (RunReadError, ValidationError) as e:
        problems.append(f"cannot read {f}: {first_error(e) if isinstance(e, ValidationError) else e}")
        return None
    return {name: node.class_ for name, node in tree.items()}


def _read_manifests(p: Path, listing: Listing, problems: list[str]) -> RunManifest:
    problems.extend(f"{p / n}: not a regular file" for n in listing.dirs if names.RUN_FILE_RE.match(n))
    main: RunManifest | None = None
    by_rank: dict[int, RunManifest] = {}
    for name, f in sorted(listing.files.items()):
        m = names.RUN_FILE_RE.match(name)
        if not m:
            continue
        try:
            data = read_model(f, RunManifest)
        except RunReadError as e:
            problems.append(str(e))
            continue
        if m.group(1) is None:
            main = data
        else:
            by_rank[int(m.group(1))] = data
    if by_rank:
        first = by_rank[min(by_rank)]
        base = main or first
        bad = [f"rank {r}: {m.incomplete_reason}" for r, m in sorted(by_rank.items()) if not m.complete]
        ranks = {r: rank_entry(m) for r, m in sorted(by_rank.items())}
        return base.model_copy(
            update={
                "complete": not bad and (main is None or main.complete),
                "incomplete_reason": "; ".join(bad) or None,
                "world_size": base.world_size or len(by_rank),
                "ranks": ranks,
            }
        )
    if main is not None:
        return main
    has_run_file = any(names.RUN_FILE_RE.match(n) for n in listing.files)
    reason = "run.json unreadable" if has_run_file else "no run.json (a reference dump, or a run that never started cleanly)"
    return RunManifest(
        complete=not has_run_file, incomplete_reason=None if not has_run_file else reason, layout_version=0, tensorlog_version=""
    )


def _with_journals(m: RunManifest, listing: Listing, problems: list[str]) -> RunManifest:
    """``steps_written`` with what each rank's journal adds: the journal gets a line as each step ends, while
    ``run.json`` is rewritten at most once a second (a torn last line, from a kill mid-write, is ignored)."""
    journals: dict[int | None, set[int]] = {}
    for name, f in listing.files.items():
        jm = names.JOURNAL_FILE_RE.match(name)
        if not jm:
            continue
        try:
            data = read_limited(f, INDEX_JSON)
        except RunReadError as e:
            problems.append(str(e))
            continue
        journals[int(jm.group(1)) if jm.group(1) is not None else None] = names.journal_steps(data)
    if not journals:
        return m
    ranks = listed_ranks(m)
    if ranks:
        merged = {
            r: e.model_copy(update={"steps_written": sorted(set(e.steps_written or []) | journals.get(r, set()))})
            for r, e in ranks.items()
        }
        return m.model_copy(update={"ranks": merged})
    steps = set(m.steps_done()) | journals.get(None, set()) | journals.get(m.rank, set())
    return m.model_copy(update={"steps_written": sorted(steps)})


def _legacy_step_info(manifest: RunManifest) -> dict[int, StepInfo]:
    """tensorlog 0.1 kept each step's request layout in run.json."""
    steps = (manifest.model_extra or {}).get("steps")
    out: dict[int, StepInfo] = {}
    if isinstance(steps, dict):
        for k, v in steps.items():
            try:
                out[int(k)] = StepInfo.model_validate(v)
            except (ValueError, ValidationError):
                continue
    return out


def _load_step(index: int, d: Path, manifest: RunManifest, problems: list[str], legacy: StepInfo | None) -> Step:
    listing = Listing(d)
    problems.extend(listing.refused)
    problems.extend(f"{d / n}: not a regular file" for n in listing.dirs if names.is_step_file(n))
    indexes: dict[int | None, StepIndex] = {}
    for name, f in listing.files.items():
        m = names.INDEX_FILE_RE.match(name)
        if m:
            rank = int(m.group(1)) if m.group(1) is not None else None
            try:
                indexes[rank] = read_model(f, StepIndex, INDEX_JSON)
            except RunReadError as e:
                problems.append(str(e))
                continue
            if indexes[rank].step != index:  # moved or copied from another step: which is right cannot be known
                problems.append(f"{f}: says it is step {indexes.pop(rank).step}, but lies in step_{index}")
    calls: list[ModuleCall] = []
    step = Step(index=index, calls=calls, info=legacy)
    indexed_ranks = set(indexes)
    for rank, idx in sorted(indexes.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        calls.extend(_calls_from_index(index, d, listing, idx, problems))
        if idx.info is not None:
            step.info = idx.info if rank in (None, 0) or step.info is None else step.info
        if not idx.complete:
            step.complete, step.incomplete_reason = False, idx.incomplete_reason or "cut short"
        elif idx.dropped and step.complete:  # on_backpressure: drop left calls out: the step is not whole
            what = ", ".join(sorted({d.module for d in idx.dropped})[:3])
            step.complete, step.incomplete_reason = False, f"{len(idx.dropped)} call(s) left out by back-pressure ({what})"
    step.extra["indexed_ranks"] = sorted(indexed_ranks, key=lambda r: -1 if r is None else r)
    scanned = [c for c in _calls_from_dirs(index, d, listing, indexed_ranks, problems) if not _removed(manifest, c.rank, index)]
    if not indexes and not scanned and manifest.layout_version >= 2 and not _removed(manifest, None, index):
        step.complete, step.incomplete_reason = False, "cut short: no index (a step's index is written when it ends)"
    if scanned and manifest.layout_version >= 2:
        ranks = sorted({c.rank for c in scanned}, key=lambda r: -1 if r is None else r)
        step.complete = False
        step.incomplete_reason = "cut short before its index was written" + (
            f" (rank {', '.join(map(str, ranks))})" if ranks != [None] else ""
        )
    calls.extend(scanned)
    return step


def _removed(manifest: RunManifest, rank: int | None, step: int) -> bool:
    """Retention removed this rank's data of ``step``: what is left of it was being deleted, not cut short."""
    entry = listed_ranks(manifest).get(rank) if rank is not None else None
    through = entry.removed_through if entry is not None else manifest.removed_through
    return isinstance(through, int) and step <= through


def _safe_relative(rel: str, listing: Listing) -> tuple[str, str] | None:
    """``<dirname>/<file>`` inside the step, or None for anything else (an absolute path, ``..``, a link)."""
    parts = rel.split("/")
    if len(parts) != 2 or any(names.safe_name(x) != x for x in parts):
        return None
    if parts[0] not in listing.dirs:
        return None
    return parts[0], parts[1]


def _calls_from_index(step: int, d: Path, listing: Listing, idx: StepIndex, problems: list[str]) -> list[ModuleCall]:
    packed: tuple[Path, dict[str, Any], int] | None = None
    out: list[ModuleCall] = []
    dirs: dict[str, Listing] = {}
    seen: set[str] = set()
    for pos, c in enumerate(idx.calls):
        if c.dirname in seen:  # one call directory described twice: which is right cannot be known
            problems.append(f"{d}: the step index lists {c.dirname!r} twice; the second is ignored")
            continue
        seen.add(c.dirname)
        call = _call(step, c, idx.rank, pos)
        sub = None
        if c.dirname in listing.dirs:
            sub = dirs.get(c.dirname)
            if sub is None:
                sub = dirs[c.dirname] = Listing(listing.dirs[c.dirname])
                call.errors.extend(sub.refused)  # a link or special file among the call's files: refused
        for e in c.tensors:
            source: Source | None = None
            error: str | None = None
            if e.file is not None:
                where = _safe_relative(e.file, listing)
                if where is None or sub is None or where[0] != c.dirname or where[1] not in sub.files:
                    error = f"{d}: file {e.file!r} named by the index is missing, or refused (outside the call's directory, or a link)"
                else:
                    source = FileSource(d / where[0] / where[1])
            elif e.packed is not None:
                if packed is None or packed[0].name != e.packed.file:
                    packed = _packed_header(d, listing, e.packed.file, problems)
                if packed is None:
                    error = f"{d}: packed file {e.packed.file!r} is missing or unreadable"
                else:
                    source = PackedSource(packed[0], e.packed.key, packed[1], packed[2])
            rec = TensorRecord(entry=e, source=source, error=error)
            if error:
                call.errors.append(error)
            _add(call, rec)
        out.append(call)
    return out


def _packed_header(d: Path, listing: Listing, name: str, problems: list[str]) -> tuple[Path, dict[str, Any], int] | None:
    f = listing.files.get(name)
    if f is None:
        return None
    try:
        header, start = read_safetensors_header(f, INDEX_JSON)
    except RunReadError as e:
        problems.append(str(e))
        return None
    return f, header, start


def _call(step: int, c: CallEntry, rank: int | None, pos: int) -> ModuleCall:
    return ModuleCall(
        step=step,
        dirname=c.dirname,
        module=c.module,
        call_index=c.call_index,
        cls=c.class_name or None,
        seq_start=c.seq_start,
        seq_end=c.seq_end,
        rank=rank,
        position=pos,
        structure=c.structure.model_dump() if c.structure is not None else None,
        extra={"backward": c.backward, "grafted": c.grafted} if (c.backward or c.grafted) else {},
    )


def _add(call: ModuleCall, rec: TensorRecord) -> None:
    {"inputs": call.inputs, "outputs": call.outputs, "post_fwd_inputs": call.post_fwd_inputs}[rec.kind].append(rec)


# -- without an index: module directories as they lie ---------------------------------------


def _calls_from_dirs(step: int, d: Path, listing: Listing, skip_ranks: set[int | None], problems: list[str]) -> list[ModuleCall]:
    orders: dict[int | None, list[str]] = {}
    for name, f in listing.files.items():
        m = names.CALLS_FILE_RE.match(name)
        if m:
            rank = int(m.group(1)) if m.group(1) is not None else None
            if rank in skip_ranks:
                continue
            try:
                orders[rank] = [ln for ln in read_limited(f, 64 << 20).decode("utf-8", "replace").splitlines() if ln]
            except RunReadError as e:
                problems.append(str(e))
    calls: list[ModuleCall] = []
    for _, sub in sorted(listing.dirs.items()):
        calls.extend(_load_call_dir(step, sub, skip_ranks, problems))
    ranks = sorted({c.rank for c in calls}, key=lambda r: -1 if r is None else r)
    ordered: list[ModuleCall] = []
    for rank in ranks:
        mine = [c for c in calls if c.rank == rank]
        order = orders.get(rank)
        if order is not None:
            pos = {n: i for i, n in enumerate(order)}
            mine.sort(key=lambda c: (pos.get(c.dirname, len(pos)), c.seq_start if c.seq_start is not None else 0))
        else:
            mine.sort(key=lambda c: (c.seq_start if c.seq_start is not None else 1 << 60, c.dirname))
        for i, c in enumerate(mine):
            c.position = i
        ordered.extend(mine)
    return ordered


class _LegacyEntry(BaseModel):
    """A tensor or value entry of tensorlog 0.1's per-call json (lax: it wrote NaN as the string "nan")."""

    model_config = ConfigDict(extra="ignore")
    name: str | None = None
    kind: str = "tensor"
    file: str | None = None
    shape: list[int] | None = None
    dtype: str | None = None
    device: str | None = None
    stride: list[int] | None = None
    numel: int | None = None
    stats: dict[str, float | int | str | None] | None = None
    values: Any = None
    checksum: dict[str, str] | str | None = None
    skipped: str | None = None
    parameter: bool = False
    type: str | None = None
    value: Any = None


class _LegacyCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    module: str
    call_index: int = 0
    seq_start: int | None = None
    seq_end: int | None = None
    inputs: list[_LegacyEntry] | None = None
    outputs: list[_LegacyEntry] | None = None
    structure: dict[str, Any] | None = None


def _load_call_dir(step: int, d: Path, skip_ranks: set[int | None], problems: list[str]) -> list[ModuleCall]:
    """One ModuleCall per rank found in a module directory that no index describes."""
    listing = Listing(d)
    by_rank: dict[int | None, ModuleCall] = {}
    referenced: set[str] = set()

    def call_for(rank: int | None) -> ModuleCall:
        c = by_rank.get(rank)
        if c is None:
            c = by_rank[rank] = ModuleCall(step=step, dirname=d.name, module=d.name, rank=rank)
        return c

    described: dict[tuple[int | None, str], dict[str | None, tuple[list[int], str, int]]] = {}
    for err in listing.refused:
        call_for(None).errors.append(err)
    for name, f in sorted(listing.files.items()):
        m = names.REF_META_RE.match(name)
        if not m:
            continue
        kind, rank = m.group(1), (int(m.group(2)) if m.group(2) is not None else None)
        if rank in skip_ranks:
            continue
        try:
            doc = read_json(f)
        except RunReadError as e:
            call_for(rank).errors.append(str(e))
            continue
        if isinstance(doc, dict) and "module" in doc and isinstance(doc.get(kind), list):
            try:
                legacy = _LegacyCall.model_validate(doc)
            except ValidationError as e:
                call_for(rank).errors.append(f"cannot read {f}: {first_error(e)}")
                continue
            _apply_legacy(call_for(rank), kind, legacy, doc, d, listing, referenced, rank)
        elif kind == "outputs" and isinstance(doc, dict) and "skipped" in doc and "type" not in doc:
            pass  # the reference's sidecar for a single output over max_tensor_size
        elif not (isinstance(doc, dict) and isinstance(doc.get("type"), str)) and doc is not None:
            call_for(rank).errors.append(f"cannot read {f}: neither the reference's structure nor tensorlog's record")
        else:
            described[(rank, kind)] = _described_leaves(doc)
    for name, f in sorted(listing.files.items()):
        m = names.TENSOR_FILE_RE.match(name)
        if not m or name in referenced:
            continue
        kind = m.group(1)
        stem = name.rsplit(".", 1)[0]
        tail = _DEVICE_TAIL.match(stem[len(kind) :].lstrip("_")) if len(stem) > len(kind) else None
        rank = int(tail.group("rank")) if tail and tail.group("rank") else None
        if rank in skip_ranks:
            continue
        key = (tail.group("rest") or None) if tail else None
        device = (
            tail.group("dev").replace("_", ":", 1) if tail and "_" in tail.group("dev") else (tail.group("dev") if tail else None)
        )
        shape, dtype, numel = described.get((rank, kind), {}).get(key, (None, None, None))
        entry = TensorEntry.model_construct(
            name=stem,
            kind=kind,
            key=key,
            path=key.split("_") if key else [],
            tensor=True,
            device=device,
            shape=shape,
            dtype=dtype,
            stride=None,
            numel=numel,
            stats=None,
            values=None,
            checksum=None,
            skipped=None,
            file=None,
            packed=None,
            parameter=False,
            value=None,
        )
        _add(call_for(rank), TensorRecord(entry=entry, source=FileSource(f)))
    return list(by_rank.values())


def _described_leaves(doc: Any) -> dict[str | None, tuple[list[int], str, int]]:
    """Leaf key (as the tensor files name it) -> (shape, dtype, numel), from the reference's structure json.

    A dump without tensorlog's index says what its tensors are only here. What does not look like a
    tensor's description is left out: the file's own header decides its data, this only labels it.
    """
    out: dict[str | None, tuple[list[int], str, int]] = {}

    def walk(node: Any, path: list[str]) -> None:
        if not isinstance(node, dict) or len(out) > 100_000:
            return
        kind, items = node.get("type"), node.get("items")
        if kind == "tensor":
            shape, dtype, numel = node.get("shape"), node.get("dtype"), node.get("numel")
            ok = (
                isinstance(shape, list)
                and len(shape) <= 64
                and all(type(d) is int and 0 <= d < 1 << 62 for d in shape)
                and isinstance(dtype, str)
                and type(numel) is int
            )
            if ok:
                out["_".join(path) or None] = (list(shape), str(dtype), int(numel))  # type: ignore[arg-type]
        elif kind in ("tuple", "list") and isinstance(items, list):
            for i, item in enumerate(items):
                walk(item, [*path, str(i)])
        elif kind == "dict" and isinstance(items, dict):
            for k, item in items.items():
                walk(item, [*path, str(k)])

    walk(doc, [])
    return out


def _apply_legacy(
    call: ModuleCall,
    kind: str,
    legacy: _LegacyCall,
    doc: dict[str, Any],
    d: Path,
    listing: Listing,
    referenced: set[str],
    rank: int | None,
) -> None:
    call.module = legacy.module
    call.call_index = legacy.call_index
    call.cls = doc.get("class") if isinstance(doc.get("class"), str) else call.cls
    call.seq_start = legacy.seq_start if legacy.seq_start is not None else call.seq_start
    call.seq_end = legacy.seq_end if legacy.seq_end is not None else call.seq_end
    if kind == "inputs" and legacy.structure is not None:
        call.structure = _legacy_structure(legacy.structure)
    for e in getattr(legacy, kind) or []:
        source, error = None, None
        if e.file is not None:
            if names.safe_name(e.file) != e.file or e.file not in listing.files:
                error = f"{d}: tensor file {e.file!r} is missing or refused"
            else:
                source = FileSource(listing.files[e.file])
                referenced.add(e.file)
        if _bad_counts(e.stats):
            error = f"{d}: the statistics of {e.name!r} hold a NaN/Inf count that is not a finite number; refused"
        key = e.name
        stem_key = key.replace(".", "_") if key else None
        if e.file:
            name = e.file.rsplit(".", 1)[0]
        else:
            name = names.tensor_file(
                names.tensor_stem(kind, tuple(stem_key.split("_")) if stem_key else ()),
                "value" if e.kind == "value" else (e.device or "cpu"),
                rank,
                "x",
            )[:-2]
        entry = TensorEntry.model_construct(
            name=name,
            kind=kind,
            key=stem_key,
            path=key.split(".") if key else [],
            tensor=e.kind != "value",
            shape=e.shape,
            dtype=e.dtype,
            device=e.device,
            stride=e.stride,
            numel=e.numel,
            stats=_legacy_stats(e.stats),
            values=e.values,
            checksum=_legacy_checksum(e.checksum),
            skipped=e.skipped,
            file=None,
            packed=None,
            parameter=e.parameter,
            value=ValueDesc.model_construct(
                type=e.type or "unknown",
                value=e.value if isinstance(e.value, (str, int, float, bool)) or e.value is None else str(e.value),
                cls=None,
            )
            if e.kind == "value"
            else None,
        )
        rec = TensorRecord(entry=entry, source=source, error=error)
        if error:
            call.errors.append(error)
        _add(call, rec)


def _legacy_structure(s: dict[str, Any]) -> dict[str, Any]:
    """0.1 keyed leaves ``0``, ``1``, ``hidden_states.0``; the index keys them ``0``, ``hidden_states_0``."""

    def conv(node: Any) -> Any:
        if isinstance(node, list):
            return [conv(x) for x in node]
        if isinstance(node, dict):
            return {k: conv(v) for k, v in node.items()}
        return str(node).replace(".", "_")

    return {"args": conv(s.get("args", [])), "kwargs": conv(s.get("kwargs", {})), "tuples": ["*"]}  # 0.1 rebuilt tuples


def _bad_counts(stats: dict[str, Any] | None) -> bool:
    counts = [v for k, v in (stats or {}).items() if k.endswith("_count")]
    return any(isinstance(v, float) and not math.isfinite(v) for v in counts)


def _legacy_stats(stats: dict[str, Any] | None) -> Stats | None:
    if not stats:
        return None
    out: dict[str, Any] = {}
    for k, v in stats.items():
        if k.endswith("_count"):
            finite = isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))
            out[k] = int(v) if finite and not isinstance(v, bool) else 0
        else:
            try:
                out[k] = float(v) if v is not None else None
            except (TypeError, ValueError):
                out[k] = None
    try:
        return Stats.model_validate(out)
    except ValidationError:
        return None


def _legacy_checksum(c: Any) -> Checksum | None:
    if isinstance(c, dict) and isinstance(c.get("digest"), str):
        return Checksum(algorithm=str(c.get("algorithm") or "unknown"), digest=c["digest"])
    if isinstance(c, str):
        return Checksum(algorithm="unknown", digest=c)
    return None
