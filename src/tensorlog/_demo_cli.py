"""``tensorlog demo``: the whole loop on a built-in tiny model, offline."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from rich.console import Console

from ._capture import capture
from ._demo import TinyLlama
from ._reader import load_run
from ._render import render_run

__all__ = ["run_demo"]

DEMO_CONFIG = {
    "module_call_match": ["embed_tokens", r"layers\.\d+$", r"layers\.\d+\.(self_attn|mlp)$", r"model\.norm", "lm_head"],
    "log_step_ids": [0, 1],
}


def run_demo(output_dir: str | None, console: Console) -> int:
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="tensorlog-demo-"))
    torch.manual_seed(0)
    model = TinyLlama(seed=0).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    console.print(f"[bold]1.[/] capturing a tiny random-init Llama (4 layers, hidden 128), greedy decoding 3 tokens", highlight=False)
    with capture(model, DEMO_CONFIG, output_dir=str(out), run_name="float32") as run:
        model.generate(prompt, max_new_tokens=3)
    console.print(f"   run written to [bold]{run.path}[/]", highlight=False)
    render_run(load_run(run.path), console, steps=[0])
    return 0
