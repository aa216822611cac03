"""Runs a capture in a subprocess under a real fault; prints a JSON verdict. Used by test_faults.py.

    python fault_driver.py MODE OUTPUT_DIR [ARGS]

MODE: fsize | loop | sigterm | sigterm_mid | pressure POLICY FACTOR | many | plain
"""

import json
import resource
import signal
import sys
import time

import torch
from torch import nn

import tensorlog


class Big(nn.Module):
    """Small layers first, then one whose output is ~1 MB."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.small = nn.Linear(8, 8)
        self.big = nn.Linear(8, 32768)

    def forward(self, x):
        return self.big(self.small(x))


class Scale(nn.Module):
    def forward(self, x):
        return x * 1.0


class TwoSizes(nn.Module):
    """A small call, then a call of any size: the order that deadlocked 0.1's block policy."""

    def __init__(self):
        super().__init__()
        self.small = Scale()
        self.big = Scale()

    def forward(self, a, b):
        return self.small(a), self.big(b)


class Slow(nn.Module):
    def forward(self, x):
        print("IN_FORWARD", flush=True)
        time.sleep(60)
        return x


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pressure(out: str, policy: str, factor: float) -> None:
    """One call of ``factor`` x the budget after a small one; reports the peak memory growth."""
    budget = 32 << 20
    a = torch.randn(1 << 20)  # 4 MB
    b = torch.randn(int(factor * budget) // 4)
    model = TwoSizes()
    with torch.no_grad():
        model(a, b)  # the model's own peak, before any capture
    base = _maxrss_mb()
    t0 = time.monotonic()
    cfg = {"output_dir": out, "run_name": "r", "log_step_ids": [], "max_pending_bytes": budget, "on_backpressure": policy}
    with tensorlog.capture(model, cfg) as run, torch.no_grad():
        for _ in range(3):
            model(a, b)
    print(
        json.dumps(
            {
                "seconds": time.monotonic() - t0,
                "grew_mb": _maxrss_mb() - base,
                "budget_mb": budget / 2**20,
                "call_mb": 2 * b.numel() * 4 / 2**20,
                "stopped": run.stopped_reason,
            }
        ),
        flush=True,
    )


def many(out: str) -> None:
    """40 layers of 8 MB activations under a 32 MiB budget: shared snapshots must not pile up."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Scale() for _ in range(40)])
    x = torch.randn(2 << 20)
    with torch.no_grad():
        model(x)
    base = _maxrss_mb()
    cfg = {"output_dir": out, "run_name": "r", "max_pending_bytes": 32 << 20}
    with tensorlog.capture(model, cfg), torch.no_grad():
        model(x)
    print(json.dumps({"grew_mb": _maxrss_mb() - base}), flush=True)


def main():
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "pressure":
        return pressure(out, sys.argv[3], float(sys.argv[4]))
    if mode == "many":
        return many(out)
    model = Big()
    x = torch.randn(8, 8)
    with torch.no_grad():
        ref = model(x)
    if mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a too-large write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    if mode == "sigterm_mid":
        model = nn.Sequential(nn.Linear(8, 8), Slow())
    cfg = {"output_dir": out, "run_name": "r", "log_step_ids": []}
    with tensorlog.capture(model, cfg) as run:
        with torch.no_grad():
            for i in range(3 if mode in ("fsize", "plain") else 10**9):
                y = model(x)
                if mode != "sigterm_mid":
                    assert torch.equal(y, ref), "the model's output changed"
                if mode == "loop":
                    time.sleep(0.01)
                if mode == "sigterm" and i == 1:
                    print("READY", flush=True)
                    time.sleep(60)
    print(json.dumps({"stopped": run.stopped_reason, "ok": True}), flush=True)


if __name__ == "__main__":
    main()
