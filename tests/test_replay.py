"""Replay: the error each module adds by itself, isolated from what flowed into it."""

from __future__ import annotations

import copy
import json

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

    plain = tensorlog.compare(a, b, rtol=1e-5, atol=1e-8)  # 1e-4 noise is within float32's rounding budget
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
    from tensorlog.report import headline, render_markdown

    assert "Replay: `model.layers.2.mlp` adds" in headline(with_replay)
    assert "added error (isolated)" in render_markdown(with_replay)


def test_replay_cli_on_hf_decoder_layers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    m = transformers.LlamaForCausalLM(cfg)
    m.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        m.model.layers[1].self_attn.o_proj.weight.mul_(1.05)
    m.save_pretrained(tmp_path / "b")

    from clirun import run as tl

    for name in ("a", "b"):
        r = tl(
            "capture",
            "--model",
            tmp_path / name,
            "--input-ids",
            "3,1,4,1,5,9",
            "--output-dir",
            tmp_path / "runs",
            "--run-name",
            name,
        )
        assert r.returncode == 0, r.stderr
    r = tl(
        "replay",
        "--model",
        tmp_path / "b",
        "--run",
        tmp_path / "runs" / "a",
        "--modules",
        r"layers\.\d+$",
        "--output",
        tmp_path / "replay.json",
    )
    assert r.returncode == 0, r.stderr
    assert "`model.layers.1` adds the most error beyond its precision floor" in r.stdout and "100% of the total" in r.stdout
    data = json.loads((tmp_path / "replay.json").read_text())
    assert [m["status"] for m in data["modules"]] == ["ok", "ok", "ok"]
    assert "self-replay reproduced run A on 3 module call(s)" in data["self_check"]  # model A, from run.json
    r = tl("compare", "--dir1", tmp_path / "runs" / "a", "--dir2", tmp_path / "runs" / "b", "--replay", tmp_path / "replay.json")
    assert r.returncode == 1 and "added error (isolated)" in r.stdout
    assert "First divergence: step 0: `model.layers.1.self_attn.o_proj`" in r.stdout


def _hf_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """Run A: a float32 tiny HF Llama, 8 prompt tokens then 2 decode steps, every step logged."""
    model_a = _hf_llama()
    out = tmp_path_factory.mktemp("replay")
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.no_grad(), tensorlog.capture(model_a, {"output_dir": str(out), "run_name": "a", "log_step_ids": []}) as run:
        model_a.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    return model_a, run.path


def test_a_self_replay_is_exact_on_every_step_prefill_and_decode(fp32_run):
    # 0.1 replayed decode steps without their KV cache: layer 0 showed an error of 1.84 against itself
    model_a, run_a = fp32_run
    res = tensorlog.replay(model_a, run_a, model_a=model_a, modules=[r"layers\.\d+$", r"self_attn$"])
    assert {m.step for m in res.modules} == {0, 1, 2}
    assert all(m.status == "ok" for m in res.modules), [(m.step, m.module, m.note) for m in res.modules if m.status != "ok"]
    assert max(m.isolated_error for m in res.modules) == 0.0 and max(m.self_error for m in res.modules) == 0.0
    assert "self-replay reproduced run A on 24 module call(s)" in res.self_check


def _bf16(model_a, defect: bool):
    model_b = copy.deepcopy(model_a).to(torch.bfloat16)
    if defect:  # relative noise 1e-2 on one layer's down_proj: 1e-3 of relative L2 where bf16 adds ~4e-3 everywhere
        w = model_b.model.layers[2].mlp.down_proj.weight
        with torch.no_grad():
            w.add_((torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * w.float().abs().mean() * 1e-2).to(w.dtype))
    return model_b


@pytest.mark.parametrize(
    "level, culprit",
    [
        (r"layers\.\d+$", "model.layers.2"),
        (r"layers\.\d+\.mlp$", "model.layers.2.mlp"),
        (r"down_proj$", "model.layers.2.mlp.down_proj"),
    ],
)
def test_a_defect_stands_out_above_the_bf16_noise_floor_at_every_level(fp32_run, level, culprit):
    model_a, run_a = fp32_run
    res = tensorlog.replay(_bf16(model_a, defect=True), run_a, model_a=model_a, modules=[level])
    for step in (0, 1, 2):
        top = res.top(step)
        assert top.module == culprit and top.stands_out, [
            (m.module, m.isolated_error, m.floor_error, m.excess) for m in res.ranked(step)
        ]
        others = [m for m in res.ranked(step) if m.module != culprit]
        assert not any(m.stands_out for m in others)
        assert top.floor_error > 0 and top.excess > 0  # bf16 alone adds error in every module; the defect adds more


def test_without_a_defect_no_module_stands_out(fp32_run):
    model_a, run_a = fp32_run
    res = tensorlog.replay(_bf16(model_a, defect=False), run_a, model_a=model_a, modules=[r"layers\.\d+$"])
    assert res.ranked() and not any(m.stands_out for m in res.ranked())
    assert all(m.isolated_error > 0 for m in res.ranked())  # bf16 differs from fp32 everywhere: it is all floor
    from tensorlog.report.replay import replay_headline

    assert replay_headline(res).startswith("No module adds error beyond its precision floor")
