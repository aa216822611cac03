"""Sustained dump throughput of full-tensor capture, as a fraction of direct-write disk bandwidth.

Usage: python benchmarks/dump_throughput.py [--gb 8] [--tensor-mb 32] [--dir DIR] [--compare]

Both layouts are measured, each writing about ``--gb`` GB.

A model of ``Scale`` layers (each output a new 32 MiB tensor) is captured for many steps until
about ``--gb`` GB have been written; the rate counts the whole run, the final flush included.
In the same run, ``dd if=/dev/zero of=DIR/dd.bin bs=16M oflag=direct`` measures what the disk
takes when the page cache is bypassed. With ``--compare``, a second dump of the same size is
written (slightly perturbed) and ``tensorlog compare`` runs over both, reporting GB/s and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import tensorlog

sys.path.insert(0, str(Path(__file__).parent))
from capture_overhead import filesystem


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def dump(root: Path, name: str, gb: float, tensor_mb: int, noise: float, layout: str = "reference") -> tuple[int, float]:
    numel = tensor_mb * (1 << 20) // 4
    layers = 8
    model = torch.nn.Sequential(*[Scale(1.0 + 1e-3 * i + noise) for i in range(layers)])
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    # each layer writes its output (its input is the previous output: a hard link, no bytes)
    steps = max(1, int(gb * 1024 / tensor_mb / layers))
    t0 = time.perf_counter()
    with tensorlog.capture(
        model, {"output_dir": str(root), "run_name": name, "log_step_ids": [], "module_call_match": r"^\d+$", "layout": layout}
    ) as run:
        with torch.no_grad():
            for _ in range(steps):
                model(x)
    dt = time.perf_counter() - t0
    written = json.loads((run.path / "run.json").read_text())["bytes_written"]
    return written, dt


def dd_direct(root: Path, gb: float) -> float:
    target = root / "dd.bin"
    count = max(1, int(gb * 1024 / 16))
    r = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "oflag=direct"], capture_output=True, text=True
    )
    target.unlink(missing_ok=True)
    m = re.search(r"([\d.]+) s, ", r.stderr)
    return count * 16 * (1 << 20) / float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=8.0)
    ap.add_argument("--tensor-mb", type=int, default=32)
    ap.add_argument("--dir", default=".", help="where to write (default: here, on this machine's disk)")
    ap.add_argument("--compare", action="store_true", help="also write a second dump and compare the two")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tensorlog-dump-", dir=args.dir))
    try:
        disk = dd_direct(root, min(args.gb, 4.0))
        rows = []
        for layout in ("reference", "packed"):
            os.sync()
            written, dt = dump(root, layout, args.gb, args.tensor_mb, 0.0, layout)
            shutil.rmtree(root / layout, ignore_errors=True)
            rows.append((layout, written, dt))
        print(
            f"# sustained dump: {args.gb:.0f} GB per layout, tensors of {args.tensor_mb} MiB, torch {torch.__version__}, "
            f"{os.cpu_count()} cores; output on {filesystem(root)}"
        )
        print("| measure | GB/s | of dd oflag=direct |\n|---|---:|---:|")
        print(f"| dd oflag=direct (same disk, same run) | {disk / 1e9:.2f} | 100% |")
        for layout, written, dt in rows:
            print(
                f"| tensorlog full tensors, {layout} layout, sustained | {written / dt / 1e9:.2f} | {written / dt / disk:.0%} |"
            )
        if args.compare:
            dump(root, "a", args.gb, args.tensor_mb, 0.0)
            dump(root, "b", args.gb, args.tensor_mb, 1e-6)
            bench = Path(__file__).with_name("compare_throughput.py")
            out = subprocess.check_output(
                [sys.executable, str(bench), "--keep", str(root), "--tensor-mb", str(args.tensor_mb)], text=True
            )
            print(
                "\n".join(
                    line for line in out.splitlines() if line.startswith("| ") and "measure" not in line and "---" not in line
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
