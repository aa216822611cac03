"""The comparison itself: plan the module pairs of two runs, compare them (on threads for big runs), attribute.

Pairs are formed by (step, module directory, tensor name) after an optional
alignment (:mod:`.align`); the metrics come from :mod:`.metrics`; the verdicts
from :mod:`.pairing` and :mod:`.attribution`. Nothing here prints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, build_config, compile_pattern
from ..config.selection import Selector
from ..errors import UsageError
from ..formats import ModuleCall, Run, RunSource, load_run
from .align import MappingSpec, align_runs, detect_preset, load_mapping, same_schedule
from .align.requests import RequestReport
from .align.shards import DISAGREE
from .align.tokens import steps_info
from .align.virtual import Tokens, token_plan
from .attribution import attribute, innermost_born
from .metrics import Tolerance
from .pairing import module_result
from .replay import ReplayResult
from .results import CompareProgress, Comparison, Divergence, ModuleResult, Summary

__all__ = [
    "compare_local",
    "Comparison",
    "plan_pairs",
    "assemble",
    "Plan",
    "run_notes",
    "run_label",
    "choose_mapping",
    "pair_bytes",
    "check_steps",
    "whole_steps_of",
    "whole_note",
]


def compare_local(
    run1: Run | RunSource,
    run2: Run | RunSource,
    tol: Tolerance,
    *,
    whole_steps: bool = False,
    steps: Iterable[int] | None = None,
    modules: Iterable[str] | None = None,
    progress: Callable[[CompareProgress], None] | None = None,
    mapping: str | Path | MappingSpec | None = None,
    replay: ReplayResult | None = None,
    jobs: int | None = None,
) -> Comparison:
    """:func:`~tensorlog.compare.compare` in this process (the front door, :mod:`.front`, sends Ray's elsewhere)."""
    r1 = run1 if isinstance(run1, Run) else load_run(run1)
    r2 = run2 if isinstance(run2, Run) else load_run(run2)
    notes, problems, incomplete = run_notes(r1, r2)
    if whole_steps:
        r1, r2, notes = whole_steps_of(r1), whole_steps_of(r2), notes + whole_note(incomplete)
        incomplete = []
    tokens = token_plan(r1, r2)  # once: the mapping, the request report and the alignment all read it
    spec = choose_mapping(r1, r2, mapping, tokens=tokens)
    requests = _unpaired(r1, r2, tokens)
    if spec is not None:
        aligned = align_runs(r1, r2, spec, tokens)
        r1, r2, requests = aligned.run1, aligned.run2, aligned.requests or requests
        notes = aligned.notes + notes
    plan = plan_pairs(r1, r2, steps=steps, modules=modules)
    check_steps(plan, steps, r1, r2)
    sizes = [pair_bytes(pair) for _, pairs in plan for pair in pairs]
    tracker = CompareProgress(modules_total=len(sizes), bytes_total=sum(sizes))
    tasks = [(c1, c2, s, tol, completion) for s, pairs in plan for completion, (c1, c2) in enumerate(pairs)]
    workers = _workers(jobs, tracker.bytes_total, spec is not None, len(tasks))
    results = _run_tasks(tasks, workers, progress, tracker, sizes)
    return assemble(
        r1, r2, plan, results, tol=tol, notes=notes, problems=problems, replay=replay, requests=requests, incomplete=incomplete
    )


def whole_steps_of(run: Run) -> Run:
    """The run with only its whole steps (each rank's index written), for ``whole_steps``."""
    return replace(run, steps={i: s for i, s in run.steps.items() if s.complete})


def whole_note(incomplete: list[str]) -> list[str]:
    if not incomplete:
        return []
    return [f"compared only the steps both runs finished (whole_steps): {'; '.join(incomplete)}"]


def _unpaired(r1: Run, r2: Run, tokens: Tokens | None) -> RequestReport | None:
    """How requests pair when no alignment runs: by prompt where both runs recorded the same schedule; where only
    one run recorded its requests, pairing by step is a guess the report must say it made."""
    has = [bool(steps_info(r)) for r in (r1, r2)]
    if has[0] and has[1]:
        return tokens.report if tokens is not None else None
    if has[0] == has[1]:
        return None
    i = 2 if has[0] else 1
    return RequestReport(how="step", why=f"run {i} recorded no request layout, so steps are paired by number")


def check_steps(plan: Plan, steps: Iterable[int] | None, r1: Run, r2: Run) -> None:
    """Steps asked for that neither run has are a usage error that names the steps each run has."""
    if steps is None or plan:
        return
    wanted = ", ".join(map(str, sorted(set(steps))))
    have = [_step_range(r) for r in (r1, r2)]
    raise UsageError(f"no step {wanted} in either run (run 1 {have[0]}, run 2 {have[1]})")


def _step_range(run: Run) -> str:
    s = sorted(run.steps)
    if not s:
        return "has no step"
    if len(s) > 1 and s == list(range(s[0], s[-1] + 1)):
        return f"has steps {s[0]}-{s[-1]}"
    return f"has step{'s' if len(s) > 1 else ''} " + ", ".join(map(str, s[:10])) + (", ..." if len(s) > 10 else "")


def run_notes(r1: Run, r2: Run) -> tuple[list[str], list[str], list[str]]:
    """What the report says of the runs themselves: (notes: compiled or not, ranks missing; problems: unreadable
    files, nothing logged; incomplete: runs cut short, stopped or still being written)."""
    incomplete = [f"run {i} is incomplete: {r.incomplete_reason}" for i, r in ((1, r1), (2, r2)) if not r.complete]
    notes = [f"run {i} {gap}" for i, r in ((1, r1), (2, r2)) if (gap := _missing_ranks(r))]
    notes += _mode_notes(r1, r2)
    problems = [f"run {i}: {p}" for i, r in ((1, r1), (2, r2)) for p in r.problems]
    problems += [
        f"run {i} ({run_label(r)}) holds no logged tensor"
        for i, r in ((1, r1), (2, r2))
        if not any(c.tensors for c in r.calls()) and not r.problems
    ]
    return notes, problems, incomplete


def _missing_ranks(run: Run) -> str | None:
    """Ranks a multi-rank run should hold but has no call of (a part left out, a rank that never wrote)."""
    world = run.world_size
    present = {c.rank for c in run.calls()}
    if world <= 1 or not present or world > 4096:
        return None
    chosen = run.manifest.config.get("ranks") or []
    expected = {r for r in chosen if isinstance(r, int)} or set(range(world))
    missing = sorted(expected - present, key=lambda r: -1 if r is None else r)
    if not missing:
        return None
    shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
    return f"has no call of rank {shown} (world size {world}): those ranks' modules are on one side only"


Pair = tuple[ModuleCall | None, ModuleCall | None]
Plan = list[tuple[int, list[Pair]]]


def plan_pairs(r1: Run, r2: Run, *, steps: Iterable[int] | None = None, modules: Iterable[str] | None = None) -> Plan:
    """Per step, the calls of the two runs paired by call key, in run 1's completion order then run 2's leftovers."""
    pats = [compile_pattern(p) for p in modules] if modules else None
    wanted = set(steps) if steps is not None else None
    plan: Plan = []
    for s in sorted(i for i in set(r1.steps) | set(r2.steps) if wanted is None or i in wanted):
        s1, s2 = r1.steps.get(s), r2.steps.get(s)
        calls2 = {c.key: c for c in (s2.by_completion() if s2 else [])}
        pairs: list[Pair] = []
        for c in s1.by_completion() if s1 else []:
            if not pats or any(p.search(c.module) for p in pats):
                pairs.append((c, calls2.pop(c.key, None)))
        pairs += [(None, c) for c in calls2.values() if not pats or any(p.search(c.module) for p in pats)]
        plan.append((s, pairs))
    return plan


def assemble(
    r1: Run,
    r2: Run,
    plan: Plan,
    results: list[ModuleResult],
    *,
    tol: Tolerance,
    notes: list[str],
    problems: list[str],
    replay: ReplayResult | None = None,
    requests: RequestReport | None = None,
    incomplete: list[str] | None = None,
) -> Comparison:
    """The report from the pairs' results (in plan order): absence notes, attribution, divergences, summary."""
    computed = iter(results)
    all_results: list[ModuleResult] = []
    divergences: list[Divergence] = []
    for s, pairs in plan:
        step_results = [_with_absence(next(computed), pair, s, r1, r2) for pair in pairs]
        step_results = attribute(step_results, {c.key: c for pair in pairs for c in pair if c is not None})
        born = innermost_born(step_results)
        if born is not None:
            divergences.append(_divergence(s, born))
        if replay is not None:
            step_results = _with_replay(step_results, s, replay)
        all_results.extend(sorted(step_results, key=lambda r: (r.rank or 0, r.position if r.verdict != "only_in_2" else 1 << 30)))
    return Comparison(
        dir1=run_label(r1),
        dir2=run_label(r2),
        rtol=tol.rtol if tol.mode == "allclose" else None,
        atol=tol.atol if tol.mode == "allclose" else None,
        tolerance=tol.mode,
        tolerance_text=tol.describe(),
        requests=requests,
        steps=[s for s, _ in plan],
        summary=_summary(all_results),
        first_divergence=divergences,
        modules=all_results,
        notes=notes,
        problems=problems,
        incomplete=incomplete or [],
    )


def run_label(run: Run) -> str:
    """The run's directory, or its parts joined with ``+``."""
    return " + ".join(map(str, run.parts)) if run.parts else str(run.path)


def _with_absence(result: ModuleResult, pair: Pair, step: int, r1: Run, r2: Run) -> ModuleResult:
    c1, c2 = pair
    if (c1 is None) == (c2 is None):
        return result
    c = c1 or c2
    assert c is not None
    note = _absence(r2 if c2 is None else r1, 2 if c2 is None else 1, c.module, step)
    return result.model_copy(update={"note": note}) if note is not None else result


def _divergence(step: int, born: ModuleResult) -> Divergence:
    worst = max((t for t in born.tensors if t.kind == "outputs" and t.failed), key=lambda t: t.score, default=None)
    failed = [t for t in born.tensors if t.failed]
    disagree = next((t.note for t in failed if t.note and DISAGREE in t.note), None)
    disagree = disagree or next((t.mapping for t in failed if t.mapping and DISAGREE in t.mapping), None)
    rank = born.rank
    if disagree:
        found = re.search(r"rank (\d+)'s copy", disagree)
        rank = int(found.group(1)) if found else rank
    elif worst is not None and (tagged := re.search(r"@rank(\d+)$", worst.name)):
        rank = int(tagged.group(1))
    return Divergence(
        step=step,
        module=born.module,
        rank=rank,
        max_abs=born.worst_max_abs,
        max_rel=born.worst_max_rel,
        rel_diff=born.worst_rel_diff,
        tensor=worst.name if worst else None,
        note=disagree[disagree.index(DISAGREE) :].split(";")[0] if disagree else None,
        judged_by=worst.metrics.judged_by if worst is not None and worst.metrics is not None else None,
    )


def _with_replay(results: list[ModuleResult], step: int, replay: ReplayResult) -> list[ModuleResult]:
    added = replay.added_error()
    keys = ("added_error", "added_share", "added_floor", "added_excess")
    return [r.model_copy(update=dict(zip(keys, added[(step, r.module)]))) if (step, r.module) in added else r for r in results]


def _summary(results: list[ModuleResult]) -> Summary:
    tensors = [t for m in results for t in m.tensors]
    return Summary(
        pairs_compared=sum(t.status in ("match", "mismatch", "shape_mismatch", "value_mismatch") for t in tensors),
        matched=sum(t.status == "match" for t in tensors),
        matched_exact=sum(
            t.status == "match" and (t.method != "tensor" or (t.metrics is not None and t.metrics.exact)) for t in tensors
        ),
        mismatched=sum(t.failed for t in tensors),
        only_in_1=sum(t.status == "only_in_1" for t in tensors),
        only_in_2=sum(t.status == "only_in_2" for t in tensors),
        unreadable=sum(t.status == "unreadable" for t in tensors),
        not_comparable=sum(t.status == "not_comparable" for t in tensors),
        modules_compared=sum(m.verdict not in ("only_in_1", "only_in_2") for m in results),
        modules_mismatched=sum(m.verdict in ("born", "contains", "inherited") for m in results),
        modules_not_comparable=sum(m.verdict == "not_comparable" for m in results),
    )


def _mode_notes(r1: Run, r2: Run) -> list[str]:
    """Say which side was compiled when the two differ: fused kernels round differently, and some modules
    of a compiled model may not be observable."""
    modes = [r.manifest.compiled for r in (r1, r2)]
    kinds = [m.mode if m is not None else "eager" for m in modes]
    if all(m is None for m in modes) or kinds[0] == kinds[1]:
        return []
    out = []
    for i, m in enumerate(modes, 1):
        if m is not None and m.mode == "compiled":
            hidden = f"; not observable: {', '.join(sorted(m.not_observable))}" if m.not_observable else ""
            out.append(f"run {i} was compiled ({m.backend or 'torch.compile'}{', CUDA graphs' if m.cudagraphs else ''}){hidden}")
        else:
            out.append(f"run {i} ran eagerly")
    return ["; ".join(out) + ": fused kernels round differently, so expect differences within float tolerance"]


def _absence(other: Run, i: int, module: str, step: int) -> str | None:
    """Why ``module`` has no call in run ``i`` at ``step``: not captured there, or no counterpart."""
    compiled = other.manifest.compiled
    if compiled is not None and module in compiled.not_observable:
        return f"not observable in run {i}'s compiled graph: {compiled.not_observable[module]}"
    if other.modules is None or not other.manifest.config:
        return None
    if module not in other.modules:
        return f"no counterpart: run {i}'s model has no module {module!r}"
    try:
        selector = Selector(build_config(other.manifest.config))
    except ConfigError:
        return None
    if selector.calls_for(module) is False:
        return f"no counterpart: run {i} did not select it"
    if not selector.step(step):
        return f"no counterpart: run {i} did not select step {step}"
    return (
        f"not captured: run {i} selected it but logged no call of it at step {step} "
        "(not called there, or called in a way that bypassed its hooks)"
    )


def choose_mapping(
    r1: Run, r2: Run, mapping: str | Path | MappingSpec | None, *, tokens: Tokens | None = None
) -> MappingSpec | None:
    """The alignment two runs need: a given one, a framework preset, or ``identity`` (names as they are) to pair
    rows by request whenever both runs recorded requests, and to reassemble shards when the TP sizes differ.
    ``tokens``: :func:`token_plan` of the two runs, when the caller has it already."""
    if mapping is not None:
        return load_mapping(mapping)
    preset = detect_preset(r1, r2)
    if preset is not None:
        return preset
    if _world(r1) != _world(r2):
        return load_mapping("identity")
    if steps_info(r1) and steps_info(r2) and not same_schedule(tokens or token_plan(r1, r2)):
        return load_mapping("identity")
    return None


def _world(run: Run) -> int:
    return run.world_size


PARALLEL_MIN_BYTES = 256 << 20


def pair_bytes(pair: tuple[ModuleCall | None, ModuleCall | None]) -> int:
    """Bytes of tensor data the two sides of a pair hold on disk (what comparing them reads)."""
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
    c1, c2, s, tol, completion = args
    return module_result(c1, c2, s, tol, completion)


def _run_tasks(
    tasks: list[tuple[Any, ...]], workers: int, progress: Any, tracker: CompareProgress, sizes: list[int]
) -> list[ModuleResult]:
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
