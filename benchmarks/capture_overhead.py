"""Capture overhead: forward-time ratio against no tool, tensorlog beside its peers, in one run.

Usage (the peers need `make .venv-peers/.done`; `make bench` runs this there):

    python benchmarks/capture_overhead.py [--model issue8|big] [--reps 7] [--device cpu|cuda] [--no-peers]

Models: ``issue8`` is a tiny HF Llama (hidden 256, intermediate 688, 4 layers, 4 heads,
vocab 2000, one sequence of 128 tokens, float32, ``use_cache=False``); ``big`` is the built-in
Llama-style model at hidden 1024, 8 layers, seq 256 (compute dominates).

Every variant selects all modules and every step. Each is set up once (untimed), then its
forwards are timed; tensorlog's include getting the data to disk (``flush()``), as the peers
write synchronously. All variants run in turn, twice, and the median forward is reported. msProbe's debugger is a process-wide singleton that wraps torch APIs, and
TorchLens wraps torch functions for good, so each peer runs in a fresh process that times its own
no-tool baseline the same way; each ratio is against the baseline of its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import tensorlog


def build(kind: str, device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    if kind == "issue8":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=2000,
            max_position_embeddings=256,
        )
        model = LlamaForCausalLM(cfg).eval().to(device)
        ids = torch.randint(0, 2000, (1, 128), generator=torch.Generator().manual_seed(0)).to(device)
        return model, {"input_ids": ids, "use_cache": False}
    from tensorlog.demo.model import TinyLlama, TinyLlamaConfig

    cfg = TinyLlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2752,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    model = TinyLlama(cfg).eval().to(device)
    return model, {"input_ids": torch.randint(0, 8192, (1, 256)).to(device)}


# A variant sets itself up (untimed), yields the function to time once per forward, and cleans up.
Variant = Callable[[torch.nn.Module, dict[str, Any], Path], "contextmanager[Callable[[], None]]"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_forward(model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(**inputs)


@contextmanager
def no_tool(model, inputs, out) -> Iterator[Callable[[], None]]:
    yield lambda: run_forward(model, inputs)


def tensorlog_variant(**cfg: Any) -> Variant:
    @contextmanager
    def go(model, inputs, out):
        with tensorlog.capture(model, {"output_dir": str(out), "log_step_ids": [], **cfg}) as run:

            def forward() -> None:
                run_forward(model, inputs)
                run.flush()  # the cost of getting the data to disk counts

            yield forward

    return go


@contextmanager
def _output_hooks(model, inputs, on_output: Callable[[str, torch.Tensor], None]) -> Iterator[Callable[[], None]]:
    """A forward hook on every module passing its (first) tensor output to ``on_output``: the naive peers."""

    def make(name: str):
        def hook(mod, args, output):
            t = output[0] if isinstance(output, tuple) else output
            if isinstance(t, torch.Tensor):
                on_output(name, t)

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in model.named_modules() if n]
    try:
        yield lambda: run_forward(model, inputs)
    finally:
        for h in handles:
            h.remove()


def torch_save_hooks(model, inputs, out):
    """The naive peer: torch.save of each module's output."""
    return _output_hooks(model, inputs, lambda n, t: torch.save(t.detach().cpu().clone(), out / f"{n}.pt"))


def stats_list_hooks(model, inputs, out):
    """The other naive peer: max/min/mean/norm of each output into a Python list."""
    stats: list[list[float]] = []

    def record(n: str, t: torch.Tensor) -> None:
        if t.is_floating_point():
            stats.append([t.max().item(), t.min().item(), t.mean().item(), t.norm().item()])

    return _output_hooks(model, inputs, record)


OURS: dict[str, Variant] = {
    "no tool": no_tool,
    "tensorlog: disabled": tensorlog_variant(enabled=False),
    "tensorlog: enabled, step not selected": tensorlog_variant(log_step_ids=[10**9]),
    "tensorlog: statistics, all modules": tensorlog_variant(mode="statistics"),
    "tensorlog: full tensors, all modules": tensorlog_variant(),
    "tensorlog: statistics, op level": tensorlog_variant(mode="statistics", level="op"),
    "hooks: torch.save per module": torch_save_hooks,
    "hooks: max/min/mean/norm into a list": stats_list_hooks,
}


def time_variants(
    variants: dict[str, Variant], model, inputs, reps: int, device: str, out: Path, rounds: int = 2
) -> dict[str, list[float]]:
    """Each variant set up once, then ``reps`` timed forwards; all variants in turn, ``rounds`` times."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):
        run_forward(model, inputs)
    for _ in range(rounds):
        for name, make in variants.items():
            d = out / f"{''.join(c if c.isalnum() else '_' for c in name)}"
            d.mkdir(parents=True, exist_ok=True)
            with make(model, inputs, d) as forward:
                forward()
                for _ in range(reps):
                    _sync(device)
                    t0 = time.perf_counter()
                    forward()
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
            shutil.rmtree(d, ignore_errors=True)
    return times


# -- peers, each in a process of its own ----------------------------------------------------------


def msprobe_variant(task: str, level: str) -> Variant:
    @contextmanager
    def go(model, inputs, out):
        from msprobe.pytorch import PrecisionDebugger

        cfg = {
            "task": task,
            "dump_path": str(out / "msprobe"),
            "rank": [],
            "step": [],
            "level": level,
            "async_dump": False,
            task: {"scope": [], "list": [], "data_mode": ["all"]},
        }
        if task == "statistics":
            cfg[task]["summary_mode"] = "statistics"
        path = out / "msprobe.json"
        path.write_text(json.dumps(cfg))
        dbg = PrecisionDebugger(config_path=str(path))

        def forward() -> None:
            dbg.start(model)
            run_forward(model, inputs)
            dbg.stop()
            dbg.step()

        yield forward

    return go


@contextmanager
def torchlens_variant(model, inputs, out):
    import torchlens

    def forward() -> None:
        with torch.no_grad():
            trace = torchlens.trace(model, input_kwargs=inputs)
        del trace

    yield forward


PEERS: dict[str, Callable[[], Variant]] = {
    "msProbe: statistics, L0": lambda: msprobe_variant("statistics", "L0"),
    "msProbe: statistics, L1 (op level)": lambda: msprobe_variant("statistics", "L1"),
    "msProbe: full tensors, L0": lambda: msprobe_variant("tensor", "L0"),
    "TorchLens: trace, all layers saved": lambda: torchlens_variant,
}


def peer_child(args: argparse.Namespace) -> None:
    model, inputs = build(args.model, args.device)
    out = Path(tempfile.mkdtemp(prefix="tensorlog-bench-peer-"))
    # msProbe's debugger is one per process: one round, baseline before and after it
    times = time_variants(
        {"no tool": no_tool, args.peer: PEERS[args.peer]()}, model, inputs, args.reps, args.device, out, rounds=1
    )
    times["no tool"] += time_variants({"no tool": no_tool}, model, inputs, args.reps, args.device, out, rounds=1)["no tool"]
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["issue8", "big"], default="issue8")
    ap.add_argument("--reps", type=int, default=10, help="timed forwards per variant and round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-peers", action="store_true", help="skip msProbe and TorchLens")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        peer_child(args)
        return
    model, inputs = build(args.model, args.device)
    out = Path(tempfile.mkdtemp(prefix="tensorlog-bench-"))
    times = time_variants(OURS, model, inputs, args.reps, args.device, out)
    shutil.rmtree(out, ignore_errors=True)
    base = statistics.median(times["no tool"])
    rows = [(name, statistics.median(ts), statistics.median(ts) / base) for name, ts in times.items()]
    if not args.no_peers:
        for peer in PEERS:
            cmd = [
                sys.executable,
                __file__,
                "--peer",
                peer,
                "--model",
                args.model,
                "--reps",
                str(args.reps),
                "--device",
                args.device,
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                rows.append((f"{peer} (failed: {last[:80]})", float("nan"), float("nan")))
                continue
            pt = json.loads(r.stdout.strip().splitlines()[-1])
            own = statistics.median(pt["no tool"])
            med = statistics.median(pt[peer])
            rows.append((peer, med, med / own))
    n_modules = sum(1 for n, _ in model.named_modules() if n)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(
        f"# capture overhead: model {args.model} ({n_modules} modules), device {args.device} ({dev}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, median of {args.reps}"
    )
    print("| variant | median ms | ratio vs no tool |\n|---|---:|---:|")
    for name, med, ratio in rows:
        print(f"| {name} | {med * 1e3:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
