"""Capture overhead: forward-time ratio against no capture, all variants in one run.

Usage: python benchmarks/capture_overhead.py [--hidden 1024 --layers 8 --seq 256 --reps 5]

Each variant is timed in the same process, interleaved round-robin so that
drift (thermal, other load) hits every variant alike; the median is reported.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import tensorlog
from tensorlog._demo import TinyLlama, TinyLlamaConfig


@contextmanager
def _no_capture(model, out):
    yield


def _variants(out: Path):
    def tl(**cfg):
        @contextmanager
        def ctx(model, name):
            with tensorlog.capture(model, {"output_dir": str(out), "run_name": name, **cfg}) as run:
                yield run
            shutil.rmtree(run.path, ignore_errors=True)

        return ctx

    @contextmanager
    def torch_save_hooks(model, name):
        d = out / name
        d.mkdir(parents=True)
        hs = []
        for n, m in model.named_modules():
            if n:
                def hook(mod, args, output, n=n):
                    if isinstance(output, torch.Tensor):
                        torch.save(output.detach().clone(), d / f"{n}.pt")
                hs.append(m.register_forward_hook(hook))
        yield
        for h in hs:
            h.remove()
        shutil.rmtree(d, ignore_errors=True)

    return {
        "no capture": lambda model, name: _no_capture(model, name),
        "disabled": tl(enabled=False),
        "enabled, step not selected": tl(log_step_ids=[99]),
        "statistics, all modules": tl(mode="statistics"),
        "full tensors, all modules": tl(),
        "torch.save hooks (naive peer)": torch_save_hooks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", help="comma-separated variant names to run")
    args = ap.parse_args()

    cfg = TinyLlamaConfig(
        vocab_size=8192,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
    )
    model = TinyLlama(cfg).eval().to(args.device)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), device=args.device)
    out = Path(tempfile.mkdtemp(prefix="tensorlog-bench-"))
    variants = _variants(out)
    if args.only:
        keep = {v.strip() for v in args.only.split(",")}
        variants = {k: v for k, v in variants.items() if k in keep or k == "no capture"}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(2):
            model(ids)
        for rep in range(args.reps):
            for name, make in variants.items():
                with make(model, f"{name.replace(' ', '_').replace(',', '')}_{rep}") as run:
                    sync()
                    t0 = time.perf_counter()
                    model(ids)
                    sync()
                    if run is not None:
                        run.flush()  # the cost of getting the data to disk counts
                    times[name].append(time.perf_counter() - t0)
    shutil.rmtree(out, ignore_errors=True)
    base = statistics.median(times["no capture"])
    n_modules = sum(1 for n, _ in model.named_modules() if n)
    print(f"# capture overhead: hidden {args.hidden}, {args.layers} layers, seq {args.seq}, {n_modules} modules, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"| variant | median ms | ratio vs no capture |\n|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {med / base:.3f}x |")


if __name__ == "__main__":
    main()
