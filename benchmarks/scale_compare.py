"""Compare at scale: a synthetic multi-rank dump of ``--gb`` GB per run in ``--parts`` parts, compared with
threads on one machine and with Ray on a simulated two-node cluster, beside the disk's raw read rate.

Usage: python benchmarks/scale_compare.py [--gb 20] [--parts 16] [--tensor-mb 64] [--root DIR] [--keep]

Each run has ``--parts`` ranks, each rank a directory of its own (a part, as each
node of a multi-node run writes its own), written by tensorlog's capture in the
reference layout; run 2 is run 1 plus small noise, so every pair takes the full
metric path. Ranks 0..P/2-1 belong to node A and the rest to node B (named in a
parts file). Three phases, each in a fresh process after the page cache is
dropped (when this user may): a raw read of every tensor file (the physical
floor), ``tensorlog compare`` with two threads, and ``compare --ray`` on two
simulated nodes of one core each. Each reports GB/s of tensor data read (both
runs) and peak memory: of the process, and for Ray of each worker. The root
must be on the machine's disk, not a RAM disk: the default is next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


class Scaled(torch.nn.Module):
    """Returns a new tensor (so no file is a hard link of another): the input times a per-rank factor."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Rank(torch.nn.Module):
    def __init__(self, n: int, rank: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Scaled(1.0 + 1e-3 * (rank * n + i)) for i in range(n))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x) for layer, x in zip(self.layers, xs)]


def generate(root: Path, gb: float, parts: int, tensor_mb: int) -> dict[str, list[str]]:
    from tensorlog.capture.handle import start_capture
    from tensorlog.capture.run import RunInfo

    numel = tensor_mb * (1 << 20) // 4
    per_rank = max(1, int(gb * 1024 / tensor_mb / parts))  # outputs only: one file per call
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(numel, generator=g) for _ in range(min(per_rank, 8))]
    noise = 1e-6 * torch.randn(numel, generator=g)
    out: dict[str, list[str]] = {"a": [], "b": []}
    t0 = time.perf_counter()
    for name in ("a", "b"):
        for r in range(parts):
            model = Rank(per_rank, r)
            xs = [pool[i % len(pool)] + (noise if name == "b" else 0) for i in range(per_rank)]
            cfg = {
                "output_dir": str(root / name / f"rank{r}"),
                "run_name": "run",
                "module_call_match": r"layers\.\d+$",
                "data_mode": ["output"],
                "compiled": "eager",
            }
            handle = start_capture(model, cfg, info=RunInfo(rank=r, world_size=parts))
            with handle, torch.no_grad():
                model(xs)
            out[name].append(str(handle.path))
        print(f"  wrote run {name}: {parts} parts, {time.perf_counter() - t0:.0f} s so far", file=sys.stderr, flush=True)
    return out


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def phase_raw(parts: dict[str, list[str]]) -> dict[str, float]:
    total, t0 = 0, time.perf_counter()
    for paths in parts.values():
        for p in paths:
            for f in sorted(Path(p).rglob("*.pt")):
                with open(f, "rb", buffering=0) as fh:
                    while chunk := fh.read(16 << 20):
                        total += len(chunk)
    return {"bytes": total, "seconds": time.perf_counter() - t0}


def phase_threads(parts: dict[str, list[str]]) -> dict[str, float]:
    import tensorlog

    t0 = time.perf_counter()
    result = tensorlog.compare(parts["a"], parts["b"], jobs=2)
    seconds = time.perf_counter() - t0
    data = sum(t.nbytes for c in tensorlog.load_run(parts["a"]).calls() for t in c.tensors) * 2
    return {"bytes": data, "seconds": seconds, "pairs": result.summary.pairs_compared, "match": bool(result)}


def phase_ray(parts: dict[str, list[str]], root: Path) -> dict[str, float]:
    import ray
    from ray.cluster_utils import Cluster

    from tensorlog.compare.distributed import compare_on_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        files = []
        for name, paths in parts.items():
            half = len(paths) // 2
            manifest = root / f"{name}.parts.json"
            manifest.write_text(json.dumps({"parts": [{"path": p, "node": nodes[i >= half]} for i, p in enumerate(paths)]}))
            files.append(str(manifest))
        t0 = time.perf_counter()
        result, stats = compare_on_ray(files[0], files[1], address=cluster.address, rtol=1e-5, atol=1e-8)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {
        "bytes": stats.data_bytes,
        "seconds": seconds,
        "pairs": result.summary.pairs_compared,
        "match": bool(result),
        "tasks": stats.tasks,
        "returned_bytes": stats.metadata_bytes + stats.result_bytes,
        "peak_worker_rss": stats.peak_worker_rss,
        "per_node_gb": {n[:8]: b / 1e9 for n, b in stats.per_node_bytes.items()},
    }


def run_phase(name: str, root: Path) -> dict[str, float]:
    dropped = drop_caches()
    r = subprocess.run(
        [sys.executable, __file__, "--phase", name, "--root", str(root)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["cache_dropped"] = dropped
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=20.0, help="GB per run (default 20; two runs are written)")
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--tensor-mb", type=int, default=64)
    ap.add_argument("--root", type=Path, default=HERE / ".scale_data")
    ap.add_argument("--keep", action="store_true", help="keep the data (and reuse it when it is there)")
    ap.add_argument("--phase", choices=["raw", "threads", "ray"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    parts_file = args.root / "parts.json"
    if args.phase:
        from tensorlog.compare.distributed import peak_rss

        parts = json.loads(parts_file.read_text())
        fn = {"raw": phase_raw, "threads": phase_threads, "ray": lambda p: phase_ray(p, args.root)}[args.phase]
        res = fn(parts)
        res["process_peak_rss"] = peak_rss()
        print(json.dumps(res))
        return
    if not parts_file.exists():
        shutil.rmtree(args.root, ignore_errors=True)
        args.root.mkdir(parents=True)
        print(f"writing 2 x {args.gb} GB in {args.parts} parts each under {args.root} ...", file=sys.stderr)
        parts_file.write_text(json.dumps(generate(args.root, args.gb, args.parts, args.tensor_mb)))
    try:
        results = {name: run_phase(name, args.root) for name in ("raw", "threads", "ray")}
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    print(f"{'phase':<10}{'GB read':>9}{'s':>8}{'GB/s':>7}{'x floor':>9}{'peak RSS':>10}  notes")
    floor = results["raw"]["bytes"] / results["raw"]["seconds"]
    for name, r in results.items():
        rate = r["bytes"] / r["seconds"]
        notes = []
        if "peak_worker_rss" in r:
            notes.append(f"peak per worker {r['peak_worker_rss'] / 2**20:.0f} MiB, {r['tasks']} tasks")
            notes.append(f"{r['returned_bytes'] / 2**20:.1f} MiB came back; per node GB {r['per_node_gb']}")
        if "match" in r:
            notes.append(f"{r['pairs']} pairs, {'match' if r['match'] else 'MISMATCH'}")
        if not r["cache_dropped"]:
            notes.append("page cache not dropped (not root)")
        print(
            f"{name:<10}{r['bytes'] / 1e9:>9.1f}{r['seconds']:>8.1f}{rate / 1e9:>7.2f}{rate / floor:>9.2f}"
            f"{r['process_peak_rss'] / 2**20:>8.0f}Mi  {'; '.join(notes)}"
        )


if __name__ == "__main__":
    main()
