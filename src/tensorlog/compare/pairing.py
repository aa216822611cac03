"""Pairing one module call's tensors across two runs, and the per-tensor and per-module verdicts."""

from __future__ import annotations

from typing import Any, Literal

from ..errors import AlignmentError, RunReadError
from ..formats import ModuleCall, TensorRecord
from ..formats.model import DerivedSource
from .align.virtual import RowsMissing
from .metrics import Column, TensorMetrics, Tolerance, columns, compare_stats, compare_tensors, rounding_budget
from .results import ModuleResult, ModuleVerdict, TensorResult

__all__ = ["module_result", "pair_tensors"]


def compare_pair(r1: TensorRecord, r2: TensorRecord, step: int, module: str, rank: int | None, tol: Tolerance) -> TensorResult:
    base: dict[str, Any] = dict(
        step=step,
        module=module,
        rank=rank,
        name=r1.name,
        kind=r1.kind,
        shape1=list(r1.shape) if r1.shape is not None else None,
        shape2=list(r2.shape) if r2.shape is not None else None,
        dtype1=r1.dtype,
        dtype2=r2.dtype,
        mapping=_mapping_note(r1, r2),
    )
    if not r1.is_tensor or not r2.is_tensor:
        if r1.is_tensor != r2.is_tensor:
            return TensorResult(
                **base, status="value_mismatch", method="value", note="a tensor on one side, a value on the other"
            )
        v1 = r1.entry.value.model_dump() if r1.entry.value is not None else {}
        v2 = r2.entry.value.model_dump() if r2.entry.value is not None else {}
        return TensorResult(
            **base,
            status="match" if v1 == v2 else "value_mismatch",
            method="value",
            note=None if v1 == v2 else f"{v1.get('value')!r} vs {v2.get('value')!r}",
        )
    if r1.shape is not None and r2.shape is not None and r1.shape != r2.shape and not (r1.has_data and r2.has_data):
        return TensorResult(**base, status="shape_mismatch", method="none", note=f"shape {list(r1.shape)} vs {list(r2.shape)}")
    note = None if r1.dtype == r2.dtype else f"dtype {r1.dtype} vs {r2.dtype}; compared in float64"
    if r1.has_data and r2.has_data:
        try:
            a, b = r1.load(), r2.load()
        except RunReadError as e:
            return TensorResult(**base, status="unreadable", method="none", note=str(e))
        except RowsMissing as e:  # rows only run 1 has: on one side, as a call only one run logged would be
            return TensorResult(**base, status="only_in_1", method="none", note=str(e))
        except AlignmentError as e:  # alignment could not line the two up (a layout by batch, not by token)
            return TensorResult(**base, status="not_comparable", method="none", note=str(e))
        base["mapping"] = _mapping_note(r1, r2)  # alignment may have said more while loading
        base["dtype1"], base["dtype2"] = str(a.dtype), str(b.dtype)
        base["shape1"], base["shape2"] = list(a.shape), list(b.shape)
        note = None if a.dtype == b.dtype else f"dtype {a.dtype} vs {b.dtype}; compared in float64"
        if a.shape != b.shape:
            return TensorResult(**base, status="shape_mismatch", method="none", note=f"shape {list(a.shape)} vs {list(b.shape)}")
        m = compare_tensors(a, b, tolerance=tol)
        faults = _faults(r1, 1) + _faults(r2, 2)
        if faults:  # what the values cannot show: a rank whose copy of a replicated tensor differs
            return TensorResult(
                **base, status="mismatch", method="tensor", metrics=m, note="; ".join([*faults, *filter(None, [note])])
            )
        return TensorResult(**base, status="match" if m.allclose else "mismatch", method="tensor", metrics=m, note=note)
    if r1.checksum and r2.checksum and r1.checksum_algorithm == r2.checksum_algorithm:
        same = r1.checksum == r2.checksum
        return TensorResult(
            **base,
            status="match" if same else "mismatch",
            method="checksum",
            note="checksums equal (bit-exact)" if same else "checksums differ (not bit-exact)",
        )
    if r1.stats and r2.stats:
        ok, rel, _ = compare_stats(r1.stats, r2.stats, rtol=0.0, atol=0.0, tolerance=tol, dtype=_coarser(r1.dtype, r2.dtype))
        return TensorResult(
            **base,
            status="match" if ok else "mismatch",
            method="statistics",
            stat_rel=rel,
            note="compared by statistics (one side has no tensor data)" + (f"; {note}" if note else ""),
        )
    return TensorResult(**base, status="not_comparable", method="none", note="no data or statistics on one side")


def _faults(r: TensorRecord, run: int) -> list[str]:
    return [f"run {run}: {f}" for f in r.source.faults] if isinstance(r.source, DerivedSource) else []


def _coarser(*names: str | None) -> Any:
    from ..formats.model import dtype_of

    dts = []
    for n in names:
        try:
            dts.append(dtype_of(n))
        except ValueError:
            pass
    return max(dts, key=lambda d: rounding_budget(d)[0], default=None)


def _mapping_note(r1: TensorRecord, r2: TensorRecord) -> str | None:
    def rules(r: TensorRecord) -> str | None:
        found = r.source.notes if isinstance(r.source, DerivedSource) else []
        return "; ".join(x for x in [r.mapping, *found] if x) or None

    m1, m2 = rules(r1), rules(r2)
    if not (m1 or m2):
        return None
    return "; ".join(f"run {i}: {m}" for i, m in ((1, m1), (2, m2)) if m)


def _only(r: TensorRecord, side: Literal["only_in_1", "only_in_2"], step: int, module: str, rank: int | None) -> TensorResult:
    return TensorResult(
        step=step,
        module=module,
        rank=rank,
        name=r.name,
        kind=r.kind,
        status=side,
        method="none",
        shape1=list(r.shape) if side == "only_in_1" and r.shape else None,
        shape2=list(r.shape) if side == "only_in_2" and r.shape else None,
    )


def pair_tensors(
    side1: list[TensorRecord], side2: list[TensorRecord]
) -> tuple[list[tuple[TensorRecord, TensorRecord]], list[TensorRecord], list[TensorRecord]]:
    """Pair by file name (device included); what is left pairs by position key, so that a
    CPU run pairs with a CUDA run and a single output (``outputs_cpu``) with output 0 of a
    dump that wrote it as ``outputs_0_cpu``."""
    by_name = {t.name: t for t in side2}
    pairs, rest1 = [], []
    for t in side1:
        other = by_name.pop(t.name, None)
        if other is not None:
            pairs.append((t, other))
        else:
            rest1.append(t)
    rest2 = [t for t in side2 if t.name in by_name]

    def loose(t: TensorRecord) -> tuple[bool, str]:
        return (t.is_tensor, t.key if t.key is not None else "0")

    pool: dict[tuple[bool, str], list[TensorRecord]] = {}
    for t in rest2:
        pool.setdefault(loose(t), []).append(t)
    only1 = []
    for t in rest1:
        cands = pool.get(loose(t))
        if cands:
            pairs.append((t, cands.pop(0)))
        else:
            only1.append(t)
    only2 = [t for ts in pool.values() for t in ts]
    return pairs, only1, only2


def _group_verdict(results: list[TensorResult]) -> bool | None:
    judged = [t for t in results if t.status in ("match", "mismatch", "shape_mismatch", "value_mismatch")]
    if not judged:
        return None
    return all(t.status == "match" for t in judged)


def _unreadable(errors: list[str], step: int, module: str, rank: int | None) -> list[TensorResult]:
    if not errors:
        return []
    text = "; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")
    return [
        TensorResult(
            step=step, module=module, rank=rank, name="<files>", kind="meta", status="unreadable", method="none", note=text
        )
    ]


def module_result(c1: ModuleCall | None, c2: ModuleCall | None, step: int, tol: Tolerance, completion: int) -> ModuleResult:
    ref = c1 or c2
    assert ref is not None
    if c1 is None or c2 is None:
        side: Literal["only_in_1", "only_in_2"] = "only_in_1" if c2 is None else "only_in_2"
        alone = [_only(t, side, step, ref.dirname, ref.rank) for t in ref.tensors]
        alone += _unreadable(ref.errors, step, ref.dirname, ref.rank)
        return ModuleResult(
            step=step,
            module=ref.dirname,
            rank=ref.rank,
            position=ref.position,
            completion=completion,
            verdict="unreadable" if ref.errors else side,
            inputs_match=None,
            outputs_match=None,
            tensors=alone,
        )
    tensors: list[TensorResult] = []
    for kind in ("inputs", "outputs"):
        pairs, only1, only2 = pair_tensors(getattr(c1, kind), getattr(c2, kind))
        tensors.extend(compare_pair(r1, r2, step, c1.dirname, c1.rank, tol) for r1, r2 in pairs)
        tensors.extend(_only(r, "only_in_1", step, c1.dirname, c1.rank) for r in only1)
        tensors.extend(_only(r, "only_in_2", step, c2.dirname, c2.rank) for r in only2)
    errors = [f"run 1: {e}" for e in c1.errors] + [f"run 2: {e}" for e in c2.errors]
    tensors += _unreadable(errors, step, c1.dirname, c1.rank)
    params = {t.name for c in (c1, c2) for t in c.inputs if t.entry.parameter}
    inputs_ok = _group_verdict([t for t in tensors if t.kind == "inputs" and t.name not in params])
    outputs_ok = _group_verdict([t for t in tensors if t.kind == "outputs"])
    if outputs_ok is False or inputs_ok is False:
        verdict: ModuleVerdict = "born" if inputs_ok is not False else "inherited"
    elif any(t.status == "unreadable" for t in tensors):
        verdict = "unreadable"  # never "match" while part of it could not be read
    elif outputs_ok is None and any(t.status == "not_comparable" and t.kind == "outputs" for t in tensors):
        verdict = "not_comparable"  # nothing it returned could be lined up: no verdict, never "match"
    else:
        verdict = "match"
    metrics = [t.metrics for t in tensors if t.metrics is not None and t.kind == "outputs"]
    failing = [t.metrics for t in tensors if t.metrics is not None]
    pool = metrics or failing
    return ModuleResult(
        step=step,
        module=c1.dirname,
        rank=c1.rank,
        position=c1.position,
        completion=completion,
        verdict=verdict,
        inputs_match=inputs_ok,
        outputs_match=outputs_ok,
        **{c.module: _worst(c, pool) for c in columns() if c.module},
        tensors=tensors,
    )


def _worst(c: Column, pool: list[TensorMetrics]) -> Any:
    """The worst of a column's values over a module's tensors (nulls left out), or None."""
    values = [v for v in (getattr(m, c.field) for m in pool) if v is not None]
    return (max if c.worst == "max" else min)(values, default=None)
