"""The command line: exit codes and one-line errors (in process), and one real subprocess as a smoke test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import tensorlog
from clirun import run as tl


def test_the_installed_command_runs_as_a_subprocess(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "tensorlog", "demo", "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
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
        (["inspect", "{empty}"], "is not a tensorlog run"),
        (["inspect", "{run}", "--modules", "("], "--modules: regex '(' does not compile"),
        (["inspect", "{run}", "--steps", "a,b"], "--steps: comma-separated integers"),
        (["compare", "{run}", "{run}", "--modules", "(a+)+$"], "exponential (or high polynomial) time"),
        (["inspect", "{run}", "--modules", ".*.*.*.*.*.*z"], "unbounded repeats"),
        (["inspect", "{run}", "--modules", "(a?){{32}}a{{32}}"], "can match nothing"),
        (["compare", "{run}"], "compare takes two runs, got 1"),
        (["compare", "{run}", "--dir2", "{run}"], "either as RUN1 RUN2 or as --dir1 RUN1 --dir2 RUN2"),
        (["compare", "{run}", "{run}", "--map", "nope"], "--map: mapping 'nope' is neither a preset"),
        (["replay", "{run}", "--model", "m", "--modules", "("], "--modules: regex '(' does not compile"),
        (["replay", "--model", "/nonexistent"], "replay needs the run"),
        (["capture", "--model", "m", "--input-ids", "1,x"], "--input-ids: comma-separated integers"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_every_user_error_is_one_line_and_exit_2(args, needle, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "step_0").mkdir(parents=True)  # enough of a run for the flags to be the error
    r = tl(*[a.format(run=tmp_path / "run", empty=tmp_path / "empty") for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr, r.stderr
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
    assert tl("compare", "--help").returncode == 0
