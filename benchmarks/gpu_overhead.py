"""Capture overhead on CUDA with an 8B-shaped Llama: a 2,048-token prefill and a batch-32 decode step, all modules.

Usage (on a GPU machine; about 17 GB of weights, random, built on the device):

    PYTHONPATH=src python benchmarks/gpu_overhead.py [--layers 32] [--reps 5] [--dir DIR]

The model is built from a config (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
vocab 128256), bf16, eager attention; nothing is downloaded. Each row is the median forward
time against no capture, in the same run. The floor for full tensors is the forward plus the
bytes tensorlog wrote at the slower of pinned device-to-host bandwidth and ``dd oflag=direct``
on the output disk. The statistics row also counts the host syncs on the model's thread
(``torch.cuda.set_sync_debug_mode``): the design says none, and one read-back per step on the
writer's side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import tensorlog

sys.path.insert(0, str(Path(__file__).parent))
from capture_overhead import dd_direct, filesystem


def build(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        torch_dtype="bfloat16",
    )
    cfg._attn_implementation = "eager"
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def pinned_d2h() -> float:
    """Bytes per second of a pinned device-to-host copy of 1 GiB."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * (1 << 30) / (time.perf_counter() - t0)


def timed(fn: Any, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=".")
    args = ap.parse_args()
    model = build(args.layers)
    g = torch.Generator(device="cuda").manual_seed(0)
    prefill = torch.randint(0, 128256, (1, 2048), device="cuda", generator=g)
    out = Path(tempfile.mkdtemp(prefix="tensorlog-gpu-", dir=args.dir))
    disk, d2h = dd_direct(out), pinned_d2h()
    rows: list[tuple[str, str, float, str]] = []

    def cases() -> dict[str, Any]:
        with torch.no_grad():
            cache = model(torch.randint(0, 128256, (32, 256), device="cuda", generator=g), use_cache=True).past_key_values
        token = torch.randint(0, 128256, (32, 1), device="cuda", generator=g)
        return {
            "prefill 2048": lambda: model(prefill, use_cache=False),
            # the cache grows by one position per timed step; a step's cost is flat at this length
            "decode, batch 32": lambda: model(token, past_key_values=cache, use_cache=True),
        }

    variants = {
        "no tool": None,
        "statistics": {"mode": "statistics"},
        "full tensors, packed": {"layout": "packed"},
    }
    for case in ("prefill 2048", "decode, batch 32"):
        base = None
        for name, cfg in variants.items():
            fn = cases()[case]
            note = ""
            with torch.no_grad():
                if cfg is None:
                    t = timed(fn, args.reps)
                    base = t
                else:
                    cfg = {"output_dir": str(out), "run_name": f"{case}-{name}".replace(" ", "_"), "log_step_ids": [], **cfg}
                    with tensorlog.capture(model, cfg) as run:
                        if cfg.get("mode") == "statistics":
                            torch.cuda.set_sync_debug_mode("warn")
                            with warnings.catch_warnings(record=True) as caught:
                                warnings.simplefilter("always")
                                fn()
                            torch.cuda.set_sync_debug_mode(0)
                            note = f"{sum('synchroniz' in str(w.message) for w in caught)} syncs on the model's thread"
                        t = timed(fn, args.reps)
                    m = json.loads((run.path / "run.json").read_text())
                    steps = sum(b - a + 1 for a, b in m["steps_written"]) or 1
                    per_step = m["bytes_written"] / steps
                    if cfg.get("layout") == "packed":
                        floor = base + per_step / min(disk, d2h)
                        note = f"{per_step / 1e9:.2f} GB per step; floor {floor * 1e3:.1f} ms ({floor / base:.2f}x); ours {t / floor:.2f} x floor"
                    shutil.rmtree(run.path, ignore_errors=True)
            rows.append((case, name, t, note))
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"# CUDA capture overhead: {torch.cuda.get_device_name()}, Llama 8B-shaped ({args.layers} layers, bf16, random), "
        f"torch {torch.__version__}; output on {filesystem(Path(args.dir))}; dd oflag=direct {disk / 1e9:.2f} GB/s, "
        f"pinned D2H {d2h / 1e9:.1f} GB/s; median of {args.reps}"
    )
    print("| case | variant | median ms | ratio | note |\n|---|---|---:|---:|---|")
    bases = {case: t for case, name, t, _ in rows if name == "no tool"}
    for case, name, t, note in rows:
        print(f"| {case} | {name} | {t * 1e3:.1f} | {t / bases[case]:.2f}x | {note} |")


if __name__ == "__main__":
    main()
