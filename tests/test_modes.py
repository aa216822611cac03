"""Statistics and checksum modes, op-level capture, data_mode and gradients, Debugger, stacks, anomalies, ranks."""

from __future__ import annotations

import json
import socket
import warnings

import pytest
import torch
from torch import nn

import tensorlog
from conftest import tiny_hf_llama


def _cap(model, out, name, *inputs, **cfg):
    with tensorlog.capture(model, {"output_dir": str(out), "run_name": name, **cfg}) as run:
        with torch.no_grad():
            model(*inputs)
    return run.path


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_statistics_mode_writes_json_only_and_statistics_equal_torchs(tmp_path):
    model, x = Small(), torch.randn(4, 6)
    run = _cap(model, tmp_path, "s", x, mode="statistics")
    assert sorted(p.name for p in run.rglob("*") if p.is_file()) == [
        "modules.json",
        "run.json",
        "steps.jsonl",
        "tensorlog_index.json",
    ]
    out = model.fc1(x).detach()
    st = tensorlog.load_run(run).steps[0].call("fc1").outputs[0].stats
    assert st["min"] == out.min().item() and st["max"] == out.max().item()
    assert st["mean"] == pytest.approx(out.double().mean().item(), rel=1e-7) and st["std"] == pytest.approx(
        out.std().item(), rel=1e-6
    )
    assert st["abs_max"] == out.abs().max().item()
    assert st["l2_norm"] == pytest.approx(torch.linalg.vector_norm(out).item(), rel=1e-6)
    assert st["nan_count"] == 0 and st["inf_count"] == 0


def test_md5_mode_checksums_are_equal_for_equal_tensors_and_differ_after_one_ulp(tmp_path):
    model = Small()
    x = torch.randn(4, 6)
    y = x.clone()
    y[0, 0] = torch.nextafter(y[0, 0], torch.tensor(float("inf")))  # one ulp
    a, b, c = (_cap(model, tmp_path, n, v, mode="md5") for n, v in (("a", x), ("b", x), ("c", y)))
    assert not list(a.rglob("*.pt"))

    def checksum(run):
        e = tensorlog.load_run(run).steps[0].call("fc1").inputs[0]
        assert e.checksum_algorithm == "blake2b-128"
        return e.checksum

    assert checksum(a) == checksum(b) != checksum(c)
    same = tensorlog.compare(a, b)
    assert same.exit_code == 0 and {t.method for m in same.modules for t in m.tensors} == {"checksum"}
    diff = tensorlog.compare(a, c)
    assert diff.exit_code == 1 and not diff.first_divergence  # the input itself differs: nothing is born inside
    assert {m.module: m.verdict for m in diff.modules}["fc1"] == "inherited"
    assert any(t.note == "checksums differ (not bit-exact)" for m in diff.modules for t in m.tensors)
    from tensorlog.report import headline

    assert "the inputs of `fc1` (step 0), the first logged module to see it, already differ" in headline(diff)


def test_statistics_runs_compare_with_each_other_and_with_tensor_runs(tmp_path):
    model, x = Small(), torch.randn(4, 6)
    s1 = _cap(model, tmp_path, "s1", x, mode="statistics")
    t1 = _cap(model, tmp_path, "t1", x)
    with torch.no_grad():
        model.fc2.weight.mul_(1.01)
    s2 = _cap(model, tmp_path, "s2", x, mode="statistics")
    assert tensorlog.compare(s1, t1).exit_code == 0  # statistics vs tensor: the tensor run's stats are used
    res = tensorlog.compare(t1, s2)
    assert res.exit_code == 1 and res.first_divergence[0].module == "fc2"
    rel = next(t.stat_rel for m in res.modules for t in m.tensors if m.module == "fc2" and t.kind == "outputs")
    assert rel["l2_norm"] > 1e-3 and rel["min"] > 0


@pytest.fixture(scope="module")
def eager_llama():
    return tiny_hf_llama("eager")  # matmul + softmax, as the op-level test wants to see them


def test_op_level_on_hf_llama_shows_attention_ops_in_order_and_names_a_perturbed_op(eager_llama, tmp_path):
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        ref = eager_llama(ids).logits
    a = _cap(eager_llama, tmp_path, "a", ids, level="op", module_call_match=r"layers\.0\.self_attn")
    with torch.no_grad():
        assert torch.equal(eager_llama(ids).logits, ref)  # op capture changed nothing
    calls = (a / "step_0" / "module_calls.txt").read_text().split()
    attn = "model.layers.0.self_attn."
    assert calls[:3] == [f"{attn}q_proj.linear_0", f"{attn}k_proj.linear_0", f"{attn}v_proj.linear_0"]
    order = [c for c in calls if c.startswith(attn) and c.rsplit(".", 1)[-1].split("_")[0] in ("matmul", "softmax", "linear")]
    kinds = [c[len(attn) :] for c in order]
    assert kinds.index("matmul_0") < kinds.index("softmax_0") < kinds.index("matmul_1") < kinds.index("o_proj.linear_0")
    assert not any(c.startswith("model.layers.1") for c in calls)
    w = eager_llama.model.layers[0].self_attn.k_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(1.001)
    try:
        b = _cap(eager_llama, tmp_path, "b", ids, level="op", module_call_match=r"layers\.0\.self_attn")
    finally:
        with torch.no_grad():
            w.copy_(saved)
    res = tensorlog.compare(a, b)
    assert res.first_divergence[0].module == f"{attn}k_proj.linear_0"


def test_mix_level_logs_modules_and_ops(tmp_path):
    run = _cap(Small(), tmp_path, "m", torch.randn(2, 6), level="mix")
    assert (run / "step_0" / "module_calls.txt").read_text().split() == [
        "fc1",
        "fc1.linear_0",
        "act",
        "act.tanh_0",
        "fc2",
        "fc2.linear_0",
    ]


def test_data_mode_input_or_output_only(tmp_path):
    x = torch.randn(2, 6)
    run = _cap(Small(), tmp_path, "i", x, data_mode=["input"])
    assert sorted(p.name for p in (run / "step_0" / "fc1").glob("*.pt")) == ["inputs_0_cpu.pt"]
    run = _cap(Small(), tmp_path, "o", x, data_mode="output")
    assert sorted(p.name for p in (run / "step_0" / "fc1").glob("*.pt")) == ["outputs_cpu.pt"]


def test_backward_gradients_are_captured_in_the_same_step(tmp_path):
    model, x = Small(), torch.randn(4, 6)
    seen = {}
    h = model.fc1.register_full_backward_hook(lambda m, gi, go: seen.update(gi=gi[0].clone(), go=go[0].clone()))
    try:
        with tensorlog.capture(
            model, {"output_dir": str(tmp_path), "run_name": "bw", "data_mode": ["forward", "backward"], "log_step_ids": [0, 1]}
        ) as run:
            for _ in range(2):
                x.requires_grad_(True)
                model(x).sum().backward()
    finally:
        h.remove()
    for step in ("step_0", "step_1"):
        order = (run.path / step / "module_calls.txt").read_text().split()
        assert order == ["fc1", "act", "fc2", "fc2.backward", "act.backward", "fc1.backward"]
    d = run.path / "step_1" / "fc1.backward"
    assert torch.equal(torch.load(d / "inputs_0_cpu.pt"), seen["go"])  # gradient w.r.t. the output
    assert torch.equal(torch.load(d / "outputs_0_cpu.pt"), seen["gi"])  # gradient w.r.t. the input


def test_debugger_start_stop_step_like_an_execute_model(tmp_path):
    model = Small()
    dbg = tensorlog.Debugger({"output_dir": str(tmp_path), "run_name": "dbg", "log_step_ids": []})
    handles_before = sum(len(m._forward_hooks) for m in model.modules())

    def execute_model(x, log=True):
        dbg.start(model=model)
        if not log:
            dbg.enabled = False  # off at runtime, hooks stay
        try:
            with torch.no_grad():
                return model(x)
        finally:
            dbg.stop()
            dbg.step()

    for i in range(3):
        execute_model(torch.randn(2, 6), log=i != 1)
    with torch.no_grad():
        model(torch.randn(2, 6))  # outside start/stop: not logged
    dbg.close()
    run = tensorlog.load_run(tmp_path / "dbg")
    assert sorted(run.steps) == [0, 2] and run.complete
    assert sum(len(m._forward_hooks) for m in model.modules()) == handles_before
    with pytest.raises(tensorlog.UsageError, match="needs the model"):
        tensorlog.Debugger({"output_dir": str(tmp_path)}).start()


def test_stack_and_module_hierarchy(tmp_path):
    model = Small()
    run = _cap(model, tmp_path, "st", torch.randn(2, 6), stack=True)
    stacks = json.loads((run / "stack.json").read_text())
    fc1 = next(e for e in stacks if e["module"] == "fc1")
    assert fc1["call_site"].endswith(f"test_modes.py:{Small.forward.__code__.co_firstlineno + 1}")
    assert any("test_modes.py" in f and ":forward" in f for f in fc1["stack"])
    modules = json.loads((run / "modules.json").read_text())
    assert modules[""]["class"] == "Small" and modules[""]["children"] == ["fc1", "act", "fc2"]


class Poison(nn.Module):
    def forward(self, x):
        y = x * 1.0
        y[0, 0] = float("nan")
        return y


def test_anomaly_is_reported_where_it_is_born(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), Poison(), nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(RuntimeWarning, match="NaN/Inf born in '1' at step 0"):
        run = _cap(model, tmp_path, "nan", torch.randn(2, 4), detect_anomaly=True, mode="statistics")
    anomaly = json.loads((run / "run.json").read_text())["anomaly"]
    assert anomaly == {"step": 0, "module": "1", "born_here": True, "nonfinite_outputs": ["outputs_cpu"], "nonfinite_inputs": []}
    with pytest.raises(tensorlog.AnomalyError, match="'1'"), pytest.warns(RuntimeWarning, match="NaN/Inf"):
        _cap(model, tmp_path, "stop", torch.randn(2, 4), detect_anomaly=True, stop_on_anomaly=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = _cap(Small(), tmp_path, "clean", torch.randn(2, 6), detect_anomaly=True)
    assert json.loads((clean / "run.json").read_text())["anomaly"] is None


def test_ranks_select_which_global_ranks_log(tmp_path):
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = Small()
        with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "r1", "ranks": [1]}) as run:
            assert not run.enabled and not model.fc1._forward_hooks
            model(torch.randn(1, 6))
        assert not (tmp_path / "r1").exists()
        run0 = _cap(model, tmp_path, "r0", torch.randn(1, 6), ranks=["0-1"])
        assert json.loads((run0 / "run.json").read_text())["rank"] == 0
    finally:
        dist.destroy_process_group()
