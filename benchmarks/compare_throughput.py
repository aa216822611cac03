"""Compare throughput (GB/s of tensor data) and peak memory, beside the disk's raw read bandwidth.

Usage: python benchmarks/compare_throughput.py [--gb 2] [--tensor-mb 64] [--keep DIR]

Writes two runs of about ``--gb`` GB each (run 2 = run 1 plus small noise, so
every pair takes the full metric path, not the bit-identical shortcut), then in
one process measures: reading every file once (raw bandwidth, page cache as the
compare will see it), and ``tensorlog.compare`` over both runs. Peak RSS of the
compare is measured in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import tensorlog


class Blocks(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(n))

    def forward(self, xs):
        return [b(x) for b, x in zip(self.blocks, xs)]


def make_runs(root: Path, gb: float, tensor_mb: int) -> tuple[Path, Path]:
    numel = tensor_mb * (1 << 20) // 4
    n = max(1, int(gb * 1024 / tensor_mb / 2))  # each Identity logs input and output
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(numel, generator=g) for _ in range(n)]
    model = Blocks(n)
    paths = []
    for name, noise in (("a", 0.0), ("b", 1e-6)):
        ys = [x + noise * torch.randn(numel, generator=g) if noise else x for x in xs]
        with tensorlog.capture(model, {"output_dir": str(root), "run_name": name, "module_call_match": r"blocks\.\d+$"}) as run:
            model(ys)
        paths.append(run.path)
    return paths[0], paths[1]


def raw_read(paths) -> tuple[int, float]:
    total, t0 = 0, time.perf_counter()
    for p in paths:
        for f in sorted(p.rglob("*.pt")):
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(16 << 20):
                    total += len(chunk)
    return total, time.perf_counter() - t0


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of each run in GB")
    ap.add_argument("--tensor-mb", type=int, default=64)
    ap.add_argument("--keep", help="reuse/keep runs in this directory")
    ap.add_argument("--jobs", type=int, help="compare worker processes (default: tensorlog's choice)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-rss", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_rss:
        print(_peak_rss())
        return
    if args.child:
        t0 = time.perf_counter()
        res = tensorlog.compare(*args.child, jobs=args.jobs)
        dt = time.perf_counter() - t0
        print(json.dumps({"seconds": dt, "peak_rss": _peak_rss(), "pairs": res.summary.pairs_compared}))
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tensorlog-cmpbench-"))
    if not (root / "a").exists():
        a, b = make_runs(root, args.gb, args.tensor_mb)
    else:
        a, b = root / "a", root / "b"
    nbytes, t_read = raw_read([a, b])  # also warms the page cache, as a repeated compare would find it
    # a fresh process: peak RSS is the compare's own, not the writer's above
    base_rss = json.loads(subprocess.check_output([sys.executable, __file__, "--baseline-rss"]))
    jobs = ["--jobs", str(args.jobs)] if args.jobs else []
    out = json.loads(subprocess.check_output([sys.executable, __file__, "--child", str(a), str(b), *jobs]))
    largest = args.tensor_mb * (1 << 20)
    print(
        f"# compare throughput: {nbytes / 1e9:.2f} GB of tensors in {out['pairs']} pairs, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print("| measure | value |\n|---|---:|")
    print(f"| raw read bandwidth (same files, same run) | {nbytes / t_read / 1e9:.2f} GB/s |")
    print(f"| tensorlog compare | {nbytes / out['seconds'] / 1e9:.2f} GB/s ({out['seconds']:.1f} s) |")
    print(f"| compare / raw read | {t_read / out['seconds']:.2f} |")
    print(
        f"| peak RSS of compare (worker threads included) | {out['peak_rss'] / 2**20:.0f} MiB "
        f"(python+torch alone: {base_rss / 2**20:.0f} MiB; largest tensor {largest / 2**20:.0f} MiB) |"
    )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
