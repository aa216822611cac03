"""``tensorlog demo``: the whole loop on a built-in tiny model, offline.

Two captures of the same tiny model and prompt, the second with one layer's
weights nudged by 0.1% (as a changed kernel or a quantised layer would), and
the comparison that names that layer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.markdown import Markdown

from ._capture import capture
from ._compare import compare
from ._demo import TinyLlama
from ._reader import load_run
from ._render import render_run
from ._report import render_markdown

__all__ = ["run_demo", "DEMO_CONFIG", "PERTURBED"]

DEMO_CONFIG = {
    "module_call_match": ["embed_tokens", r"layers\.\d+$", r"layers\.\d+\.(self_attn|mlp)(\.\w+_proj)?$", r"model\.norm", "lm_head"],
    "log_step_ids": [0, 1],
}
PERTURBED = "model.layers.2.mlp.down_proj"


def run_demo(output_dir: str | None, console: Console) -> int:
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="tensorlog-demo-"))
    model = TinyLlama(seed=0).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))

    console.rule("1. capture: a tiny random-init Llama (4 layers, hidden 128), greedy decoding of 3 tokens")
    with capture(model, DEMO_CONFIG, output_dir=str(out), run_name="baseline") as run1:
        model.generate(prompt, max_new_tokens=3)
    render_run(load_run(run1.path), console, steps=[0])

    console.rule(f"2. capture again, with {PERTURBED}.weight scaled by 1.001")
    with torch.no_grad():
        model.get_submodule(PERTURBED).weight.mul_(1.001)
    with capture(model, DEMO_CONFIG, output_dir=str(out), run_name="perturbed") as run2:
        model.generate(prompt, max_new_tokens=3)
    console.print(f"runs written to [bold]{run1.path}[/] and [bold]{run2.path}[/]", highlight=False)

    console.rule("3. compare: tensorlog compare --dir1 baseline --dir2 perturbed --steps 0")
    result = compare(run1.path, run2.path, steps=[0])
    console.print(Markdown(render_markdown(result)))
    console.print(
        f"Try: tensorlog compare --dir1 {run1.path} --dir2 {run2.path} --output report.html --verbose",
        highlight=False,
        soft_wrap=True,
    )
    return 0
