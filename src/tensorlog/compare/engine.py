"""Comparing two runs: pairing, per-module verdicts, and where divergence is born.

Pairs are formed by (step, module directory, tensor name); the metrics come
from :mod:`._metrics` and the result is a tree of pydantic models that the
renderers in :mod:`._report` print. Nothing here prints.

Where divergence is born: walking each step in completion order (children
finish before their parents), a module whose inputs match and whose outputs
do not is where a difference appears. A parent in that state is attributed to
its logged descendant that is itself born, so the answer is the innermost
module, not the root whose token-id inputs always match.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from .align.engine import MappingSpec, align_runs, detect_preset, load_mapping
from .metrics import TensorMetrics, compare_stats, compare_tensors
from ..formats.tensorlog import ModuleCall, Run, RunReadError, TensorRecord, load_run
from .replay import ReplayResult

__all__ = ["compare", "Comparison", "ModuleResult", "TensorResult", "Divergence", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

TensorStatus = Literal[
    "match", "mismatch", "shape_mismatch", "value_mismatch", "only_in_1", "only_in_2", "unreadable", "not_comparable"
]
ModuleVerdict = Literal["match", "born", "contains", "inherited", "only_in_1", "only_in_2", "unreadable"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorResult(_Model):
    """One tensor pair (or a tensor found on one side only)."""

    type: Literal["tensor"] = "tensor"
    step: int
    module: str
    rank: int | None = None
    name: str
    kind: str
    status: TensorStatus
    method: Literal["tensor", "statistics", "checksum", "value", "none"] = "tensor"
    shape1: list[int] | None = None
    shape2: list[int] | None = None
    dtype1: str | None = None
    dtype2: str | None = None
    metrics: TensorMetrics | None = None
    stat_rel: dict[str, float] | None = None
    mapping: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "match"

    @property
    def failed(self) -> bool:
        return self.status in ("mismatch", "shape_mismatch", "value_mismatch")

    @property
    def score(self) -> float:
        """A single 'how bad' number for ranking and plotting (max relative error)."""
        if self.metrics is not None:
            return self.metrics.max_rel
        if self.stat_rel:
            return max(self.stat_rel.values())
        return 1.0 if self.failed else 0.0


class ModuleResult(_Model):
    """One module call, paired across the two runs, with its verdict."""

    type: Literal["module"] = "module"
    step: int
    module: str
    rank: int | None = None
    position: int
    completion: int
    verdict: ModuleVerdict
    inputs_match: bool | None
    outputs_match: bool | None
    explained_by: str | None = None
    worst_max_abs: float | None = None
    worst_max_rel: float | None = None
    worst_rel_diff: float | None = None
    min_cosine: float | None = None
    min_snr_db: float | None = None
    added_error: float | None = None
    """From a replay: the relative L2 error this module adds by itself on run 1's inputs."""
    added_share: float | None = None
    tensors: list[TensorResult] = Field(default_factory=list)


class Divergence(_Model):
    step: int
    module: str
    rank: int | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    rel_diff: float | None = None
    tensor: str | None = None


class CompareProgress(BaseModel):
    """What :func:`compare` reports to a ``progress`` callback after each module."""

    modules_done: int = 0
    modules_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


class Summary(_Model):
    pairs_compared: int
    matched: int
    mismatched: int
    only_in_1: int
    only_in_2: int
    unreadable: int
    not_comparable: int
    modules_compared: int
    modules_mismatched: int


class Comparison(_Model):
    """The result of :func:`compare`; ``bool()`` is True when everything compared matches."""

    type: Literal["comparison"] = "comparison"
    schema_version: int = SCHEMA_VERSION
    dir1: str
    dir2: str
    rtol: float
    atol: float
    steps: list[int]
    summary: Summary
    first_divergence: list[Divergence]
    modules: list[ModuleResult]
    notes: list[str] = Field(default_factory=list)

    def __bool__(self) -> bool:
        return self.summary.mismatched == 0 and self.summary.unreadable == 0

    @property
    def exit_code(self) -> int:
        if self.summary.unreadable:
            return 2
        return 0 if self.summary.mismatched == 0 else 1


def _compare_pair(r1: TensorRecord, r2: TensorRecord, step: int, module: str, rank: int | None, rtol: float, atol: float) -> TensorResult:
    base: dict[str, Any] = dict(
        step=step, module=module, rank=rank, name=r1.name, kind=r1.kind,
        shape1=list(r1.shape) if r1.shape is not None else None,
        shape2=list(r2.shape) if r2.shape is not None else None,
        dtype1=r1.dtype, dtype2=r2.dtype,
        mapping=_mapping_note(r1, r2),
    )
    if not r1.is_tensor or not r2.is_tensor:
        if r1.is_tensor != r2.is_tensor:
            return TensorResult(**base, status="value_mismatch", method="value", note="a tensor on one side, a value on the other")
        v1 = {k: v for k, v in r1.meta.items() if k in ("type", "value", "class")}
        v2 = {k: v for k, v in r2.meta.items() if k in ("type", "value", "class")}
        return TensorResult(**base, status="match" if v1 == v2 else "value_mismatch", method="value",
                            note=None if v1 == v2 else f"{v1.get('value')!r} vs {v2.get('value')!r}")
    if r1.shape is not None and r2.shape is not None and r1.shape != r2.shape:
        return TensorResult(**base, status="shape_mismatch", method="none", note=f"shape {list(r1.shape)} vs {list(r2.shape)}")
    note = None if r1.dtype == r2.dtype else f"dtype {r1.dtype} vs {r2.dtype}; compared in float64"
    if r1.has_data and r2.has_data:
        try:
            a, b = r1.load(), r2.load()
        except RunReadError as e:
            return TensorResult(**base, status="unreadable", method="none", note=str(e))
        except ValueError as e:  # alignment could not line the two up (layout, missing tokens)
            return TensorResult(**base, status="not_comparable", method="none", note=str(e))
        base["mapping"] = _mapping_note(r1, r2)  # alignment may have said more while loading
        base["dtype1"], base["dtype2"] = str(a.dtype), str(b.dtype)
        base["shape1"], base["shape2"] = list(a.shape), list(b.shape)
        note = None if a.dtype == b.dtype else f"dtype {a.dtype} vs {b.dtype}; compared in float64"
        if a.shape != b.shape:
            return TensorResult(**base, status="shape_mismatch", method="none", note=f"shape {list(a.shape)} vs {list(b.shape)}")
        m = compare_tensors(a, b, rtol=rtol, atol=atol)
        return TensorResult(**base, status="match" if m.allclose else "mismatch", method="tensor", metrics=m, note=note)
    if r1.checksum and r2.checksum and r1.checksum_algorithm == r2.checksum_algorithm:
        same = r1.checksum == r2.checksum
        return TensorResult(**base, status="match" if same else "mismatch", method="checksum",
                            note="checksums equal (bit-exact)" if same else "checksums differ (not bit-exact)")
    if r1.stats and r2.stats:
        ok, rel, _ = compare_stats(r1.stats, r2.stats, rtol=rtol, atol=atol)
        return TensorResult(**base, status="match" if ok else "mismatch", method="statistics", stat_rel=rel,
                            note="compared by statistics (one side has no tensor data)" + (f"; {note}" if note else ""))
    return TensorResult(**base, status="not_comparable", method="none", note="no data or statistics on one side")


def _mapping_note(r1: TensorRecord, r2: TensorRecord) -> str | None:
    m1, m2 = r1.meta.get("mapping"), r2.meta.get("mapping")
    if not (m1 or m2):
        return None
    return "; ".join(f"run {i}: {m}" for i, m in ((1, m1), (2, m2)) if m)


def _only(r: TensorRecord, side: Literal["only_in_1", "only_in_2"], step: int, module: str, rank: int | None) -> TensorResult:
    return TensorResult(step=step, module=module, rank=rank, name=r.name, kind=r.kind, status=side, method="none",
                        shape1=list(r.shape) if side == "only_in_1" and r.shape else None,
                        shape2=list(r.shape) if side == "only_in_2" and r.shape else None)


def _pair_tensors(
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


def _module_result(c1: ModuleCall | None, c2: ModuleCall | None, step: int, rtol: float, atol: float, completion: int) -> ModuleResult:
    ref = c1 or c2
    assert ref is not None
    if c1 is None or c2 is None:
        side: Literal["only_in_1", "only_in_2"] = "only_in_1" if c2 is None else "only_in_2"
        tensors = [_only(t, side, step, ref.dirname, ref.rank) for t in ref.tensors]
        return ModuleResult(step=step, module=ref.dirname, rank=ref.rank, position=ref.position, completion=completion,
                            verdict=side, inputs_match=None, outputs_match=None, tensors=tensors)
    tensors: list[TensorResult] = []
    for kind in ("inputs", "outputs"):
        pairs, only1, only2 = _pair_tensors(getattr(c1, kind), getattr(c2, kind))
        tensors.extend(_compare_pair(r1, r2, step, c1.dirname, c1.rank, rtol, atol) for r1, r2 in pairs)
        tensors.extend(_only(r, "only_in_1", step, c1.dirname, c1.rank) for r in only1)
        tensors.extend(_only(r, "only_in_2", step, c2.dirname, c2.rank) for r in only2)
    errors = c1.errors + c2.errors
    if errors:
        tensors.append(TensorResult(step=step, module=c1.dirname, rank=c1.rank, name="<metadata>", kind="meta",
                                    status="unreadable", method="none", note="; ".join(errors)))
    params = {t.name for c in (c1, c2) for t in c.inputs if t.meta.get("parameter")}
    inputs_ok = _group_verdict([t for t in tensors if t.kind == "inputs" and t.name not in params])
    outputs_ok = _group_verdict([t for t in tensors if t.kind == "outputs"])
    if errors and outputs_ok is None:
        verdict: ModuleVerdict = "unreadable"
    elif outputs_ok is False or inputs_ok is False:
        verdict = "born" if inputs_ok is not False else "inherited"
    else:
        verdict = "match"
    metrics = [t.metrics for t in tensors if t.metrics is not None and t.kind == "outputs"]
    failing = [t.metrics for t in tensors if t.metrics is not None]
    pool = metrics or failing
    return ModuleResult(
        step=step, module=c1.dirname, rank=c1.rank, position=c1.position, completion=completion, verdict=verdict,
        inputs_match=inputs_ok, outputs_match=outputs_ok,
        worst_max_abs=max((m.max_abs for m in pool), default=None),
        worst_max_rel=max((m.max_rel for m in pool), default=None),
        worst_rel_diff=max((m.rel_diff for m in pool), default=None),
        min_cosine=min((m.cosine for m in pool), default=None),
        min_snr_db=min((m.snr_db for m in pool if m.snr_db is not None), default=None),
        tensors=tensors,
    )


def _attribute(results: list[ModuleResult], calls: dict[tuple[int | None, str], ModuleCall]) -> list[ModuleResult]:
    """Mark a 'born' parent as 'contains' when a logged descendant is itself born.

    A module whose inputs could not be compared (cross-framework alignment
    compares outputs only) is 'born' only if nothing failed before it in
    completion order; after an earlier failure it is 'inherited'.
    """
    born = [r for r in results if r.verdict == "born"]
    out = []
    failed_before = False
    for r in sorted(results, key=lambda r: r.completion):
        if r.verdict == "born":
            me = calls.get((r.rank, r.module))
            child = None
            if me is not None and me.seq_start is not None and me.seq_end is not None:
                for other in born:
                    oc = calls.get((other.rank, other.module))
                    if (other is not r and oc is not None and oc.rank == me.rank and oc.seq_start is not None and oc.seq_end is not None
                            and me.seq_start < oc.seq_start and oc.seq_end < me.seq_end):
                        if child is None or oc.seq_end < calls[(child.rank, child.module)].seq_end:  # type: ignore[operator]
                            child = other
            if child is not None:
                r = r.model_copy(update={"verdict": "contains", "explained_by": child.module})
            elif r.inputs_match is None and failed_before:
                r = r.model_copy(update={"verdict": "inherited"})
        failed_before = failed_before or r.verdict in ("born", "inherited")
        out.append(r)
    return out


def _innermost_born(results: list[ModuleResult]) -> ModuleResult | None:
    for r in sorted(results, key=lambda r: r.completion):
        if r.verdict == "born":
            return r
    return None


def compare(
    run1: Run | str | Path,
    run2: Run | str | Path,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    steps: Iterable[int] | None = None,
    modules: Iterable[str] | None = None,
    progress: "Callable[[CompareProgress], None] | None" = None,
    mapping: "str | Path | MappingSpec | None" = None,
    replay: "ReplayResult | None" = None,
    jobs: int | None = None,
) -> Comparison:
    """Compare two runs and find, per step, the module where they start to differ.

    Args:
        run1, run2 (Run | str | Path): runs, or their directories (an output
            dir holding exactly one run also works).
        rtol (float, default 1e-5), atol (float, default 1e-8): tolerance,
            as ``torch.allclose``.
        steps (iterable of int, optional): only these steps.
        modules (iterable of str, optional): only modules matching one of these regexes.
        progress (callable, optional): called with a :class:`CompareProgress` (modules and
            bytes done and in total) after each module.
        jobs (int, optional): worker processes; by default 1 for small comparisons and up to
            4 (one per core) once there are hundreds of MB to read. Each worker holds a few
            tensors at a time.
        mapping (str | Path | MappingSpec, optional): align the runs first: a preset
            (``"hf-vllm"``), a mapping file, or a spec. By default ``hf-vllm`` when one run
            is from HF transformers and the other from vLLM, and shard reassembly when
            the runs' world sizes differ.
        replay (ReplayResult, optional): from :func:`tensorlog.replay`; adds each module's
            own (isolated) error beside the accumulated one.

    Returns:
        Comparison: ``bool()`` is True when all compared pairs match;
        ``first_divergence`` names, per step, the innermost module where the
        difference is born.

    Example:
        >>> result = tensorlog.compare("/tmp/il/run1", "/tmp/il/run2", rtol=1e-4)
        >>> result.first_divergence[0].module
        'model.layers.3.mlp.down_proj'
    """
    r1 = run1 if isinstance(run1, Run) else load_run(run1)
    r2 = run2 if isinstance(run2, Run) else load_run(run2)
    align_notes: list[str] = []
    spec = _choose_mapping(r1, r2, mapping)
    if spec is not None:
        r1, r2, align_notes = align_runs(r1, r2, spec)
    pats = [re.compile(p) for p in modules] if modules else None
    wanted = set(steps) if steps is not None else None
    step_ids = sorted(i for i in set(r1.steps) | set(r2.steps) if wanted is None or i in wanted)
    notes = align_notes + [f"run {i}: {p}" for i, r in ((1, r1), (2, r2)) for p in r.problems]
    for i, r in ((1, r1), (2, r2)):
        if not r.complete:
            notes.append(f"run {i} is incomplete: {r.incomplete_reason}")
    plan: list[tuple[int, list[tuple[ModuleCall | None, ModuleCall | None]]]] = []
    for s in step_ids:
        s1, s2 = r1.steps.get(s), r2.steps.get(s)
        calls1 = s1.by_completion() if s1 else []
        calls2 = {c.key: c for c in (s2.by_completion() if s2 else [])}
        pairs: list[tuple[ModuleCall | None, ModuleCall | None]] = []
        seen = set()
        for c in calls1:
            if pats and not any(p.search(c.module) for p in pats):
                continue
            pairs.append((c, calls2.get(c.key)))
            seen.add(c.key)
        for key, c in calls2.items():
            if key not in seen and not (pats and not any(p.search(c.module) for p in pats)):
                pairs.append((None, c))
        plan.append((s, pairs))
    sizes = {id(pair): _pair_bytes(pair) for _, pairs in plan for pair in pairs}
    tracker = CompareProgress(modules_total=sum(len(p) for _, p in plan), bytes_total=sum(sizes.values()))
    tasks = [(c1, c2, s, rtol, atol, completion) for s, pairs in plan for completion, (c1, c2) in enumerate(pairs)]
    workers = _workers(jobs, tracker.bytes_total, spec is not None, len(tasks))
    computed = iter(_run_tasks(tasks, workers, progress, tracker, [sizes[id(pair)] for _, pairs in plan for pair in pairs]))
    all_results: list[ModuleResult] = []
    divergences: list[Divergence] = []
    for s, pairs in plan:
        results = [next(computed) for _ in pairs]
        index = {c.key: c for pair in pairs for c in pair if c is not None}
        results = _attribute(results, index)
        born = _innermost_born(results)
        if born is not None:
            worst = max((t for t in born.tensors if t.kind == "outputs" and t.failed), key=lambda t: t.score, default=None)
            divergences.append(Divergence(step=s, module=born.module, rank=born.rank, max_abs=born.worst_max_abs,
                                          max_rel=born.worst_max_rel, rel_diff=born.worst_rel_diff,
                                          tensor=worst.name if worst else None))
        if replay is not None:
            added = replay.added_error()
            results = [r.model_copy(update={"added_error": added[(s, r.module)][0], "added_share": added[(s, r.module)][1]})
                       if (s, r.module) in added else r for r in results]
        all_results.extend(sorted(results, key=lambda r: (r.rank or 0, r.position if r.verdict != "only_in_2" else 1 << 30)))
    tensors = [t for m in all_results for t in m.tensors]
    summary = Summary(
        pairs_compared=sum(t.status in ("match", "mismatch", "shape_mismatch", "value_mismatch") for t in tensors),
        matched=sum(t.status == "match" for t in tensors),
        mismatched=sum(t.failed for t in tensors),
        only_in_1=sum(t.status == "only_in_1" for t in tensors),
        only_in_2=sum(t.status == "only_in_2" for t in tensors),
        unreadable=sum(t.status == "unreadable" for t in tensors),
        not_comparable=sum(t.status == "not_comparable" for t in tensors),
        modules_compared=sum(m.verdict not in ("only_in_1", "only_in_2") for m in all_results),
        modules_mismatched=sum(m.verdict in ("born", "contains", "inherited") for m in all_results),
    )
    return Comparison(dir1=str(r1.path), dir2=str(r2.path), rtol=rtol, atol=atol, steps=step_ids, summary=summary,
                      first_divergence=divergences, modules=all_results, notes=notes)


def _choose_mapping(r1: Run, r2: Run, mapping: "str | Path | MappingSpec | None") -> MappingSpec | None:
    if mapping is not None:
        return load_mapping(mapping)
    preset = detect_preset(r1, r2)
    if preset is not None:
        return preset
    if _world(r1) != _world(r2):
        return load_mapping("identity")  # reassemble tensor-parallel shards, names as they are
    return None


def _world(run: Run) -> int:
    return int(run.manifest.get("world_size") or 1)


PARALLEL_MIN_BYTES = 256 << 20


def _pair_bytes(pair: tuple[ModuleCall | None, ModuleCall | None]) -> int:
    return sum(t.nbytes for c in pair if c is not None for t in c.tensors if t.has_data)


def _workers(jobs: int | None, total_bytes: int, aligned: bool, n_tasks: int) -> int:
    if aligned or n_tasks < 2:
        return 1  # aligned records share one tensor cache: compared in order
    if jobs is not None:
        return max(1, jobs)
    if total_bytes < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(4, os.cpu_count() or 1, n_tasks))


def _task(args: tuple[Any, ...]) -> ModuleResult:
    c1, c2, s, rtol, atol, completion = args
    return _module_result(c1, c2, s, rtol, atol, completion)


def _run_tasks(tasks: list[tuple[Any, ...]], workers: int, progress: Any, tracker: CompareProgress, sizes: list[int]) -> list[ModuleResult]:
    """Module pairs compared in order, streamed from disk a few tensors at a time.

    With several workers, pairs run on threads: the metric kernels release the GIL, so threads
    use the cores without the seconds it takes a worker process to import torch, and torch's own
    intra-op threads are held at one per worker for the duration.
    """
    out: list[ModuleResult] = []

    def tick(i: int) -> None:
        tracker.modules_done += 1
        tracker.bytes_done += sizes[i]
        if progress:
            progress(tracker)

    if workers <= 1:
        for i, t in enumerate(tasks):
            out.append(_task(t))
            tick(i)
        return out
    from concurrent.futures import ThreadPoolExecutor

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tensorlog-compare") as pool:
            for i, result in enumerate(pool.map(_task, tasks)):
                out.append(result)
                tick(i)
    finally:
        torch.set_num_threads(threads)
    return out
