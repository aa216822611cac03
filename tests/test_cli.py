"""The command line as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import tensorlog


def tl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tensorlog", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_demo_runs_offline_and_writes_a_run(tmp_path):
    r = tl("demo", "--output-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model.layers.0" in r.stdout
    assert "First divergence: step 0: model.layers.2.mlp.down_proj" in r.stdout.replace("`", "")
    run = tensorlog.load_run(tmp_path / "baseline")
    assert run.complete and sorted(run.steps) == [0, 1]


def test_inspect_shows_modules_shapes_and_stats(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU())
    with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "r"}):
        model(torch.ones(2, 3))
    r = tl("inspect", tmp_path)  # an output dir that holds exactly one run
    assert r.returncode == 0, r.stderr
    assert "outputs_cpu" in r.stdout and "2x5" in r.stdout and "complete" in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["inspect", "/nonexistent/run"], "no such directory"),
        (["inspect", "."], "is not a tensorlog run"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, needle, tmp_path):
    r = tl(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_several_runs_in_an_output_dir_are_named(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"complete": True}))
    r = tl("inspect", tmp_path)
    assert r.returncode == 2 and "holds 2 runs (a, b)" in r.stderr


def test_version_and_help():
    assert tl("--version").stdout.startswith("tensorlog ")
    assert tl().returncode == 2
