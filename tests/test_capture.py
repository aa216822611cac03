"""Capture from plain PyTorch and HF transformers models into the reference layout."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from torch import nn

import tensorlog

REFERENCE_PATTERNS = ["layers\\.0\\.(?!.*rotary_emb).*", "rotary_emb:0", "embed_tokens", "model\\.norm"]

# What the reference patterns select in a 2-layer HF Llama: layer 0's submodules
# (not the layer itself: the pattern needs the trailing dot), the shared
# rotary embedding's first call, the embedding and the final norm.
EXPECTED_MODULES = {
    "model.embed_tokens",
    "model.rotary_emb",
    "model.layers.0.input_layernorm",
    "model.layers.0.self_attn",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.post_attention_layernorm",
    "model.layers.0.mlp",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.0.mlp.act_fn",
    "model.norm",
}


def _dirs(path):
    return {p.name for p in path.iterdir() if p.is_dir()}


def test_reference_config_file_example_gives_reference_layout(hf_llama, prompt, tmp_path):
    cfg_file = tmp_path / "intermediate_logging_config.json"
    cfg_file.write_text(
        json.dumps(
            {
                "output_dir": str(tmp_path / "vllm_intermediates"),
                "module_call_match": REFERENCE_PATTERNS,
                "log_step_ids": [0, 1],
                "device_names": ["cpu"],
            }
        )
    )
    cfg = tensorlog.load_config(cfg_file)
    assert cfg.enabled  # the reference's file has no "enabled" key
    with torch.no_grad(), tensorlog.capture(hf_llama, cfg) as run:
        hf_llama.generate(prompt, max_new_tokens=4, do_sample=False)
    assert run.path.parent == tmp_path / "vllm_intermediates"
    assert _dirs(run.path) == {"step_0", "step_1"}
    for step in ("step_0", "step_1"):
        assert _dirs(run.path / step) == EXPECTED_MODULES
    emb = run.path / "step_0" / "model.embed_tokens"
    assert sorted(p.name for p in emb.iterdir()) == ["inputs.json", "inputs_0_cpu.pt", "outputs.json", "outputs_cpu.pt"]
    # step 0 is the prefill (whole prompt), step 1 the first decode token
    assert torch.load(emb / "inputs_0_cpu.pt").shape == prompt.shape
    assert torch.load(run.path / "step_1" / "model.embed_tokens" / "inputs_0_cpu.pt").shape == (1, 1)
    calls = (run.path / "step_0" / "module_calls.txt").read_text().split()
    assert calls[0] == "model.embed_tokens" and calls[-1] == "model.norm"
    assert set(calls) == EXPECTED_MODULES
    manifest = json.loads((run.path / "run.json").read_text())
    assert manifest["complete"] is True
    assert manifest["steps_written"] == [[0, 1]]  # ranges: an all-day run stays small
    assert manifest["config"]["module_call_match"] == REFERENCE_PATTERNS
    assert manifest["model_class"].endswith("LlamaForCausalLM")
    assert tensorlog.load_run(run.path).manifest.steps_done() == [0, 1]


def test_saved_tensors_equal_what_an_independent_hook_sees(hf_llama, prompt, out_dir):
    seen = {}
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.input_layernorm", "model.norm"]
    handles = []
    for name in names:
        mod = hf_llama.get_submodule(name)

        def record(m, a, o, name=name):
            seen[name] = (a[0].clone(), o.clone())

        handles.append(mod.register_forward_hook(record))
    try:
        with torch.no_grad(), tensorlog.capture(hf_llama, {"output_dir": str(out_dir)}) as run:
            hf_llama(prompt)
    finally:
        for h in handles:
            h.remove()
    step = tensorlog.load_run(run.path).steps[0]
    for name in names:
        d = run.path / "step_0" / name
        assert torch.equal(torch.load(d / "inputs_0_cpu.pt"), seen[name][0])
        assert torch.equal(torch.load(d / "outputs_cpu.pt"), seen[name][1])
        out = step.call(name).outputs[0]
        t = seen[name][1]
        assert out.shape == tuple(t.shape) and out.dtype == "torch.float32"
        assert out.stats["max"] == pytest.approx(t.max().item())
        assert out.stats["std"] == pytest.approx(t.std().item(), rel=1e-5)
        assert out.stats["l2_norm"] == pytest.approx(t.norm().item(), rel=1e-5)


def test_capture_does_not_change_outputs_and_removes_its_hooks(hf_llama, prompt, out_dir):
    with torch.no_grad():
        ref = hf_llama.generate(prompt, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with tensorlog.capture(hf_llama, {"output_dir": str(out_dir), "log_step_ids": []}) as run:
            got = hf_llama.generate(prompt, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.logits, got.logits):
        assert torch.equal(a, b)  # bit-identical, not merely close
    for m in hf_llama.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert sorted(p.name for p in run.path.iterdir() if p.is_dir()) == [f"step_{i}" for i in range(5)]
    run.remove()  # idempotent


class Repeat(nn.Module):
    """Calls one submodule three times per forward, with a kwarg and a non-tensor arg."""

    def __init__(self):
        super().__init__()
        self.sub = nn.Linear(4, 4)
        self.head = Head()

    def forward(self, x):
        for _ in range(3):
            x = self.sub(x)
        return self.head(x, scale=2.0, tag="t")


class Head(nn.Module):
    def forward(self, x, scale, tag):
        return {"y": x * scale, "pair": (x, None)}


def test_call_index_selects_the_ith_call_within_a_step(out_dir):
    model = Repeat()
    x = torch.randn(2, 4)
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(out_dir), "module_call_match": "sub:1"}) as run:
        model(x)
    assert _dirs(run.path / "step_0") == {"sub_1"}
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(out_dir), "module_call_match": ["sub"]}) as run:
        model(x)
    assert _dirs(run.path / "step_0") == {"sub", "sub_1", "sub_2"}
    # the 2nd call's input is the 1st call's output
    assert torch.equal(
        torch.load(run.path / "step_0" / "sub_1" / "inputs_0_cpu.pt"),
        torch.load(run.path / "step_0" / "sub" / "outputs_cpu.pt"),
    )
    assert (run.path / "step_0" / "module_calls.txt").read_text() == "sub\nsub_1\nsub_2\n"


def test_dict_tuple_kwargs_and_non_tensor_values(out_dir):
    model = Repeat()
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(out_dir), "module_call_match": "head"}) as run:
        model(torch.randn(2, 4))
    d = run.path / "step_0" / "head"
    # the reference's names: dict keys and tuple positions join with "_"; keyword tensors are named after the keyword
    assert sorted(p.name for p in d.glob("*.pt")) == ["inputs_0_cpu.pt", "outputs_pair_0_cpu.pt", "outputs_y_cpu.pt"]
    # the reference's json: the positional inputs' structure only
    assert json.loads((d / "inputs.json").read_text()) == {
        "type": "tuple",
        "items": [{"type": "tensor", "shape": [2, 4], "dtype": "torch.float32", "numel": 8}],
    }
    outputs_doc = json.loads((d / "outputs.json").read_text())
    assert outputs_doc["type"] == "dict" and outputs_doc["items"]["pair"]["items"][1] is None
    call = tensorlog.load_run(run.path).steps[0].call("head")
    by_key = {t.key: t for t in call.inputs}
    assert by_key["scale"].entry.value.model_dump() == {"type": "float", "value": 2.0, "class_name": None}
    assert by_key["tag"].entry.value.value == "t"
    assert {t.key: t for t in call.outputs}["pair_1"].entry.value.type == "NoneType"


def test_small_tensors_carry_their_values_in_json(out_dir):
    lin = nn.Sequential(nn.Linear(2, 3))
    with torch.no_grad(), tensorlog.capture(lin, {"output_dir": str(out_dir)}) as run:
        y = lin(torch.tensor([[1.0, 2.0]]))
    out = tensorlog.load_run(run.path).steps[0].call("0").outputs[0]
    assert out.entry.values == y.tolist()  # float32 -> python float is exact
    assert out.entry.numel == 3 and out.entry.stride == [3, 1]


def test_step_selection_under_generate(hf_llama, prompt, out_dir):
    cfg = {"output_dir": str(out_dir), "module_call_match": "embed_tokens", "log_step_ids": [1, 3]}
    with torch.no_grad(), tensorlog.capture(hf_llama, cfg) as run:
        hf_llama.generate(prompt, max_new_tokens=5, do_sample=False)
    assert _dirs(run.path) == {"step_1", "step_3"}
    assert tensorlog.load_run(run.path).manifest.steps_done() == [1, 3]


def test_hooks_are_attached_only_during_selected_steps(hf_llama, prompt, out_dir):
    attached = []
    norm = hf_llama.get_submodule("model.norm")
    probe = hf_llama.model.embed_tokens.register_forward_hook(lambda *a: attached.append(len(norm._forward_hooks)))
    try:
        cfg = {"output_dir": str(out_dir), "module_call_match": "model\\.norm", "log_step_ids": [1]}
        with torch.no_grad(), tensorlog.capture(hf_llama, cfg):
            hf_llama.generate(prompt, max_new_tokens=3, do_sample=False)
    finally:
        probe.remove()
    assert attached == [0, 1, 0]


def test_max_tensor_size_keeps_metadata_but_no_file(out_dir):
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 2))
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(out_dir), "max_tensor_size": 20}) as run:
        model(torch.randn(1, 8))
    d0 = run.path / "step_0" / "0"
    assert sorted(p.name for p in d0.glob("*.pt")) == ["inputs_0_cpu.pt"]  # 8 elements kept, 64 skipped
    out = tensorlog.load_run(run.path).steps[0].call("0").outputs[0]
    assert out.entry.skipped == "max_tensor_size" and out.source is None
    assert out.shape == (1, 64) and out.stats is not None
    # a single output's sidecar would be called outputs.json, the reference's own structure file: it stays intact
    assert json.loads((d0 / "outputs.json").read_text())["type"] == "tensor"


def test_device_names_that_match_nothing_log_nothing(hf_llama, prompt, out_dir):
    with torch.no_grad(), tensorlog.capture(hf_llama, {"output_dir": str(out_dir), "device_names": ["cuda:0"]}) as run:
        hf_llama(prompt)
    assert _dirs(run.path) == set()
    assert json.loads((run.path / "run.json").read_text())["steps_written"] == []


def test_disabled_config_registers_no_hooks_and_writes_nothing(hf_llama, prompt, out_dir):
    with tensorlog.capture(hf_llama, {"enabled": False, "output_dir": str(out_dir)}) as run:
        for m in hf_llama.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks
        with torch.no_grad():
            hf_llama(prompt)
    assert not run.enabled
    assert not out_dir.exists()


def test_manual_steps_when_the_root_is_not_called(out_dir):
    model = Repeat()
    x = torch.randn(2, 4)
    with (
        torch.no_grad(),
        tensorlog.capture(model, {"output_dir": str(out_dir), "module_call_match": "^sub$", "log_step_ids": []}) as run,
    ):
        for _ in range(3):
            model.sub(x)
            run.step()
    assert _dirs(run.path) == {"step_0", "step_1", "step_2"}


def test_call_start_and_end_sequence_numbers_nest(hf_llama, prompt, out_dir):
    with torch.no_grad(), tensorlog.capture(hf_llama, {"output_dir": str(out_dir)}) as run:
        hf_llama(prompt)
    step = tensorlog.load_run(run.path).steps[0]
    calls = {c.dirname: c for c in step.calls}
    parent, child = calls["model.layers.1"], calls["model.layers.1.mlp.down_proj"]
    assert parent.seq_start < child.seq_start < child.seq_end < parent.seq_end
    order = [c.dirname for c in step.by_completion()]
    assert order.index("model.layers.1.mlp.down_proj") < order.index("model.layers.1.mlp") < order.index("model.layers.1")
    assert not list(run.path.rglob(".*tmp*"))  # atomic writes leave no temp files


def test_capture_holds_no_strong_reference_to_the_model(out_dir):
    model = nn.Sequential(nn.Linear(2, 2))
    handle = tensorlog.capture(model, {"output_dir": str(out_dir)})
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    handle.remove()


def test_same_run_name_twice_is_refused(out_dir):
    model = nn.Sequential(nn.Linear(2, 2))
    cfg = {"output_dir": str(out_dir), "run_name": "baseline"}
    with tensorlog.capture(model, cfg):
        model(torch.randn(1, 2))
    with pytest.raises(tensorlog.ConfigError, match="already holds a run"):
        tensorlog.capture(model, cfg)


class AddOneInPlace(nn.Module):
    def forward(self, x):
        return x.add_(1)


def test_shared_snapshots_never_hide_an_in_place_change(out_dir):
    model = nn.Sequential(nn.Linear(3, 3), AddOneInPlace(), nn.Identity())
    x = torch.randn(2, 3)
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(out_dir)}) as run:
        y = model(x)
    d = run.path / "step_0"
    lin_out = torch.load(d / "0" / "outputs_cpu.pt")
    assert torch.equal(torch.load(d / "1" / "inputs_0_cpu.pt"), lin_out)  # before the in-place add
    assert torch.equal(torch.load(d / "1" / "outputs_cpu.pt"), lin_out + 1)
    assert torch.equal(torch.load(d / "2" / "inputs_0_cpu.pt"), y)
    # the unchanged tensor was copied once and written once, the second name is a hard link
    assert (d / "1" / "inputs_0_cpu.pt").stat().st_ino == (d / "0" / "outputs_cpu.pt").stat().st_ino
    assert (d / "1" / "outputs_cpu.pt").stat().st_ino != (d / "0" / "outputs_cpu.pt").stat().st_ino
