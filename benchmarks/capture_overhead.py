"""Capture overhead: forward time with each tool, as a ratio against no tool, in one run, beside the physical floor.

Usage (the peers need the peers' venv: ``make bench`` runs it there):

    python benchmarks/capture_overhead.py [--model issue8|big] [--reps 10] [--rounds 3]
                                          [--dir DIR] [--no-peers] [--device cpu|cuda]

Models: ``issue8`` is a tiny HF Llama (hidden 256, intermediate 688, 4 layers, 4 heads,
vocab 2000, one sequence of 128 tokens, float32, ``use_cache=False``); ``big`` is the built-in
Llama-style model at hidden 1024, 8 layers, seq 256 (compute dominates).

Every variant selects all modules and every step. A step returns only once its files are
written (tensorlog's default), so each forward's time includes getting its data out of the
process; the peers write synchronously too. Output goes to ``--dir`` (default: a directory
under the current one, i.e. the machine's disk); the file system is printed, and a RAM disk is
labelled as such. Between variants the output is synced and deleted (untimed), so one variant's
writeback does not slow the next. Variants run in turn, ``--rounds`` times; the median forward
is reported.

The compiled rows compile the model afresh with Inductor and capture it through graph taps, native
(the graph measures and copies; the default) and callback (a Python call per tap); their ratio is
against the compiled model with no tool, and the note gives the time against the eager capture of
the same kind and which taps ran.

The floors: **compiled statistics** = the graph with its native taps on a step that is not logged
(the reductions run in the graph, nothing is read back or written); **full tensors** = the forward plus writing the bytes tensorlog wrote per step at
the speed ``dd oflag=direct`` measures on the same disk, in the same run; **statistics** = bare
forward hooks that take the same four reductions of each output and read them back once per
step, with no bookkeeping. msProbe's debugger is a process-wide singleton that wraps torch APIs
and TorchLens wraps torch functions for good, so each peer runs in a process of its own that
times its own no-tool baseline; its ratio is against that baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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


# A variant sets itself up (untimed) and yields the function to time once per forward.
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
        with tensorlog.capture(model, {"output_dir": str(out), "run_name": "run", "log_step_ids": [], **cfg}) as run:
            yield lambda: run_forward(model, inputs)
            run.flush()  # async_write: the tail is written before the next variant runs (untimed)
        go.bytes_per_step = _bytes_per_step(run.path)  # type: ignore[attr-defined]

    return go


def _bytes_per_step(run_dir: Path) -> float:
    if not (run_dir / "run.json").exists():  # disabled
        return 0.0
    m = json.loads((run_dir / "run.json").read_text())
    steps = sum(b - a + 1 for a, b in m["steps_written"]) or 1
    return m["bytes_written"] / steps


@contextmanager
def _output_hooks(model, inputs, on_output: Callable[[str, torch.Tensor], None], at_end=None) -> Iterator[Callable[[], None]]:
    """A forward hook on every module passing its (first) tensor output to ``on_output``: the naive peers."""

    def make(name: str):
        def hook(mod, args, output):
            t = output[0] if isinstance(output, tuple) else output
            if isinstance(t, torch.Tensor):
                on_output(name, t)

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in model.named_modules() if n]

    def forward() -> None:
        run_forward(model, inputs)
        if at_end is not None:
            at_end()

    try:
        yield forward
    finally:
        for h in handles:
            h.remove()


def torch_save_hooks(model, inputs, out):
    """The naive peer: ``torch.save`` of each module's output, in the hook."""
    step = [0]

    def save(n: str, t: torch.Tensor) -> None:
        d = out / f"step_{step[0]}"
        d.mkdir(exist_ok=True)
        torch.save(t.detach().cpu(), d / f"{n}.pt")

    def next_step() -> None:
        step[0] += 1

    return _output_hooks(model, inputs, save, next_step)


def bare_stat_hooks(model, inputs, out):
    """The statistics floor: min, max, mean and the centred norm of each output, read back once per step."""
    parts: list[torch.Tensor] = []

    def reduce(n: str, t: torch.Tensor) -> None:
        if t.is_floating_point():
            x = t.detach()
            mn, mx = torch.aminmax(x)
            mean = x.mean()
            parts.extend((mn, mx, mean, torch.dist(x, mean)))

    def read_back() -> None:
        if parts:
            torch.stack(parts).tolist()
            parts.clear()

    return _output_hooks(model, inputs, reduce, read_back)


def compiled_variant(**cfg: Any) -> Variant:
    """``torch.compile(model)`` (Inductor), compiled afresh, with tensorlog's graph taps when ``cfg`` is given."""

    @contextmanager
    def go(model, inputs, out):
        torch._dynamo.reset()  # a graph compiled before the taps would be reused as it is
        compiled = torch.compile(model)
        if not cfg:
            compiled(**inputs)
            yield lambda: run_forward(compiled, inputs)
            return
        with tensorlog.capture(compiled, {"output_dir": str(out), "run_name": "run", "log_step_ids": [], **cfg}) as run:
            yield lambda: run_forward(compiled, inputs)
        go.bytes_per_step = _bytes_per_step(run.path)  # type: ignore[attr-defined]
        go.taps = sorted(set((tensorlog.load_run(run.path).manifest.compiled.taps or {}).values()))  # type: ignore[attr-defined]

    return go


COMPILED: dict[str, Variant] = {
    "torch.compile: no tool": compiled_variant(),
    "torch.compile + tensorlog: statistics, graph-native taps": compiled_variant(mode="statistics"),
    "torch.compile + tensorlog: full tensors, packed, graph-native taps": compiled_variant(layout="packed"),
    "torch.compile + tensorlog: statistics, callback taps": compiled_variant(mode="statistics", graph_taps="callback"),
    "torch.compile + tensorlog: full tensors, packed, callback taps": compiled_variant(layout="packed", graph_taps="callback"),
    "floor (compiled statistics): the graph's own reductions, no step logged": compiled_variant(
        mode="statistics", log_step_ids=[10**9]
    ),
}


OURS: dict[str, Variant] = {
    "no tool": no_tool,
    "tensorlog: disabled": tensorlog_variant(enabled=False),
    "tensorlog: enabled, step not selected": tensorlog_variant(log_step_ids=[10**9]),
    "tensorlog: statistics": tensorlog_variant(mode="statistics"),
    "tensorlog: statistics, op level": tensorlog_variant(mode="statistics", level="op"),
    "tensorlog: full tensors, reference layout": tensorlog_variant(),
    "tensorlog: full tensors, packed layout": tensorlog_variant(layout="packed"),
    "tensorlog: full tensors, packed, async_write": tensorlog_variant(layout="packed", async_write=True),
    "floor (statistics): the same reductions in bare hooks": bare_stat_hooks,
    "hooks: torch.save of each output": torch_save_hooks,
}


def time_variants(
    variants: dict[str, Variant], model, inputs, reps: int, device: str, out: Path, rounds: int
) -> dict[str, list[float]]:
    """Each variant set up once per round, then ``reps`` timed forwards; all variants in turn."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):
        run_forward(model, inputs)
    for _ in range(rounds):
        for name, make in variants.items():
            d = out / re.sub(r"\W+", "_", name)
            d.mkdir(parents=True, exist_ok=True)
            with make(model, inputs, d) as forward:
                forward()  # warm-up: first-call costs (file-name caches, the first step's directory)
                for _ in range(reps):
                    _sync(device)
                    t0 = time.perf_counter()
                    forward()
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
            os.sync()
            shutil.rmtree(d, ignore_errors=True)
    return times


def dd_direct(out: Path, mib: int = 1024) -> float:
    """Bytes per second that ``dd oflag=direct`` writes to ``out``'s disk."""
    target = out / "dd.bin"
    r = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={mib // 4}", "oflag=direct"], capture_output=True, text=True
    )
    target.unlink(missing_ok=True)
    m = re.search(r"([\d.]+) s, ", r.stderr)
    return mib * (1 << 20) / float(m.group(1)) if m else float("nan")


def filesystem(path: Path) -> str:
    """``<type> on <device>`` for the mount that holds ``path``."""
    best, found = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) >= len(best):
                best, found = mnt, f"{fstype} on {dev}"
    except OSError:
        pass
    return found + (" (a RAM disk)" if found.startswith(("tmpfs", "ramfs")) else "")


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
    out = Path(tempfile.mkdtemp(prefix="tensorlog-bench-peer-", dir=args.dir))
    # msProbe's debugger is one per process: one setup, baseline before and after it
    times = time_variants({"no tool": no_tool, args.peer: PEERS[args.peer]()}, model, inputs, args.reps, args.device, out, 1)
    times["no tool"] += time_variants({"no tool": no_tool}, model, inputs, args.reps, args.device, out, 1)["no tool"]
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(times))


def run_peers(args: argparse.Namespace) -> list[tuple[str, float, float, str]]:
    rows = []
    for peer in PEERS:
        cmd = [sys.executable, __file__, "--peer", peer, "--model", args.model, "--reps", str(args.reps)]
        cmd += ["--device", args.device, "--dir", args.dir]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            rows.append((peer, float("nan"), float("nan"), f"failed: {last[:80]}"))
            continue
        pt = json.loads(r.stdout.strip().splitlines()[-1])
        med = statistics.median(pt[peer])
        rows.append((peer, med, med / statistics.median(pt["no tool"]), "own process"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["issue8", "big"], default="issue8")
    ap.add_argument("--reps", type=int, default=10, help="timed forwards per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dir", default=".", help="where the variants write (default: here, on this machine's disk)")
    ap.add_argument("--no-peers", action="store_true", help="skip msProbe and TorchLens")
    ap.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True, help="also torch.compile'd rows")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        peer_child(args)
        return
    model, inputs = build(args.model, args.device)
    out = Path(tempfile.mkdtemp(prefix="tensorlog-bench-", dir=args.dir))
    try:
        disk = dd_direct(out)
        times = time_variants(OURS, model, inputs, args.reps, args.device, out, args.rounds)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    base = statistics.median(times["no tool"])
    rows = [(name, statistics.median(ts), statistics.median(ts) / base, "") for name, ts in times.items()]
    packed = OURS["tensorlog: full tensors, packed layout"].bytes_per_step  # type: ignore[attr-defined]
    floor = base + packed / disk
    rows.append(
        ("floor (full tensors): forward + bytes at dd oflag=direct speed", floor, floor / base, f"{packed / 1e6:.1f} MB per step")
    )
    if args.compiled:
        out = Path(tempfile.mkdtemp(prefix="tensorlog-bench-", dir=args.dir))
        try:
            ctimes = time_variants(COMPILED, model, inputs, args.reps, args.device, out, 1)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        cbase = statistics.median(ctimes["torch.compile: no tool"])
        eager_names = {"statistics": "tensorlog: statistics", "full tensors, packed": "tensorlog: full tensors, packed layout"}
        for name, ts in ctimes.items():
            med = statistics.median(ts)
            twin = next((statistics.median(times[e]) for k, e in eager_names.items() if f"tensorlog: {k}" in name), None)
            taps = getattr(COMPILED[name], "taps", None)
            note = "vs torch.compile with no tool" + (f"; {med / twin:.2f}x the eager capture's time" if twin else "")
            note += f"; taps that ran: {', '.join(taps)}" if taps else ""
            rows.append((name, med, med / cbase, note))
        cpacked = COMPILED["torch.compile + tensorlog: full tensors, packed, graph-native taps"].bytes_per_step  # type: ignore[attr-defined]
        cfloor = cbase + cpacked / disk
        rows.append(
            (
                "floor (compiled, full tensors): compiled forward + bytes at dd oflag=direct speed",
                cfloor,
                cfloor / cbase,
                f"{cpacked / 1e6:.1f} MB per step; vs torch.compile with no tool",
            )
        )
    if not args.no_peers:
        rows += run_peers(args)
    n_modules = sum(1 for n, _ in model.named_modules() if n)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(
        f"# capture overhead: model {args.model} ({n_modules} modules), {args.device} ({dev}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores; output on {filesystem(Path(args.dir))}, "
        f"dd oflag=direct {disk / 1e9:.2f} GB/s; median of {args.rounds} x {args.reps} forwards"
    )
    print("| variant | median ms | ratio vs no tool | note |\n|---|---:|---:|---|")
    for name, med, ratio, note in rows:
        print(f"| {name} | {med * 1e3:.1f} | {ratio:.2f}x | {note} |")


if __name__ == "__main__":
    main()
