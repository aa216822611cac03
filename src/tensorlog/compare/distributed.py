"""``compare --ray``: each pair compared on the Ray node that holds its files; only metrics come back.

The plan is made here, as for a local compare, from the runs' metadata; the
metadata is read on each part's own node and sent back pickled (no tensor
data: a part whose format keeps tensors in memory is refused). Pairs are then
batched per node and compared by tasks pinned to that node (hard node
affinity), which read the files locally, a chunk at a time, and return their
results as JSON. The report is assembled from those results exactly as a local
compare assembles its own, so the two give the same report.

Where a part lives: a parts file may name its node; otherwise every node is
asked whether it sees the directory. Where several do (a shared file system,
or a cluster simulated on one machine), each rank's pairs go to the node its
``run.json`` records, when that node is one of them.
"""

from __future__ import annotations

import dataclasses
import pickle
import resource
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DependencyError, RunReadError, TensorlogError, UsageError
from ..formats import ModuleCall, Run, RunSource, TensorRecord, run_parts
from ..formats.model import MemorySource, listed_ranks
from ..formats.parts import merge_parts, part_ranks
from ..formats.safeio import Listing, read_model
from ..schema import names
from ..schema.records import RunManifest
from .engine import Plan, assemble, check_steps, choose_mapping, pair_bytes, plan_pairs, run_notes, whole_note, whole_steps_of
from .metrics import Tolerance
from .pairing import module_result
from .replay import ReplayResult
from .results import CompareProgress, Comparison, ModuleResult

__all__ = ["compare_on_ray", "RayStats", "peak_rss"]

BATCH_BYTES = 256 << 20
"""A task compares pairs of up to this many bytes (or one bigger pair): few enough tasks that their start-up
cost vanishes, enough that the progress bar moves and the nodes' cores share the work."""
BATCH_PAIRS = 256


@dataclass
class RayStats:
    """What a Ray compare moved and used: metadata and metrics only, never tensors."""

    nodes: int = 0
    tasks: int = 0
    pairs: int = 0
    metadata_bytes: int = 0
    """Pickled run metadata sent from the parts' nodes to the planner."""
    result_bytes: int = 0
    """Pickled results sent back by the compare tasks."""
    data_bytes: int = 0
    """Tensor bytes the tasks read, each on its own node."""
    cross_node_pairs: int = 0
    moved_bytes: int = 0
    """Tensor bytes sent between nodes: run 2's side of pairs whose sides live on different nodes."""
    peak_worker_rss: int = 0
    """The largest peak resident memory of a worker process that ran a compare task (bytes)."""
    per_node_bytes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def compare_on_ray(
    source1: Run | RunSource,
    source2: Run | RunSource,
    *,
    address: str,
    tol: Tolerance | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    steps: Iterable[int] | None = None,
    modules: Iterable[str] | None = None,
    progress: Callable[[CompareProgress], None] | None = None,
    replay: ReplayResult | None = None,
    whole_steps: bool = False,
) -> tuple[Comparison, RayStats]:
    """Compare two runs with Ray tasks on the nodes that hold their files.

    Raises:
        DependencyError: Ray is not installed.
        UsageError: no Ray cluster at ``address``.
        RunReadError: a part is on no node of the cluster, or cannot be read there.
    """
    tol = tol or Tolerance.of(rtol, atol)
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        _reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(f"cannot connect to a Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    try:
        return _compare(ray, source1, source2, tol, steps, modules, progress, replay, whole_steps)
    finally:
        if started:
            ray.shutdown()


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Ray retries a dead address for minutes: a ``host:port`` that refuses a connection now is an error now."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local": Ray resolves those itself, and fails fast when there is no cluster
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"cannot connect to a Ray cluster at {address}: {e.strerror or e}") from None


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DependencyError("compare on Ray needs Ray: pip install 'tensorlog[ray]'") from None
    return ray


def _compare(
    ray: Any, s1: Any, s2: Any, tol: Tolerance, steps: Any, modules: Any, progress: Any, replay: Any, whole_steps: bool
) -> Any:
    t0 = time.perf_counter()
    stats = RayStats()
    (r1, nodes1), (r2, nodes2) = (_read_remote(ray, s, stats) for s in (s1, s2))
    notes, problems, incomplete = run_notes(r1, r2)
    if whole_steps:
        r1, r2, notes, incomplete = whole_steps_of(r1), whole_steps_of(r2), notes + whole_note(incomplete), []
    if choose_mapping(r1, r2, None) is not None:
        raise UsageError(
            "compare on Ray pairs runs of one layout, world size and schedule; aligned comparisons (HF against vLLM, "
            "different tensor-parallel sizes or batching, a mapping) run on one machine"
        )
    plan = plan_pairs(r1, r2, steps=steps, modules=modules)
    check_steps(plan, steps, r1, r2)
    batches = _batches(plan, nodes1, nodes2, stats)
    stats.nodes = len({node for node, _ in batches})
    tracker = CompareProgress(modules_total=stats.pairs, bytes_total=stats.data_bytes)
    task = ray.remote(num_cpus=1, max_retries=0)(_compare_batch)
    fetch = ray.remote(num_cpus=0, max_retries=0)(_fetch_call)
    pending = {}
    for i, (node, items) in enumerate(batches):
        fetched = None
        (_, _, _, c2, _), *_ = items
        if len(items) == 1 and c2 is not None and nodes2.get(c2.rank) != node:  # run 2's side lives elsewhere
            fetched = fetch.options(scheduling_strategy=_on(nodes2[c2.rank])).remote(c2)
            stats.moved_bytes += pair_bytes((None, c2))
        args = [(c1, c2, s, completion) for (s, completion, c1, c2, _) in items]
        pending[task.options(scheduling_strategy=_on(node)).remote(args, tol, fetched)] = i
    done: dict[int, list[ModuleResult]] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        blob, rss = _get(ray, ready[0])
        stats.result_bytes += len(blob)
        stats.peak_worker_rss = max(stats.peak_worker_rss, rss)
        done[i] = pickle.loads(blob)  # made by _compare_batch: results, never tensors
        items = batches[i][1]
        tracker.modules_done += len(items)
        tracker.bytes_done += sum(n for *_, n in items)
        if progress:
            progress(tracker)
    by_key = {(s, completion): r for i in done for (s, completion, *_), r in zip(batches[i][1], done[i])}
    results = [by_key[(s, completion)] for s, pairs in plan for completion in range(len(pairs))]
    stats.tasks = len(batches)
    stats.seconds = time.perf_counter() - t0
    result = assemble(
        r1, r2, plan, results, tol=tol, notes=[*notes, _describe(stats)], problems=problems, replay=replay, incomplete=incomplete
    )
    return result, stats


def _describe(s: RayStats) -> str:
    cross = (
        f"; {s.cross_node_pairs} pairs had their two sides on different nodes: run 2's side of each was sent to run 1's "
        f"node ({_mb(s.moved_bytes)})"
        if s.cross_node_pairs
        else ", no tensor data between nodes"
    )
    return (
        f"compared on Ray: {s.pairs} pairs in {s.tasks} tasks on {s.nodes} node{'s' * (s.nodes != 1)}, each reading the "
        f"files on its node ({_mb(s.data_bytes)}); {_mb(s.metadata_bytes + s.result_bytes)} of metadata and metrics came "
        f"back to the planner{cross}; peak worker memory {_mb(s.peak_worker_rss)}"
    )


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# -- where the parts are, and their metadata ------------------------------------------------


def _read_remote(ray: Any, source: Any, stats: RayStats) -> tuple[Run, dict[int | None, str]]:
    """The run, its metadata read on each part's node, and which node holds each rank.

    A rank goes to the node its ``run.json`` records when that node sees the part (ranks of several nodes
    in one directory of a shared file system), else to the node the part was found on.
    """
    if isinstance(source, Run):
        raise UsageError("compare on Ray reads runs where they are: give their directories or parts files, not loaded runs")
    parts = run_parts(source)
    live = [n for n in ray.nodes() if n.get("Alive")]
    alive = [n["NodeID"] for n in live]
    hosts = {n["NodeID"]: {n.get("NodeManagerHostname"), n.get("NodeManagerAddress")} for n in live}
    reader = ray.remote(num_cpus=0, max_retries=0)(_read_part)
    located = [(path, _holders(ray, path, hint, alive, hosts)) for path, hint in parts]
    refs = [reader.options(scheduling_strategy=_on(holders[0])).remote(str(path)) for path, holders in located]
    runs: list[Run] = []
    node_of: dict[int | None, str] = {}
    for (_, holders), ref in zip(located, refs):
        blob = _get(ray, ref)
        stats.metadata_bytes += len(blob)
        run = pickle.loads(blob)  # made by _read_part, never read from disk
        runs.append(run)
        recorded = _recorded_nodes(run)
        for rank in part_ranks(run):
            own = recorded.get(rank)
            node_of[rank] = own if own is not None and own in holders else holders[0]
    return merge_parts(runs), node_of


def _recorded_nodes(run: Run) -> dict[int | None, str | None]:
    listed = listed_ranks(run.manifest)
    if listed:
        return {r: e.node.ray_node_id for r, e in listed.items() if e.node is not None}
    node = run.manifest.node
    return {run.manifest.rank if run.world_size > 1 else None: node.ray_node_id if node else None}


def _holders(ray: Any, path: Path, hint: str | None, alive: list[str], hosts: dict[str, set[Any]]) -> list[str]:
    """The nodes that see ``path``, the one its ``run.json`` records first (or just the node a parts file names)."""
    if hint is not None:
        for node in alive:
            if hint == node or hint in hosts[node]:
                return [node]
        raise RunReadError(f"{path}: its node {hint!r} is not a live node of the Ray cluster")
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_part)
    refs = {node: probe.options(scheduling_strategy=_on(node)).remote(str(path)) for node in alive}
    seen = {node: _get(ray, ref) for node, ref in refs.items()}
    holders = [node for node, recorded in seen.items() if recorded is not None]
    if not holders:
        raise RunReadError(f"{path}: no node of the Ray cluster ({len(alive)} alive) holds this directory")
    recorded = {n for r in seen.values() if r is not None for n in r}
    return sorted(holders, key=lambda node: node not in recorded)


def _probe_part(path: str) -> list[str] | None:
    """None if this node has no such directory; else the Ray node ids its ``run.json`` files record."""
    p = Path(path)
    if not p.is_dir():
        return None
    out: list[str] = []
    for name, f in sorted(Listing(p).files.items())[:4096]:
        if names.RUN_FILE_RE.match(name):
            try:
                node = read_model(f, RunManifest).node
            except RunReadError:
                continue
            if node is not None and node.ray_node_id:
                out.append(node.ray_node_id)
    return out


def _read_part(path: str) -> bytes:
    from ..formats import load_run

    run = load_run(path)
    for call in run.calls():
        if any(isinstance(t.source, MemorySource) for t in call.tensors):
            raise RunReadError(f"{path}: a {run.layout} dump keeps a step's tensors in one file; compare it on one machine")
    return pickle.dumps(run, protocol=pickle.HIGHEST_PROTOCOL)


# -- the compare tasks ------------------------------------------------------------------------------

_Item = tuple[int, int, ModuleCall | None, ModuleCall | None, int]


def _batches(
    plan: Plan, nodes1: dict[int | None, str], nodes2: dict[int | None, str], stats: RayStats
) -> list[tuple[str, list[_Item]]]:
    """Pairs grouped by the node of run 1's side (run 2's when run 1 has none), cut into bounded batches.

    A pair whose sides live on different nodes is a batch of its own: run 2's side is read on its node and
    sent to run 1's, one call at a time.
    """
    per_node: dict[str, list[_Item]] = {}
    out: list[tuple[str, list[_Item]]] = []
    for s, pairs in plan:
        for completion, (c1, c2) in enumerate(pairs):
            node = nodes1[c1.rank] if c1 is not None else nodes2[c2.rank]  # type: ignore[union-attr]
            nbytes = pair_bytes((c1, c2))
            item = (s, completion, c1, c2, nbytes)
            stats.pairs += 1
            stats.data_bytes += nbytes
            stats.per_node_bytes[node] = stats.per_node_bytes.get(node, 0) + nbytes
            if c1 is not None and c2 is not None and nodes2.get(c2.rank) != node:
                stats.cross_node_pairs += 1
                out.append((node, [item]))
            else:
                per_node.setdefault(node, []).append(item)
    for node, items in per_node.items():
        batch: list[_Item] = []
        size = 0
        for item in items:
            if batch and (size + item[4] > BATCH_BYTES or len(batch) >= BATCH_PAIRS):
                out.append((node, batch))
                batch, size = [], 0
            batch.append(item)
            size += item[4]
        if batch:
            out.append((node, batch))
    return out


def _compare_batch(
    items: list[tuple[ModuleCall | None, ModuleCall | None, int, int]],
    tol: Tolerance,
    fetched: dict[str, torch.Tensor | str] | None = None,
) -> tuple[bytes, int]:
    """Compare pairs on this node; ``fetched``: run 2's tensors of a lone pair, read on the node that holds them."""
    if fetched is not None:
        (c1, c2, s, completion), *_ = items
        assert c2 is not None
        items = [(c1, _with_data(c2, fetched), s, completion)]
    results = [module_result(c1, c2, s, tol, completion) for c1, c2, s, completion in items]
    return pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL), peak_rss()


def _fetch_call(call: ModuleCall) -> dict[str, torch.Tensor | str]:
    """A call's tensors, read where they are (or why each cannot be read)."""
    out: dict[str, torch.Tensor | str] = {}
    for rec in call.inputs + call.outputs + call.post_fwd_inputs:
        if rec.has_data:
            try:
                out[rec.name] = rec.load()
            except RunReadError as e:
                out[rec.name] = str(e)
    return out


def _with_data(call: ModuleCall, fetched: dict[str, torch.Tensor | str]) -> ModuleCall:
    def one(r: TensorRecord) -> TensorRecord:
        v = fetched.get(r.name)
        if v is None:
            return r
        return r.with_(error=v) if isinstance(v, str) else r.with_(source=MemorySource(v), error=None)

    return dataclasses.replace(
        call,
        inputs=[one(r) for r in call.inputs],
        outputs=[one(r) for r in call.outputs],
        post_fwd_inputs=[one(r) for r in call.post_fwd_inputs],
    )


def peak_rss() -> int:
    """This process's peak resident memory in bytes. ``VmHWM``, because ``ru_maxrss`` survives ``exec`` on
    Linux: a worker started by a big process would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _on(node: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node, soft=False)


def _get(ray: Any, ref: Any) -> Any:
    """``ray.get``, with a task's error as tensorlog's own (one line), not Ray's wrapped traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, TensorlogError):
            raise cause from None
        raise RunReadError(f"a Ray task failed: {type(cause).__name__ if cause else 'error'}: {cause or e}") from None
    except ray.exceptions.RayError as e:
        raise RunReadError(f"Ray: {str(e).splitlines()[0]}") from None
