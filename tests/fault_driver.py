"""Runs a capture in a subprocess under a real fault; prints a JSON verdict. Used by test_faults.py.

    python fault_driver.py MODE OUTPUT_DIR     MODE: fsize | loop | sigterm | plain
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


def main():
    mode, out = sys.argv[1], sys.argv[2]
    model = Big()
    x = torch.randn(8, 8)
    with torch.no_grad():
        ref = model(x)
    if mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a too-large write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    cfg = {"output_dir": out, "run_name": "r", "log_step_ids": []}
    with tensorlog.capture(model, cfg) as run:
        with torch.no_grad():
            for i in range(3 if mode in ("fsize", "plain") else 10**9):
                y = model(x)
                assert torch.equal(y, ref), "the model's output changed"
                if mode == "loop":
                    time.sleep(0.01)
                if mode == "sigterm" and i == 1:
                    run.flush()
                    print("READY", flush=True)
                    time.sleep(60)
    print(json.dumps({"stopped": run.stopped_reason, "ok": True}), flush=True)


if __name__ == "__main__":
    main()
