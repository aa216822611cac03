"""Makes real msProbe dumps, and a tensorlog run of the same model and inputs, for test_msprobe.py.

Runs under the peers venv (``.venv-peers``: torch, mindstudio-probe, tensorlog). msProbe's
PrecisionDebugger is a process-wide singleton that wraps torch APIs, so each dump is made in a
process of its own:

    python msprobe_dumps.py OUT            -> OUT/<name>/ for each msProbe config, OUT/tensorlog/{same,perturbed}
"""

import json
import os
import subprocess
import sys

CONFIGS = {  # name: (task, level, summary_mode)
    "statistics_L0": ("statistics", "L0", "statistics"),
    "tensor_L0": ("tensor", "L0", None),
    "statistics_L1": ("statistics", "L1", "statistics"),
    "tensor_mix": ("tensor", "mix", None),
    "md5_L0": ("statistics", "L0", "md5"),
}


def build():
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, x, scale: float = 1.0):
            y = self.proj(x)  # proj is called twice per forward
            y = self.proj(F.gelu(y)) * scale
            return self.norm(y + x), y.sum()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8))
            self.block = Block()
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.seq(x)
            h, aux = self.block(h, scale=0.5)
            return self.head(h), aux

    return Net()


def seed():
    import random

    import numpy as np
    import torch

    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)


def train(model, before, after):
    """Two training steps; ``before``/``after`` bracket each (the tools' start/stop/step)."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        before()
        out, aux = model(torch.randn(3, 4))
        (out.pow(2).mean() + 0.01 * aux).backward()
        opt.step()
        opt.zero_grad()
        after()


def msprobe_child(out, name):
    from msprobe.pytorch import PrecisionDebugger, seed_all

    task, level, summary = CONFIGS[name]
    cfg = {
        "task": task,
        "dump_path": os.path.join(out, name),
        "rank": [],
        "step": [],
        "level": level,
        "async_dump": False,
        task: {"scope": [], "list": [], "data_mode": ["all"]},
    }
    if summary:
        cfg[task]["summary_mode"] = summary
    path = os.path.join(out, f"{name}.config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    seed_all(1234)
    seed()
    model = build()
    dbg = PrecisionDebugger(config_path=path)

    def after():
        dbg.stop()
        dbg.step()

    train(model, lambda: dbg.start(model), after)


def tensorlog_child(out, name):
    import torch

    import tensorlog

    seed()
    model = build()
    if name == "perturbed":
        with torch.no_grad():
            model.block.proj.weight[0, 0] += 1e-2
    dbg = tensorlog.Debugger({"output_dir": os.path.join(out, "tensorlog"), "run_name": name, "log_step_ids": [0, 1]})

    def after():
        dbg.stop()
        dbg.step()

    train(model, lambda: dbg.start(model), after)
    dbg.close()


if __name__ == "__main__":
    out = sys.argv[1]
    if len(sys.argv) > 3:
        (msprobe_child if sys.argv[2] == "msprobe" else tensorlog_child)(out, sys.argv[3])
    else:
        os.makedirs(out, exist_ok=True)
        jobs = [("msprobe", n) for n in CONFIGS] + [("tensorlog", "same"), ("tensorlog", "perturbed")]
        for kind, name in jobs:
            subprocess.run([sys.executable, __file__, out, kind, name], check=True)
