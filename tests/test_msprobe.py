"""Reading real msProbe dumps (mindstudio-probe, on CPU) and comparing them with tensorlog runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import tensorlog

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("TENSORLOG_PEERS_PYTHON", ROOT / ".venv-peers" / "bin" / "python"))
MODULES = [r"^(seq|block|head)"]
pytestmark = pytest.mark.slow  # each dump is made by msProbe in a process of its own


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    if not PEERS.exists():
        pytest.skip(f"no peers venv at {PEERS} (make test builds it with mindstudio-probe)")
    out = tmp_path_factory.mktemp("msprobe")
    r = subprocess.run(
        [str(PEERS), str(ROOT / "tests" / "msprobe_dumps.py"), str(out)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.mark.parametrize(
    "name, first", [("statistics_L0", "seq"), ("tensor_L0", "seq"), ("statistics_L1", "Functional.linear"), ("tensor_mix", "seq")]
)
def test_msprobe_dumps_load_as_runs(dumps, name, first):
    run = tensorlog.load_run(dumps / name)
    assert run.layout == "msprobe" and sorted(run.steps) == [0, 1]
    calls = run.steps[0].calls
    assert calls[0].dirname == first
    if name.endswith("L0"):
        assert [c.dirname for c in calls] == [
            "seq",
            "seq.0",
            "seq.1",
            "seq.2",
            "block",
            "block.proj",
            "block.proj_1",
            "block.norm",
            "head",
        ]
    if name.startswith("tensor"):
        t = run.steps[0].call("block.proj_1").outputs[0]
        assert t.source is not None and t.load().shape == (3, 8)
    else:
        assert all(t.stats for c in calls for t in c.tensors if t.is_tensor)


@pytest.mark.parametrize("name", ["tensor_L0", "statistics_L0", "md5_L0", "tensor_mix"])
def test_a_tensorlog_run_matches_msprobe_dumps_of_the_same_model(dumps, name):
    res = tensorlog.compare(dumps / "tensorlog" / "same", dumps / name, modules=MODULES)
    assert res.exit_code == 0 and res.summary.pairs_compared == 40


def test_a_perturbed_weight_is_located_against_an_msprobe_dump(dumps):
    res = tensorlog.compare(dumps / "tensorlog" / "perturbed", dumps / "tensor_L0", modules=MODULES)
    assert res.exit_code == 1 and (res.first_divergence[0].step, res.first_divergence[0].module) == (0, "block.proj")


def test_two_msprobe_runs_compare(dumps):
    from clirun import run

    r = run("compare", dumps / "tensor_L0", dumps / "statistics_L0")
    assert r.returncode == 0, r.stdout + r.stderr
