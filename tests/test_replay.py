"""Replay: the error each module adds by itself, isolated from what flowed into it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import tensorlog
from tensorlog.demo.model import TinyLlama


def _capture(model, out, name, ids):
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(out), "run_name": name}) as run:
        model(ids)
    return run.path


def test_replay_isolates_the_perturbed_module_despite_upstream_noise(tmp_path):
    model_a = TinyLlama(seed=0).eval()
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        model_b.model.layers[0].mlp.down_proj.weight.mul_(1 + 1e-4)  # small noise upstream
        model_b.model.layers[2].mlp.down_proj.weight.mul_(1.02)  # the real culprit
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    a, b = _capture(model_a, tmp_path, "a", ids), _capture(model_b, tmp_path, "b", ids)

    plain = tensorlog.compare(a, b)
    assert plain.first_divergence[0].module == "model.layers.0.mlp.down_proj"  # the noise comes first...
    result = tensorlog.replay(model_b, a, modules=[r"layers\.\d+\.mlp$"])
    top = result.top()
    assert top.module == "model.layers.2.mlp" and top.share > 0.9  # ...but layer 2's MLP adds the error
    by_module = {m.module: m for m in result.modules}
    assert set(by_module) == {f"model.layers.{i}.mlp" for i in range(4)}
    assert by_module["model.layers.1.mlp"].isolated_error == 0.0  # untouched modules add nothing
    assert by_module["model.layers.1.mlp"].isolated.exact
    assert 0 < by_module["model.layers.0.mlp"].isolated_error < 1e-3

    with_replay = tensorlog.compare(a, b, replay=result)
    rows = {m.module: m for m in with_replay.modules}
    assert rows["model.layers.2.mlp"].added_share == top.share
    from tensorlog.report.compare import headline, render_markdown

    assert "`model.layers.2.mlp` adds" in headline(with_replay)
    assert "added error (isolated)" in render_markdown(with_replay)


def test_replay_cli_on_hf_decoder_layers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    m = transformers.LlamaForCausalLM(cfg)
    m.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        m.model.layers[1].self_attn.o_proj.weight.mul_(1.05)
    m.save_pretrained(tmp_path / "b")

    def tl(*args):
        return subprocess.run([sys.executable, "-m", "tensorlog", *map(str, args)], capture_output=True, text=True, timeout=300)

    for name in ("a", "b"):
        r = tl("capture", "--model", tmp_path / name, "--input-ids", "3,1,4,1,5,9", "--output-dir", tmp_path / "runs", "--run-name", name)
        assert r.returncode == 0, r.stderr
    r = tl("replay", "--model", tmp_path / "b", "--run", tmp_path / "runs" / "a", "--modules", r"layers\.\d+$", "--output", tmp_path / "replay.json")
    assert r.returncode == 0, r.stderr
    assert "`model.layers.1` adds 100% of the error by itself" in r.stdout
    data = json.loads((tmp_path / "replay.json").read_text())
    assert [m["status"] for m in data["modules"]] == ["ok", "ok", "ok"]
    r = tl("compare", "--dir1", tmp_path / "runs" / "a", "--dir2", tmp_path / "runs" / "b", "--replay", tmp_path / "replay.json")
    assert r.returncode == 1 and "added error (isolated)" in r.stdout
    assert "First divergence: step 0: `model.layers.1.self_attn.o_proj`" in r.stdout
