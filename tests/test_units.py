"""Unit tests of the small pure parts: selection, names, flattening, step bookkeeping, the import contract."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensorlog.capture.steps import StepState
from tensorlog.config import load_config
from tensorlog.config.selection import Selector
from tensorlog.schema import names
from tensorlog.schema import vllm_json as ref
from tensorlog.schema.leaves import flatten_inputs, flatten_value

ROOT = Path(__file__).resolve().parents[1]


# -- selection ------------------------------------------------------------------------------


def test_selection_of_modules_calls_steps_devices_and_ranks():
    sel = Selector(
        load_config(
            {
                "module_call_match": ["layers\\.0\\.", "rotary_emb:0", "norm:1", "norm:2"],
                "log_step_ids": [0, 3],
                "device_names": ["cuda"],
                "ranks": [1],
            }
        )
    )
    assert sel.calls_for("model.layers.0.mlp") is None  # every call
    assert sel.calls_for("model.rotary_emb") == frozenset({0})
    assert sel.calls_for("model.norm") == frozenset({1, 2})
    assert sel.calls_for("model.layers.1.mlp") is False
    assert [sel.step(i) for i in range(5)] == [True, False, False, True, False] and sel.last_step == 3
    assert sel.device(torch.device("cuda", 3)) and not sel.device(torch.device("cpu"))
    assert sel.rank(1) and not sel.rank(0) and sel.rank(None)
    every = Selector(load_config({"log_step_ids": []}))
    assert every.calls_for("anything") is None and every.step(10**6) and every.last_step is None


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.0", "model.layers.0"),
        ("a/b", "a_b"),
        ("..", "_.."),
        (".hidden", "_.hidden"),
        ("", "_"),
        ("x\x00y\x1bz", "x_y_z"),
    ],
)
def test_safe_name(name, expected):
    assert names.safe_name(name) == expected


@given(st.text(max_size=400))
def test_safe_names_are_one_component_and_short_in_bytes(name):
    safe = names.safe_name(name)
    assert "/" not in safe and "\x00" not in safe and safe not in ("", ".", "..") and not safe.startswith(".")
    assert len(safe.encode("utf-8", "surrogateescape")) <= names.MAX_NAME_BYTES


def test_the_reference_file_names():
    assert names.call_dir("model.layers.0.mlp", 0) == "model.layers.0.mlp"
    assert names.call_dir("model.rotary_emb", 2) == "model.rotary_emb_2"
    assert names.tensor_file(names.tensor_stem("inputs", ("0",)), "cuda:0") == "inputs_0_cuda_0.pt"
    assert names.tensor_file(names.tensor_stem("outputs", ()), "cpu") == "outputs_cpu.pt"
    assert names.tensor_file(names.tensor_stem("outputs", ("1", "0")), "cpu", rank=1) == "outputs_1_0_cpu_rank1.pt"
    assert names.sidecar_file("inputs_0") == "inputs_0.json"
    assert (names.ref_meta_file("inputs"), names.ref_meta_file("outputs", 2)) == ("inputs.json", "outputs.rank2.json")
    assert names.index_file() == "tensorlog_index.json" and names.run_file(3) == "run.rank3.json"
    assert names.is_temp_name(names.temp_name("x.pt", 12, 34)) and not names.is_temp_name("x.pt")


# -- flattening, as the reference names values ---------------------------------------------------


def test_flattening_names_nested_values_as_the_reference_does():
    k = torch.ones(1)
    leaves, structure = flatten_inputs(([k, k], {"k": k}), {"position_ids": k, "cache": None})
    assert [p for p, _ in leaves] == [("0", "0"), ("0", "1"), ("1", "k"), ("position_ids",), ("cache",)]
    assert structure == {
        "args": [["0_0", "0_1"], {"k": "1_k"}],
        "kwargs": {"position_ids": "position_ids", "cache": "cache"},
        "tuples": [],
    }
    assert [p for p, _ in flatten_value((k, (k, {"a": k})))] == [("0",), ("1", "0"), ("1", "1", "a")]
    assert [p for p, _ in flatten_value(k)] == [()]


def test_the_reference_json_describes_structure_only():
    t = torch.zeros(2, 3)
    assert ref.describe((t, None, 3, "s")) == {
        "type": "tuple",
        "items": [{"type": "tensor", "shape": [2, 3], "dtype": "torch.float32", "numel": 6}, None, 3, "s"],
    }
    big = ref.describe(list(range(25)))
    assert big["length"] == 25 and len(big["sample"]) == 25 and big["note"] == "Showing only first 20 of 25 items"
    assert ref.describe(object())["string_repr"].startswith("<object object")  # no memory address: runs agree
    assert " at 0x" not in ref.describe(object())["string_repr"]
    assert ref.dumps({"a": [1]}) == b'{\n  "a": [\n    1\n  ]\n}'


# -- step bookkeeping ------------------------------------------------------------------------------


def test_step_state_counts_calls_and_keeps_directory_names_unique():
    s = StepState()
    assert [s.next_call("a"), s.next_call("a"), s.next_call("a_1")] == [0, 1, 0]
    assert s.claim_dirname("a", 0) == "a" and s.claim_dirname("a", 1) == "a_1"
    assert s.claim_dirname("a_1", 0) == "a_1~1"  # another module already wrote a_1 in this step
    assert s.claim_dirname("x/y", 0) == "x_y" and s.claim_dirname("x_y", 0) == "x_y~1"
    assert [s.tick(), s.tick()] == [0, 1]
    assert s.order == ["a", "a_1", "a_1~1", "x_y", "x_y~1"]
    s.advance()
    assert s.index == 1 and s.next_call("a") == 0 and s.order == [] and s.tick() == 0


# -- the import contract -----------------------------------------------------------------------------


def test_the_import_contract_holds():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (make test installs it)")
    r = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
