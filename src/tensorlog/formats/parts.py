"""One run from several places: the ranks of a multi-node run, each node's share in its own directory.

Each part is read as a run of its own, then the parts are merged as the ranks of
one directory are: steps by number, calls side by side, one manifest whose
``ranks`` lists every rank with the node and path it was written on. Two parts
that hold the same rank are refused: which of the two is right cannot be known.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import RunReadError
from ..schema.records import RunParts
from .model import ModuleCall, Run, Step, listed_ranks, rank_entry
from .safeio import read_model

__all__ = ["read_parts_file", "merge_parts", "merge_step_streams", "part_ranks"]


def read_parts_file(path: Path) -> list[tuple[Path, str | None]]:
    """The parts a parts file lists (relative paths are relative to the file), with the node each names."""
    parts = read_model(path, RunParts)
    return [((path.parent / p.path) if not Path(p.path).is_absolute() else Path(p.path), p.node) for p in parts.parts]


def part_ranks(run: Run) -> set[int | None]:
    """The ranks a part holds: from its calls, and from its manifests (a rank may have logged nothing yet)."""
    ranks: set[int | None] = {c.rank for c in run.calls()}
    listed = listed_ranks(run.manifest)
    if listed:
        ranks |= set(listed)
    elif run.manifest.rank is not None and run.world_size > 1:
        ranks.add(run.manifest.rank)
    return ranks or {None}


def merge_parts(runs: Sequence[Run]) -> Run:
    """The parts as one run.

    Raises:
        RunReadError: the parts are of different layouts, or two of them hold the same rank.
    """
    if len(runs) == 1:
        return runs[0]
    layouts = {r.layout for r in runs}
    if len(layouts) > 1:
        raise RunReadError(f"the parts are of different layouts ({', '.join(sorted(layouts))}): they are not one run")
    for key, what in (("run_name", "run names"), ("world_size", "world sizes")):
        seen = {_fact(r, key) for r in runs} - {None}
        if len(seen) > 1:
            raise RunReadError(f"the parts are of different runs ({what} {', '.join(sorted(map(str, seen)))})")
    owner: dict[int | None, Path] = {}
    for r in runs:
        for rank in part_ranks(r):
            if rank in owner:
                what = f"rank {rank}" if rank is not None else "a run without ranks"
                raise RunReadError(f"{what} is in two parts, {owner[rank]} and {r.path}: a run's parts hold disjoint ranks")
            owner[rank] = r.path
    ordered = sorted(runs, key=lambda r: min((-1 if k is None else k) for k in part_ranks(r)))
    steps: dict[int, Step] = {}
    for r in ordered:
        for i, s in r.steps.items():
            steps[i] = (
                _merge_step(steps[i], s)
                if i in steps
                else Step(
                    index=i,
                    calls=list(s.calls),
                    info=s.info,
                    complete=s.complete,
                    incomplete_reason=s.incomplete_reason,
                    extra=s.extra,
                )
            )
    return Run(
        path=ordered[0].path,
        manifest=_merge_manifests(ordered),
        steps=dict(sorted(steps.items())),
        layout=ordered[0].layout,
        problems=[p for r in ordered for p in r.problems],
        parts=[r.path for r in ordered],
        modules=next((r.modules for r in ordered if r.modules is not None), None),
    )


def _fact(run: Run, key: str) -> Any:
    """What ``run.json`` says of the run as a whole (None where a part has no manifest)."""
    return run.manifest.config.get(key) if key == "run_name" else getattr(run.manifest, key, None)


def _merge_step(a: Step, b: Step) -> Step:
    calls: list[ModuleCall] = a.calls + b.calls
    reasons = [x for x in (a.incomplete_reason, b.incomplete_reason) if x]
    return Step(
        index=a.index,
        calls=calls,
        info=a.info or b.info,
        complete=a.complete and b.complete,
        incomplete_reason="; ".join(reasons) or None,
        extra={**b.extra, **a.extra},
    )


def _merge_manifests(runs: Sequence[Run]) -> Any:
    base = runs[0].manifest
    ranks: dict[Any, Any] = {}
    for r in runs:
        listed = listed_ranks(r.manifest)
        if listed:
            ranks.update(listed)
        elif r.manifest.rank is not None:
            ranks[r.manifest.rank] = rank_entry(r.manifest)
    bad = [f"{r.path}: {r.incomplete_reason}" for r in runs if not r.complete]
    layouts: dict[str, Any] = {}
    for r in runs:
        layouts.update(r.manifest.shard_layouts)
    world = max((r.manifest.world_size or 0) for r in runs) or len(ranks) or None
    first: Callable[[str], Any] = lambda key: next((getattr(r.manifest, key) for r in runs if getattr(r.manifest, key)), None)  # noqa: E731
    return base.model_copy(
        update={
            "complete": not bad,
            "incomplete_reason": "; ".join(bad) or None,
            "world_size": world,
            "ranks": ranks,
            "shard_layouts": layouts,
            "compiled": first("compiled"),
            "model_dims": first("model_dims"),
        }
    )


def merge_step_streams(streams: list[Iterator[Step]]) -> Iterator[Step]:
    """Steps of several parts, each stream in step order, merged into one stream of whole steps."""
    merged = heapq.merge(*streams, key=lambda s: s.index)
    current: Step | None = None
    for step in merged:
        if current is not None and step.index == current.index:
            current = _merge_step(current, step)
            continue
        if current is not None:
            yield current
        current = step
    if current is not None:
        yield current
