"""One run from several places, and compare --ray on a simulated two-node Ray cluster.

Each "node" of the cluster (``ray.cluster_utils.Cluster``: one head, one more
raylet, on this machine) writes its rank of a two-rank run into a directory of
its own, from a Ray task pinned to it, as the ranks of a multi-node vLLM run
write to their nodes' disks. The runs are then compared three ways: merged from
their parts on one machine, on Ray, and as one directory holding every rank.
All three must give the same report.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import clirun
import tensorlog
from tensorlog.capture.handle import start_capture
from tensorlog.capture.run import RunInfo

HERE = Path(__file__).resolve().parent
WORLD = 2
CFG = {"module_call_match": None, "log_step_ids": [0, 1], "compiled": "eager"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    """A rank's share of a model: the same weights on every rank, rank-dependent inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def write_rank(out: str, run_name: str, rank: int, perturb: bool | str = False) -> str:
    """Capture rank ``rank`` of a two-rank run into ``out``; with ``perturb``, layer 1's up-projection is off
    (``"nan"``: one of its columns is NaN)."""
    net = Net()
    if perturb == "nan":
        net.layers[1].up.register_forward_hook(lambda m, a, o: o.index_fill(1, torch.tensor([5]), math.nan))
    elif perturb:
        net.layers[1].up.register_forward_hook(lambda m, a, o: o * 1.01)
    handle = start_capture(net, {**CFG, "output_dir": out, "run_name": run_name}, info=RunInfo(rank=rank, world_size=WORLD))
    with handle, torch.no_grad():
        for step in range(2):
            torch.manual_seed(100 * rank + step)
            net(torch.randn(256, 64))
    return str(handle.path)


def parts(tmp_path, name, perturb_rank=None, where=None, how=True):
    """The two ranks of run ``name``, each in ``<tmp>/node<r>/``; ``where(r, fn, *args)`` runs the writer (on a node)."""
    where = where or (lambda r, fn, *a: fn(*a))
    return [where(r, write_rank, str(tmp_path / f"node{r}"), name, r, how if r == perturb_rank else False) for r in range(WORLD)]


def one_dir(paths, dest):
    """The parts copied into one directory: what a shared file system would have held."""
    for p in paths:
        shutil.copytree(p, dest, dirs_exist_ok=True)
    return dest


def report(result):
    """A comparison without the parts' paths and the notes on where it ran: what must be the same everywhere."""
    data = json.loads(result.model_dump_json())
    for key in ("dir1", "dir2", "notes"):
        data.pop(key)
    return data


def same_report(a, b, path="") -> list[str]:
    """Where two reports differ. Metrics are float64 reductions whose last bits depend on how many threads
    summed them (a Ray task has one core), and a few (rel_diff) subtract nearly equal numbers, so floats
    agree to 1e-6 relative; verdicts, names, statuses and counts exactly."""
    if isinstance(a, float) and isinstance(b, float):
        close = math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-15) or (math.isnan(a) and math.isnan(b))
        return [] if close else [f"{path}: {a} vs {b}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in same_report(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_report(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


# -- several directories, one machine ---------------------------------------------------------


def test_a_run_in_two_directories_reads_and_compares_as_one(tmp_path):
    a, b = parts(tmp_path, "a"), parts(tmp_path, "b", perturb_rank=1)
    run = tensorlog.load_run(a)
    assert run.world_size == 2 and [p.name for p in run.parts] == ["a", "a"]
    assert {c.rank for c in run.calls()} == {0, 1}
    nodes = {r: info.node for r, info in (run.manifest.ranks or {}).items() if info.node is not None}
    assert {r: n.path for r, n in nodes.items()} == {r: str((tmp_path / f"node{r}" / "a").resolve()) for r in range(2)}

    split = tensorlog.compare(a, b)
    whole = tensorlog.compare(one_dir(a, tmp_path / "one_a"), one_dir(b, tmp_path / "one_b"))
    assert report(split) == report(whole)  # the same process: the same bits
    assert not split and [(d.step, d.module, d.rank) for d in split.first_divergence] == [
        (0, "layers.1.up", 1),
        (1, "layers.1.up", 1),
    ]
    assert split.dir1 == f"{a[0]} + {a[1]}"

    # identical runs split differently still match: no divergence where there is none
    same = tensorlog.compare(a, one_dir(parts(tmp_path / "c", "c"), tmp_path / "one_c"))
    assert same and same.summary.mismatched == 0 and same.summary.pairs_compared > 0


def test_the_cli_takes_repeated_dirs_and_parts_files(tmp_path):
    a, b = parts(tmp_path, "a"), parts(tmp_path, "b", perturb_rank=0)
    r = clirun.run("compare", "--dir1", a[0], "--dir1", a[1], "--dir2", b[0], "--dir2", b[1], "--format", "json")
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["first_divergence"][0]["rank"] == 0

    manifest = tmp_path / "b.parts.json"
    manifest.write_text(json.dumps({"format": "tensorlog-run-parts", "parts": [{"path": "node0/b"}, {"path": str(b[1])}]}))
    r2 = clirun.run("compare", "--dir1", a[0], "--dir1", a[1], "--dir2", manifest, "--format", "json")
    assert r2.returncode == 1 and json.loads(r2.stdout)["modules"] == json.loads(r.stdout)["modules"]


def test_parts_that_overlap_or_do_not_fit_are_one_line_errors(tmp_path):
    a = parts(tmp_path, "a")
    r = clirun.run("compare", "--dir1", a[0], "--dir1", a[0], "--dir2", a[1])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "the run's parts list one directory twice" in r.stderr  # refused before anything is read
    b = parts(tmp_path, "b")
    r = clirun.run("compare", "--dir1", a[0], "--dir1", b[1], "--dir2", a[1])
    assert r.returncode == 2 and "different runs (run names a, b)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "tensorlog-run-parts", "parts": []}))
    r = clirun.run("compare", "--dir1", bad, "--dir2", a[1])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = clirun.run("compare", "--dir1", a[0], "--dir2", a[1], "--ray", "127.0.0.1:1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- compare --ray on a simulated two-node cluster ----------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    # the workers import this module to run write_rank
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})
    nodes = sorted((n["NodeID"] for n in ray.nodes() if n["Alive"]), key=lambda n: n != ray.get_runtime_context().get_node_id())
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def on_node(nodes):
    """Run ``fn(*args)`` as a Ray task on node ``r``: rank ``r``'s files are written there, by a process of that node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def where(r, fn, *args):
        task = ray.remote(num_cpus=0)(fn).options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[r], soft=False))
        return ray.get(task.remote(*args))

    return where


def tensors_in(obj, seen=None):
    """Every tensor reachable from ``obj``: what a reply must not hold."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(tensors_in(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensors_in(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return tensors_in(vars(obj), seen)
    return 0


@pytest.mark.slow
def test_compare_on_ray_runs_each_pair_where_its_files_are_and_gives_the_same_report(cluster, tmp_path):
    from tensorlog.compare.distributed import compare_on_ray

    c, nodes = cluster
    where = on_node(nodes)
    a, b = parts(tmp_path, "a", where=where), parts(tmp_path, "b", perturb_rank=1, where=where)
    run = tensorlog.load_run(a)
    ranks = run.manifest.ranks or {}
    assert [node.ray_node_id if (node := ranks[r].node) else None for r in range(2)] == nodes

    local = tensorlog.compare(one_dir(a, tmp_path / "one_a"), one_dir(b, tmp_path / "one_b"))
    on_ray, stats = compare_on_ray(a, b, address=c.address)
    assert same_report(report(on_ray), report(local)) == []
    assert [(d.step, d.module, d.rank) for d in on_ray.first_divergence] == [(0, "layers.1.up", 1), (1, "layers.1.up", 1)]

    # each node read its own rank's files, and what came back holds no tensor data
    half = stats.data_bytes // 2
    assert stats.nodes == 2 and sorted(stats.per_node_bytes) == sorted(nodes)
    assert all(n == half for n in stats.per_node_bytes.values()) and stats.cross_node_pairs == 0
    assert stats.metadata_bytes + stats.result_bytes < min(4096 * stats.pairs, stats.data_bytes / 10)
    assert tensors_in(on_ray) == 0 and stats.peak_worker_rss > 0
    assert "compared on Ray: " in on_ray.notes[-1] and "no tensor data between nodes" in on_ray.notes[-1]

    # no false positive: identical runs on Ray match
    same, _ = compare_on_ray(a, parts(tmp_path / "c", "c", where=where), address=c.address)
    assert same and same.summary.mismatched == 0 and same.summary.pairs_compared == local.summary.pairs_compared

    # run 2's ranks placed on the other nodes: each pair's run-2 side is read where it lives and sent over
    swapped = parts(tmp_path / "d", "d", perturb_rank=1, where=lambda r, fn, *a: on_node(nodes)(1 - r, fn, *a))
    crossed, cstats = compare_on_ray(a, swapped, address=c.address)
    assert same_report(report(crossed), report(local)) == []
    assert cstats.cross_node_pairs == cstats.pairs and cstats.moved_bytes == stats.data_bytes // 2
    assert "sent to run 1's node" in crossed.notes[-1]

    # NaN and Inf travel back as they are: the same verdicts and metrics as a local compare
    nan = parts(tmp_path / "n", "n", perturb_rank=0, where=where, how="nan")
    on_ray_nan, _ = compare_on_ray(a, nan, address=c.address)
    local_nan = tensorlog.compare(one_dir(a, tmp_path / "one_a2"), one_dir(nan, tmp_path / "one_n"))
    assert same_report(report(on_ray_nan), report(local_nan)) == []
    d = on_ray_nan.first_divergence[0]
    assert (d.step, d.module, d.rank) == (0, "layers.1.up", 0)

    # the command line, with a parts file that names each part's node
    manifest = tmp_path / "a.parts.json"
    manifest.write_text(json.dumps({"parts": [{"path": p, "node": n} for p, n in zip(a, nodes)]}))
    r = clirun.run("compare", "--dir1", manifest, "--dir2", b[0], "--dir2", b[1], "--ray", c.address, "--format", "json")
    assert r.returncode == 1, r.stderr
    assert same_report(json.loads(r.stdout)["modules"], report(local)["modules"]) == []

    # a part no node holds, and a layout that cannot be compared remotely, are one-line errors
    r = clirun.run("compare", "--dir1", tmp_path / "nowhere", "--dir2", b[0], "--ray", c.address)
    assert r.returncode == 2 and "no node of the Ray cluster" in r.stderr and len(r.stderr.strip().splitlines()) == 1
