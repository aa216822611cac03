"""Comparing two runs: metrics, pairing, first divergence, reports, exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import clirun
import tensorlog
from tensorlog.compare import metrics as _metrics
from tensorlog.compare.metrics import compare_tensors

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, tool=False):
    return clirun.run(*args, tool=True) if tool else clirun.run("compare", *args)


# -- metrics ----------------------------------------------------------------------------


def test_metrics_match_independent_formulas():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 33, generator=g)
    b = a + 1e-3 * torch.randn(64, 33, generator=g)
    b[5, 7] = a[5, 7] + 0.5  # the worst element
    m = compare_tensors(a, b, rtol=1e-5, atol=1e-8)
    x, y = a.double().flatten(), b.double().flatten()
    d = (x - y).abs()
    assert not m and m.numel == a.numel()
    assert m.max_abs == pytest.approx(d.max().item())
    assert m.mean_abs == pytest.approx(d.mean().item())
    assert m.worst_index == [5, 7] and m.worst_values == [a[5, 7].item(), b[5, 7].item()]
    assert m.cosine == pytest.approx(torch.nn.functional.cosine_similarity(x, y, dim=0).item())
    assert m.rel_diff == pytest.approx(1 - 2 * (x * y).sum().item() / ((x * x).sum() + (y * y).sum()).item())
    assert m.snr_db == pytest.approx(10 * math.log10((x * x).sum().item() / (d * d).sum().item()))
    outside = (d > 1e-8 + 1e-5 * y.abs()).sum().item()
    assert m.num_outside == outside and m.frac_outside == pytest.approx(outside / x.numel())
    assert m.min_atol == pytest.approx((d - 1e-5 * y.abs()).max().item())
    # the smallest passing atol really passes, and a bit less really fails
    assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=m.min_atol * (1 + 1e-9))
    assert not torch.allclose(a.double(), b.double(), rtol=1e-5, atol=m.min_atol * 0.99)


def test_metrics_are_the_same_when_chunked(monkeypatch):
    a = torch.randn(10_000)
    b = a * 1.0001
    whole = compare_tensors(a, b)
    monkeypatch.setattr(_metrics, "CHUNK_ELEMENTS", 999)
    chunked = compare_tensors(a, b)
    for k in ("max_abs", "mean_abs", "max_rel", "cosine", "snr_db", "num_outside", "worst_index"):
        assert getattr(chunked, k) == pytest.approx(getattr(whole, k), rel=1e-9)


def test_identical_tensors_are_exact():
    a = torch.randn(5, 5)
    m = compare_tensors(a, a.clone())
    assert m and m.exact and m.max_abs == 0 and m.snr_db is None and m.cosine == 1


def test_nan_in_same_positions_is_equal_elsewhere_a_mismatch():
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert compare_tensors(a, a.clone())  # equal_nan semantics, and equal infinities
    b = a.clone()
    b[0] = float("nan")
    m = compare_tensors(a, b)
    assert not m and m.nonfinite_mismatch == 1 and m.worst_index == [0] and m.max_abs == math.inf
    c = a.clone()
    c[2] = -float("inf")
    assert compare_tensors(a, c).nonfinite_mismatch == 1


def test_dtypes_are_compared_in_float64():
    a = torch.randn(100)
    m = compare_tensors(a, a.to(torch.bfloat16))
    assert not m.exact and m.max_rel < 1e-2 and m.cosine > 0.9999


# -- runs -------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block1 = nn.Sequential(nn.Linear(8, 16), nn.GELU())
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))


def _capture(model, out, name, x, **cfg):
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(out), "run_name": name, **cfg}) as run:
        if isinstance(x, dict):
            model.generate(**x)
        else:
            model(x)
    return run.path


def test_same_model_same_input_all_match(tmp_path):
    model, x = Net(), torch.randn(3, 8)
    a, b = _capture(model, tmp_path, "a", x), _capture(model, tmp_path, "b", x)
    r = cli("--dir1", a, "--dir2", b)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All " in r.stdout and "match" in r.stdout
    result = tensorlog.compare(a, b)
    assert result and result.summary.mismatched == 0 and result.summary.pairs_compared > 0


def test_perturbed_module_is_named_in_a_hand_written_model(tmp_path):
    model, x = Net(), torch.randn(3, 8)
    a = _capture(model, tmp_path, "a", x)
    with torch.no_grad():
        model.block2[0].weight[0, 0] += 0.01
    b = _capture(model, tmp_path, "b", x)
    r = cli("--dir1", a, "--dir2", b)
    assert r.returncode == 1
    findings = [line for line in r.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert findings[0].startswith("**First divergence: step 0: `block2.0`")
    result = tensorlog.compare(a, b)
    verdicts = {m.module: m.verdict for m in result.modules}
    assert verdicts["block1"] == verdicts["block1.0"] == "match"
    assert verdicts["block2.0"] == "born"
    assert verdicts["block2"] == "contains"  # the parent is explained by its child
    assert verdicts["block2.1"] == verdicts["head"] == "inherited"


def test_perturbed_module_is_named_in_a_tiny_hf_llama(hf_llama, prompt, tmp_path):
    gen = {"input_ids": prompt, "max_new_tokens": 3, "do_sample": False}
    a = _capture(hf_llama, tmp_path, "a", gen, log_step_ids=[0, 1])
    w = hf_llama.model.layers[1].mlp.up_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1.01)
        b = _capture(hf_llama, tmp_path, "b", gen, log_step_ids=[0, 1])
    finally:
        with torch.no_grad():
            w.copy_(saved)
    result = tensorlog.compare(a, b)
    assert result.exit_code == 1
    # Every module is logged, root-level `model` included: its inputs (token ids) match and
    # its outputs differ, yet the divergence is attributed to the innermost module.
    assert (result.first_divergence[0].step, result.first_divergence[0].module) == (0, "model.layers.1.mlp.up_proj")
    verdicts = {(m.step, m.module): m.verdict for m in result.modules}
    assert verdicts[(0, "model")] == "contains"
    assert verdicts[(0, "model.layers.1.mlp.down_proj")] == "inherited"
    assert verdicts[(0, "model.layers.0.mlp.up_proj")] == "match"


def test_steps_modules_output_and_verbose_flags(tmp_path):
    model = Net()
    x = torch.randn(3, 8)
    a = _capture(model, tmp_path, "a", x)
    with torch.no_grad():
        model.head.bias += 1e-3
    b = _capture(model, tmp_path, "b", x)
    out = tmp_path / "report.json"
    r = cli("--dir1", a, "--dir2", b, "--modules", "^block,^head$", "--output", out, "--steps", "0")
    assert r.returncode == 1 and r.stdout == ""
    data = json.loads(out.read_text())
    assert data["schema_version"] == 3 and data["type"] == "comparison"
    assert {m["module"] for m in data["modules"]} == {"block1", "block1.0", "block1.1", "block2", "block2.0", "block2.1", "head"}
    assert data["first_divergence"][0]["module"] == "head"
    r = cli("--dir1", a, "--dir2", b, "--modules", "block", "--steps", "0")
    assert r.returncode == 0  # only blocks compared: they match
    r = cli("--dir1", a, "--dir2", b, "--steps", "5")
    assert r.returncode == 2 and r.stdout == ""  # never "all 0 match"
    assert "no step 5 in either run (run 1 has step 0, run 2 has step 0)" in r.stderr
    quiet = cli("--dir1", a, "--dir2", b).stdout
    loud = cli("--dir1", a, "--dir2", b, "--verbose").stdout
    assert "outputs_cpu" not in quiet and "outputs_cpu" in loud and "min atol to pass" in loud


def test_reference_command_lines_run_unchanged(tmp_path):
    model = Net()
    x = torch.randn(3, 8)
    run1 = _capture(model, tmp_path, "run1", x, log_step_ids=[])
    run2 = _capture(model, tmp_path, "run2", x, log_step_ids=[])
    r = cli("--dir1", run1, "--dir2", run2, tool=True)
    assert r.returncode == 0 and r.stdout.startswith("# Intermediate Logging Comparison Report")
    report = tmp_path / "comparison_report.md"
    r = cli(
        "--dir1",
        run1,
        "--dir2",
        run2,
        "--steps",
        "0,1",
        "--modules",
        ".*attention.*,.*mlp.*",
        "--rtol",
        "1e-4",
        "--atol",
        "1e-7",
        "--output",
        report,
        tool=True,
    )
    assert r.returncode == 0, r.stderr
    text = report.read_text()
    assert "- Relative tolerance (rtol): 0.0001" in text and "- Absolute tolerance (atol): 1e-07" in text


def test_one_side_only_shape_and_dtype_mismatches_are_reported(tmp_path):
    class Two(nn.Module):
        def __init__(self, extra, dim, dtype):
            super().__init__()
            self.a = nn.Linear(4, dim).to(dtype)
            self.b = nn.Identity()
            if extra:
                self.c = nn.Identity()
            self.dtype = dtype

        def forward(self, x):
            y = self.b(self.a(x.to(self.dtype)))
            return self.c(y) if hasattr(self, "c") else y

    x = torch.randn(2, 4)
    torch.manual_seed(0)
    a = _capture(Two(True, 4, torch.float32), tmp_path, "a", x)
    torch.manual_seed(0)
    b = _capture(Two(False, 4, torch.float64), tmp_path, "b", x)
    torch.manual_seed(0)
    c = _capture(Two(False, 3, torch.float32), tmp_path, "c", x)
    res = tensorlog.compare(a, b)
    verdicts = {m.module: m.verdict for m in res.modules}
    assert verdicts["c"] == "only_in_1" and res.summary.only_in_1 == 2
    out = next(t for m in res.modules for t in m.tensors if m.module == "a" and t.kind == "outputs")
    assert out.dtype1 == "torch.float32" and out.dtype2 == "torch.float64" and "dtype" in out.note
    res = tensorlog.compare(a, c)
    out = next(t for m in res.modules for t in m.tensors if m.module == "a" and t.kind == "outputs")
    assert out.status == "shape_mismatch" and out.note == "shape [2, 4] vs [2, 3]"
    assert res.exit_code == 1


def test_nan_born_in_a_module_is_found(tmp_path):
    class Boom(nn.Module):
        def __init__(self, poison):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.poison = poison

        def forward(self, x):
            y = self.lin(x)
            if self.poison:
                y = y.clone()
                y[0, 0] = float("nan")
            return y

    class M(nn.Module):
        def __init__(self, poison):
            super().__init__()
            torch.manual_seed(0)
            self.first = nn.Linear(4, 4)
            self.boom = Boom(poison)
            self.last = nn.Linear(4, 4)

        def forward(self, x):
            return self.last(self.boom(self.first(x)))

    x = torch.randn(2, 4)
    a, b = _capture(M(False), tmp_path, "a", x), _capture(M(True), tmp_path, "b", x)
    res = tensorlog.compare(a, b)
    assert res.first_divergence[0].module == "boom"
    worst = next(t for m in res.modules for t in m.tensors if m.module == "boom" and t.kind == "outputs")
    assert worst.metrics.nonfinite_mismatch == 1 and worst.metrics.worst_index == [0, 0]


def test_empty_and_non_run_directories_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    model = Net()
    good = _capture(model, tmp_path / "good", "g", torch.randn(1, 8))
    for d1, needle in (
        (empty, "is not a tensorlog run"),
        (tmp_path / "junk", "is not a tensorlog run"),
        (tmp_path / "missing", "no such directory"),
    ):
        r = cli("--dir1", d1, "--dir2", good)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    r = cli("--dir1", good, "--dir2", good, "--steps", "x")
    assert r.returncode == 2 and "--steps" in r.stderr
    r = cli("--dir1", good, "--dir2", good, "--modules", "(")
    assert r.returncode == 2 and "does not compile" in r.stderr


def test_corrupted_tensor_file_is_reported_unreadable(tmp_path):
    model, x = Net(), torch.randn(3, 8)
    a, b = _capture(model, tmp_path, "a", x), _capture(model, tmp_path, "b", x)
    victim = b / "step_0" / "head" / "outputs_cpu.pt"
    victim.write_bytes(victim.read_bytes()[:40])
    res = tensorlog.compare(a, b)
    bad = [t for m in res.modules for t in m.tensors if t.status == "unreadable"]
    assert len(bad) == 1 and "outputs_cpu.pt" in bad[0].note
    assert res.exit_code == 2
    r = cli("--dir1", a, "--dir2", b)
    assert r.returncode == 2 and "unreadable" in r.stdout


def test_markdown_json_html_agree(tmp_path):
    model = Net()
    x = torch.randn(3, 8)
    a = _capture(model, tmp_path, "a", x)
    with torch.no_grad():
        model.block1[0].bias += 0.1
    b = _capture(model, tmp_path, "b", x)
    for fmt in ("md", "json", "html"):
        out = tmp_path / f"r.{fmt}"
        assert cli("--dir1", a, "--dir2", b, "--output", out).returncode == 1
        assert "block1.0" in out.read_text()
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html and "<script" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")


def test_json_schema_is_documented():
    doc = (ROOT / "docs" / "compare-json.md").read_text()
    for model in (tensorlog.Comparison,):
        schema = model.model_json_schema()
        for name, sub in [("Comparison", schema)] + list(schema.get("$defs", {}).items()):
            for field in sub.get("properties", {}):
                assert f"`{field}`" in doc, f"{name}.{field} is not documented in docs/compare-json.md"


def test_progress_reports_modules_and_bytes_and_jobs_agree(tmp_path):
    model, x = Net(), torch.randn(64, 8)
    a = _capture(model, tmp_path, "a", x)
    with torch.no_grad():
        model.head.weight.mul_(1.1)
    b = _capture(model, tmp_path, "b", x)
    seen = []
    serial = tensorlog.compare(
        a, b, progress=lambda p: seen.append((p.modules_done, p.modules_total, p.bytes_done, p.bytes_total))
    )
    assert seen[-1][0] == seen[-1][1] == len(serial.modules)
    assert seen[-1][2] == seen[-1][3] > 0 and [s[2] for s in seen] == sorted(s[2] for s in seen)
    threaded = tensorlog.compare(a, b, jobs=2)
    assert threaded.model_dump() == serial.model_dump()


def test_safetensors_runs_load_and_compare_with_pt_runs(tmp_path):
    model, x = Net(), torch.randn(3, 8)
    pt = _capture(model, tmp_path, "pt", x)
    st = _capture(model, tmp_path, "st", x, format="safetensors")
    files = sorted(p.name for p in (st / "step_0" / "head").iterdir())
    assert files == ["inputs.json", "inputs_0_cpu.safetensors", "outputs.json", "outputs_cpu.safetensors"]
    t = tensorlog.load_run(st).steps[0].call("head").outputs[0].load()
    assert torch.equal(t, torch.load(pt / "step_0" / "head" / "outputs_cpu.pt"))
    assert tensorlog.compare(pt, st).exit_code == 0
    r = cli("--dir1", pt, "--dir2", st, "--map", "no-such-mapping")
    assert r.returncode == 2 and "neither a preset" in r.stderr
