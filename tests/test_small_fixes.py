"""Small fixes, each found by using the tool: what the vLLM demo says ran, ``--steps`` naming no step, the drop-in
``compare_il.py``'s counts, an empty ``module_call_match``, and dict keys that read the same."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import tensorlog
from clirun import run as tl


def _run(tmp_path: Path, name: str, model: nn.Module, *inputs: object, **cfg: object) -> Path:
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": name, **cfg}) as run:
        for x in inputs:
            model(x)
    return run.path


def test_the_vllm_demo_says_what_ran_from_run_json(tmp_path):
    from tensorlog.demo.commands import vllm_run_line

    run = _run(tmp_path, "vllm", nn.Linear(2, 2), torch.zeros(1, 2))
    manifest = json.loads((run / "run.json").read_text())
    for compiled, said in [
        ({"mode": "compiled", "backend": "inductor"}, "vLLM ran the model compiled (inductor)"),
        ({"mode": "compiled", "backend": "inductor", "cudagraphs": True}, "vLLM ran the model compiled (inductor, CUDA graphs)"),
        ({"mode": "eager"}, "vLLM ran the model eagerly"),
        (None, "run.json does not say whether vLLM compiled the model"),
    ]:
        (run / "run.json").write_text(json.dumps({**manifest, "compiled": compiled}))
        line = vllm_run_line(run)
        assert line.endswith(said) and "eager" not in line.replace(said, ""), line


def test_steps_that_neither_run_has_are_one_line_naming_the_steps_each_has(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))  # the root is not logged: a step needs a submodule
    xs = [torch.zeros(1, 2)] * 3
    a, b = _run(tmp_path, "a", model, *xs, log_step_ids=[0, 1, 2]), _run(tmp_path, "b", model, *xs, log_step_ids=[0, 2])
    r = tl("compare", a, b, "--steps", "7")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "tensorlog: error: no step 7 in either run (run 1 has steps 0-2, run 2 has steps 0, 2)"
    assert tl("compare", a, b, "--steps", "2,7").returncode == 0  # step 2 is in both: compared as before


class Scaled(nn.Linear):
    def forward(self, x, mask=None, scale=1.0):
        return super().forward(x) * scale


class Caller(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Scaled(4, 4)

    def forward(self, x):
        return self.a(x, mask=None, scale=2.0)


def test_compare_il_findings_count_the_tensor_pairs_the_table_counts(tmp_path):
    torch.manual_seed(0)
    model, x = Caller(), torch.randn(2, 4)
    a, b = (_run(tmp_path, n, model, x, x, log_step_ids=[0, 1]) for n in "ab")
    out = tl("--dir1", a, "--dir2", b, tool=True).stdout
    assert "| Tensors | 4 | 4 | 0 | 0 |" in out
    findings = out[out.index("## tensorlog findings") :]
    assert "**All 4 compared tensor pairs match" in findings  # inputs_0 and outputs of `a`, two steps
    assert "not counted above: 4 None or scalar values" in findings  # mask and scale, two steps


def test_compare_il_counts_no_step_when_no_module_matches(tmp_path):
    model, x = Caller(), torch.randn(2, 4)
    a, b = (_run(tmp_path, n, model, x, x, log_step_ids=[0, 1]) for n in "ab")
    out = tl("--dir1", a, "--dir2", b, "--modules", "nomatch", tool=True).stdout
    assert "| Steps | 0 | - | - | - |" in out and "## step_" not in out
    (a / "step_1" / "a" / "stray").mkdir()  # a directory without the files the reference reads is no module
    for f in (a / "step_1" / "a").glob("*.*"):
        f.unlink()
    out = tl("--dir1", a, "--dir2", a, tool=True).stdout
    assert "| Steps | 1 | - | - | - |" in out and "| Modules | 1 | 1 | 0 | 0 |" in out


def test_an_empty_module_call_match_logs_every_module_as_the_reference(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    run = _run(tmp_path, "r", model, torch.zeros(1, 2), module_call_match=[])
    assert {p.name for p in (run / "step_0").iterdir() if p.is_dir()} == {"0", "1"}


class TwoZeros(nn.Module):
    def forward(self, x):
        return {0: x + 1, "0": torch.stack([x, x])}


def test_dict_keys_that_read_the_same_get_their_own_file_and_json_entry(tmp_path):
    root = nn.Sequential(TwoZeros())
    run = _run(tmp_path, "r", root, torch.zeros(3))
    d = run / "step_0" / "0"
    assert torch.equal(torch.load(d / "outputs_0_cpu.pt"), torch.ones(3))
    assert torch.load(d / "outputs_0~1_cpu.pt").shape == (2, 3)
    items = json.loads((d / "outputs.json").read_text())["items"]
    assert [(k, v["shape"]) for k, v in items.items()] == [("0", [3]), ("0~1", [2, 3])]  # each names its file
    (call,) = tensorlog.load_run(run).steps[0].calls
    assert sorted(t.key for t in call.outputs) == ["0", "0~1"]


def test_keys_that_json_writes_alike_are_named_as_their_files():
    from tensorlog.schema.leaves import flatten_value
    from tensorlog.schema.vllm_json import describe

    t = torch.zeros(1)
    for value in ({0: t, "0": t, 1: t}, {True: t, "true": t}, {None: t, "null": t, "None": t}):
        stems = ["_".join(path) for path, _ in flatten_value(value)]
        assert list(describe(value)["items"]) == stems and len(set(stems)) == len(value)
    assert list(describe({0: t, 1: t})["items"]) == [0, 1]  # no clash: the reference's keys, as json writes them
