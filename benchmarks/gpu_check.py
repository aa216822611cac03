"""CUDA checks for one lent GPU machine: device names, non-blocking side-stream copies, on-device
statistics and anomaly checks, CUDA-vs-CPU comparison, graph-native taps under CUDA graph replay.
Prints one PASS/FAIL line per check.

Usage: PYTHONPATH=src python benchmarks/gpu_check.py OUTDIR
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import tensorlog
from tensorlog.demo.model import TinyLlama

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


class AddOneInPlace(nn.Module):
    def forward(self, x):
        return x.add_(1)


def main(out: Path) -> int:
    dev = torch.device("cuda:0")
    print("device:", torch.cuda.get_device_name(dev), "torch", torch.__version__)
    model = TinyLlama(seed=0).eval().to(dev)
    ids = torch.randint(0, 512, (2, 64), device=dev)
    seen = {}
    name = "model.layers.1.mlp.down_proj"
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.update(i=a[0].cpu(), o=o.cpu()))
    with torch.no_grad():
        ref = model(ids)
        with tensorlog.capture(model, {"output_dir": str(out), "run_name": "cuda"}) as run:
            got = model(ids)
    h.remove()
    check("outputs unchanged under capture", torch.equal(ref, got))
    d = run.path / "step_0" / name
    files = sorted(p.name for p in d.glob("*.pt"))
    check("device tag in file names", files == ["inputs_0_cuda_0.pt", "outputs_cuda_0.pt"], str(files))
    check("saved input equals an independent hook's", torch.equal(torch.load(d / "inputs_0_cuda_0.pt"), seen["i"]))
    check("saved output equals an independent hook's", torch.equal(torch.load(d / "outputs_cuda_0.pt"), seen["o"]))
    meta = json.loads((d / "outputs.json").read_text())["outputs"][0]
    check("json device", meta["device"] == "cuda:0", meta["device"])

    # a side-stream copy must see the value before a later in-place change on the compute stream
    m2 = nn.Sequential(nn.Linear(4096, 4096), AddOneInPlace(), nn.Linear(4096, 4096)).to(dev)
    x = torch.randn(512, 4096, device=dev)
    with torch.no_grad():
        lin = m2[0](x).cpu()
        with tensorlog.capture(m2, {"output_dir": str(out), "run_name": "inplace"}) as run2:
            m2(x)
    d2 = run2.path / "step_0"
    check("pre-in-place value kept (side stream)", torch.equal(torch.load(d2 / "1" / "inputs_0_cuda_0.pt"), lin))
    check("post-in-place value kept", torch.equal(torch.load(d2 / "1" / "outputs_cuda_0.pt"), lin + 1))

    with torch.no_grad(), tensorlog.capture(m2, {"output_dir": str(out), "run_name": "stats", "mode": "statistics"}) as run3:
        y = m2[0](x)
        m2(x)
    st = json.loads((run3.path / "step_0" / "0" / "outputs.json").read_text())["outputs"][0]["stats"]
    check(
        "on-device statistics equal torch's",
        abs(st["max"] - y.max().item()) == 0 and abs(st["mean"] - y.mean().item()) < 1e-6,
        f"{st['max']} vs {y.max().item()}",
    )
    check("statistics mode writes no tensor file", not list(run3.path.rglob("*.pt")))

    with (
        torch.no_grad(),
        tensorlog.capture(model, {"output_dir": str(out), "run_name": "cpuonly", "device_names": ["cpu"]}) as run4,
    ):
        model(ids)
    check("device_names=['cpu'] logs nothing on CUDA", not any(p.is_dir() for p in run4.path.iterdir()))

    class Poison(nn.Module):
        def forward(self, x):
            return x / 0.0 * 0.0

    m5 = nn.Sequential(nn.Linear(8, 8), Poison(), nn.Linear(8, 8)).to(dev)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with (
            torch.no_grad(),
            tensorlog.capture(
                m5, {"output_dir": str(out), "run_name": "nan", "detect_anomaly": True, "mode": "statistics"}
            ) as run5,
        ):
            m5(torch.randn(2, 8, device=dev))
    anomaly = json.loads((run5.path / "run.json").read_text())["anomaly"]
    check("NaN born in module '1' on CUDA", anomaly and anomaly["module"] == "1" and anomaly["born_here"], str(anomaly))

    cpu_model = TinyLlama(seed=0).eval()
    with torch.no_grad(), tensorlog.capture(cpu_model, {"output_dir": str(out), "run_name": "cpu"}) as run6:
        cpu_model(ids.cpu())
    res = tensorlog.compare(run6.path, run.path, rtol=1e-3, atol=1e-4)
    check(
        "CPU run vs CUDA run pair and match",
        res.exit_code == 0 and res.summary.only_in_1 == 0,
        f"exit {res.exit_code}, {res.summary.pairs_compared} pairs, only-in-one {res.summary.only_in_1}/{res.summary.only_in_2}",
    )
    graph_native_under_cuda_graphs(model, out, dev)
    failed = [n for n, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def graph_native_under_cuda_graphs(model: nn.Module, out: Path, dev: torch.device) -> None:
    """Graph-native taps inside CUDA graph trees (``mode="reduce-overhead"``): every step but the first replays a
    recorded graph, so each step's logged values must still be that step's (a tap that replay skipped would
    leave the previous step's numbers)."""
    from torch._dynamo.utils import counters

    steps = [torch.randint(0, 512, (2, 64), device=dev, generator=torch.Generator(device=dev).manual_seed(k)) for k in range(4)]
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(out), "run_name": "cg-eager", "log_step_ids": []}) as eager:
        for ids in steps:
            model(ids)
    torch._dynamo.reset()
    counters.clear()
    untapped = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        plain = [untapped(ids).clone() for ids in steps]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead")
    cfg = {"output_dir": str(out), "run_name": "cg-native", "log_step_ids": [], "mode": "tensor", "layout": "packed"}
    with torch.no_grad(), tensorlog.capture(compiled, cfg) as run:
        tapped = [compiled(ids).clone() for ids in steps]
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    check("CUDA graph trees kept with graph-native taps", skips == 0, f"cudagraph_skips={skips} {dict(counters['inductor'])}")
    check("outputs bit-identical to the untapped reduce-overhead model", all(torch.equal(a, b) for a, b in zip(plain, tapped)))
    loaded = tensorlog.load_run(run.path)
    taps = set((loaded.manifest.compiled.taps or {}).values())
    check("taps that ran are graph-native", taps == {"graph"}, str(taps))
    res = tensorlog.compare(eager.path, run.path, rtol=1e-3, atol=1e-4)
    check(
        "each replayed step's values equal the eager capture's",
        res.exit_code == 0 and res.summary.only_in_1 == 0 and res.summary.pairs_compared > 0,
        f"exit {res.exit_code}: {res.summary}",
    )


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())))
