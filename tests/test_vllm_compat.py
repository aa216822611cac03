"""Being the reference exactly: its json and file names, its sidecar, its compare_il.py report, its two newer keys,
and every step on disk when it returns. Written from the reference's behaviour (vLLM's intermediates_logging.py and
tools/compare_il.py), not from its code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tensorlog
from tensorlog import cli

ROOT = Path(__file__).resolve().parents[1]


class Nested(nn.Module):
    """Takes and returns nested tuples, lists and dicts, and a keyword input."""

    def forward(self, pair, mapping, *, scale):
        a, b = pair
        return a * scale, (b + 1, {"x": mapping["k"] * 2, "y": [a, b]})


class Root(nn.Module):
    def __init__(self):
        super().__init__()
        self.nested = Nested()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return self.nested([y, x], {"k": y}, scale=torch.full((1,), 3.0))


def _run(tmp_path: Path, name: str, model: nn.Module, x: torch.Tensor, **cfg) -> Path:
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": name, **cfg}) as run:
        model(x)
    return run.path


def test_nested_inputs_outputs_and_keywords_are_named_and_described_as_the_reference_does(tmp_path):
    torch.manual_seed(0)
    run = _run(tmp_path, "n", Root(), torch.randn(2, 4))
    d = run / "step_0" / "nested"
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(
        [
            "inputs.json",
            "outputs.json",
            "inputs_0_0_cpu.pt",
            "inputs_0_1_cpu.pt",
            "inputs_1_k_cpu.pt",  # the reference's names for ([y, x], {"k": y})
            "inputs_scale_cpu.pt",  # a keyword input: tensorlog's addition, named in the same style
            "outputs_0_cpu.pt",
            "outputs_1_0_cpu.pt",
            "outputs_1_1_x_cpu.pt",
            "outputs_1_1_y_0_cpu.pt",
            "outputs_1_1_y_1_cpu.pt",
        ]
    )
    t = {"type": "tensor", "shape": [2, 4], "dtype": "torch.float32", "numel": 8}
    # indent 2, the positional inputs' structure only: nothing that varies between runs whose tensors match
    assert (d / "inputs.json").read_text() == json.dumps(
        {"type": "tuple", "items": [{"type": "list", "items": [t, t]}, {"type": "dict", "items": {"k": t}}]}, indent=2
    )
    assert json.loads((d / "outputs.json").read_text()) == {
        "type": "tuple",
        "items": [
            t,
            {"type": "tuple", "items": [t, {"type": "dict", "items": {"x": t, "y": {"type": "list", "items": [t, t]}}}]},
        ],
    }
    y = torch.load(run / "step_0" / "lin" / "outputs_cpu.pt")
    assert torch.equal(torch.load(d / "outputs_1_1_x_cpu.pt"), y * 2)
    assert torch.load(d / "inputs_0_0_cpu.pt", weights_only=True).equal(y)  # plain torch.load, weights_only


def test_the_max_tensor_size_sidecar_is_the_references(tmp_path):
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 2))
    run = _run(tmp_path, "s", model, torch.randn(1, 8), max_tensor_size=20)
    d1 = run / "step_0" / "1"
    assert json.loads((d1 / "inputs_0.json").read_text()) == {
        "shape": [1, 64],
        "dtype": "torch.float32",
        "device": "cpu",
        "numel": 64,
        "skipped": "Tensor size 64 exceeds max_tensor_size 20",
    }
    assert (d1 / "inputs_0.json").read_text().startswith('{\n  "shape"')  # indent 2
    assert not (d1 / "inputs_0_cpu.pt").exists()
    # a single output over the limit: the reference's sidecar would overwrite outputs.json; ours stays the structure
    assert json.loads((run / "step_0" / "0" / "outputs.json").read_text())["type"] == "tensor"


def test_runs_whose_tensors_match_have_identical_metadata_files(tmp_path):
    torch.manual_seed(0)
    model = Root()
    x = torch.randn(2, 4)
    a = _run(tmp_path, "a", model, x)
    with torch.no_grad():
        model.lin.weight.add_(1e-9)  # noise that leaves the tensors allclose
    b = _run(tmp_path, "b", model, x, module_call_match=["nested", "lin", "^$"])  # another selection: other seq numbers
    for f in a.rglob("*.json"):
        rel = f.relative_to(a)
        if rel.name in ("run.json", "tensorlog_index.json", "modules.json"):
            continue
        assert (b / rel).read_bytes() == f.read_bytes(), rel


class Perturbable(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x, flag=True):
        return self.c(torch.relu(self.b(self.a(x))))


def test_compare_il_prints_the_references_report_with_its_counts_and_exit_code(tmp_path, capsys):
    model, x = Perturbable(), torch.randn(3, 4)
    a = _run(tmp_path, "a", model, x, log_step_ids=[0, 1])
    with torch.no_grad():
        model.b.weight.mul_(1.01)
    b = _run(tmp_path, "b", model, x, log_step_ids=[0])
    code = cli.compare_il_main(["--dir1", str(a), "--dir2", str(b)])
    out = capsys.readouterr().out
    assert code == 0  # the reference's exit code, also on a mismatch
    lines = out.splitlines()
    assert lines[:12] == [
        "# Intermediate Logging Comparison Report",
        "",
        "Comparing intermediate logging outputs between:",
        f"- **Directory 1**: `{a}`",
        f"- **Directory 2**: `{b}`",
        "",
        "Comparison parameters:",
        "- Relative tolerance (rtol): 1e-05",
        "- Absolute tolerance (atol): 1e-08",
        "",
        "## Overall Summary",
        "",
    ]
    # step_0: a, b, c in both runs; b and c differ (c's input is b's output). Only tensor files count as
    # tensors: 2 per module (inputs_0, outputs), the keyword value ``flag`` is not one.
    assert lines[14:17] == ["| Steps | 1 | - | - | - |", "| Modules | 3 | 1 | 2 | 0 |", "| Tensors | 6 | 3 | 3 | 0 |"]
    assert "## step_0" in lines and "**Summary**: 1 matching modules, 2 mismatched modules, 0 missing modules" in lines
    assert "### ✅ a" in lines and "### ❌ b" in lines and "### ❌ c" in lines
    i = lines.index("### ❌ b")
    assert lines[i + 2] == "**Summary**: 1 matching tensors, 1 mismatched tensors, 0 missing tensors"
    assert "| inputs_0_cpu.pt | ✅ | Tensors match |" in lines[i : i + 20]
    assert any(ln.startswith("| outputs_cpu.pt | ❌ | Max abs diff: ") for ln in lines[i : i + 20])
    assert (
        "## tensorlog findings" in out
    )  # tensorlog's findings follow, in one added section and "First divergence: step 0: `b`" in out


def test_compare_il_counts_missing_modules_and_steps_as_the_reference(tmp_path, capsys):
    model, x = Perturbable(), torch.randn(3, 4)
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "a", "log_step_ids": [0, 1]}) as run:
        model(x)
        model(x)
    a = run.path
    b = _run(tmp_path, "b", model, x, module_call_match=["^a$", "^b$"])
    out_file = tmp_path / "report.md"
    assert cli.compare_il_main(["--dir1", str(a), "--dir2", str(b), "--output", str(out_file)]) == 0
    text = out_file.read_text()
    assert "| Steps | 1 | - | - | - |" not in text and "| Steps | 2 | - | - | - |" in text
    assert "| Modules | 2 | 2 | 0 | 4 |" in text  # c at step 0, and a, b, c at step 1, are missing in dir2
    assert f"**Error**: Module missing in {b}" in text


def test_tools_compare_il_runs_from_a_checkout(tmp_path):
    model, x = Perturbable(), torch.randn(3, 4)
    a, b = _run(tmp_path, "a", model, x), _run(tmp_path, "b", model, x)
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compare_il.py"), "--dir1", str(a), "--dir2", str(b), "--verbose"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.startswith("# Intermediate Logging Comparison Report")
    assert "| Tensors | 6 | 6 | 0 | 0 |" in r.stdout and "#### Input Tensors" in r.stdout  # verbose: every table


# -- the newer reference keys -----------------------------------------------------------------


class InPlace(nn.Module):
    def forward(self, x):
        x.mul_(2)  # changes its input in place
        return x + 1


def test_log_post_fwd_inputs_shows_an_input_changed_in_place(tmp_path):
    x = torch.ones(2, 2)
    model = nn.Sequential(InPlace())
    run = _run(tmp_path, "p", model, x, log_post_fwd_inputs=True)
    d = run / "step_0" / "0"
    assert torch.equal(torch.load(d / "inputs_0_cpu.pt"), torch.ones(2, 2))
    assert torch.equal(torch.load(d / "post_fwd_inputs_0_cpu.pt"), torch.full((2, 2), 2.0))
    assert json.loads((d / "post_fwd_inputs.json").read_text())["type"] == "tuple"
    call = tensorlog.load_run(run).steps[0].call("0")
    assert [t.name for t in call.post_fwd_inputs] == ["post_fwd_inputs_0_cpu"]


def test_reload_input_dir_runs_each_module_on_the_other_runs_inputs(tmp_path):
    model, x = Perturbable(), torch.randn(3, 4)
    a = _run(tmp_path, "a", model, x)
    with torch.no_grad():
        model.a.weight.mul_(1.05)  # a defect upstream...
        model.c.weight.mul_(1.01)  # ...and one downstream
    plain = _run(tmp_path, "plain", model, x)
    grafted = _run(tmp_path, "grafted", model, x, reload_input_dir=str(a))
    res = tensorlog.compare(a, plain)
    assert {m.module: m.verdict for m in res.modules}["b"] == "inherited"  # b only inherits a's defect...
    res = tensorlog.compare(a, grafted)
    outs = {m.module: m.outputs_match for m in res.modules}
    assert outs == {"a": False, "b": True, "c": False}  # ...fed a's recorded inputs, b adds nothing, c its own
    manifest = json.loads((grafted / "run.json").read_text())
    assert manifest["grafted_from"] == str(a.resolve())
    assert all(c.extra.get("grafted") for c in tensorlog.load_run(grafted).calls())


def test_reload_input_dir_refuses_a_mismatched_tensor_before_substituting(tmp_path):
    model, x = Perturbable(), torch.randn(3, 4)
    a = _run(tmp_path, "a", model, x)
    with pytest.raises(tensorlog.GraftError, match=r"is \[3, 4\] torch.float32, but 'a' was called with \[5, 4\]"):
        _run(tmp_path, "bad", model, torch.randn(5, 4), reload_input_dir=str(a))
    with pytest.raises(tensorlog.GraftError, match="holds no step_<N>"):
        _run(tmp_path, "none", model, x, reload_input_dir=str(tmp_path / "a" / "step_0"))


# -- every step on disk when it returns -------------------------------------------------------------


def test_a_step_is_on_disk_when_the_forward_returns(tmp_path):
    model, x = Perturbable(), torch.randn(3, 4)
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "v", "log_step_ids": []}) as run:
        for step in range(3):
            model(x)
            index = run.path / f"step_{step}" / "tensorlog_index.json"
            assert index.exists() and (run.path / f"step_{step}" / "c" / "outputs_cpu.pt").exists()
            assert tensorlog.load_run(run.path).steps[step].complete
    assert json.loads((run.path / "run.json").read_text())["steps_written"] == [[0, 2]]


def test_a_debugger_step_is_on_disk_when_step_returns(tmp_path):
    model, x = Perturbable(), torch.randn(3, 4)
    dbg = tensorlog.Debugger({"output_dir": str(tmp_path), "run_name": "d", "log_step_ids": [0, 2]})
    for step in range(3):
        dbg.start(model)
        with torch.no_grad():
            model(x)
        dbg.stop()
        dbg.step()
        assert (tmp_path / "d" / f"step_{step}" / "tensorlog_index.json").exists() == (step in (0, 2))
    dbg.close()


def test_async_write_is_an_explicit_option(tmp_path):
    model, x = Perturbable(), torch.randn(3, 4)
    with (
        torch.no_grad(),
        tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "a", "async_write": True, "log_step_ids": []}) as run,
    ):
        for _ in range(5):
            model(x)
    assert sorted(tensorlog.load_run(run.path).steps) == [0, 1, 2, 3, 4]  # flushed on remove()
