"""Faults made real: file-size limits, a full disk, a read-only directory, a hook that raises,
budgets, back-pressure, kill -9, SIGTERM, concurrent writers, and hostile files on disk."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tensorlog
from tensorlog import RunReadError

HERE = Path(__file__).resolve().parent


def _drive(mode, out, **kw):
    return subprocess.run([sys.executable, str(HERE / "fault_driver.py"), mode, str(out)], capture_output=True, text=True,
                          timeout=120, **kw)


def _assert_intact(run_dir: Path) -> tensorlog.Run:
    """Everything the reader lists loads; nothing half-written is listed; no temp file is left visible."""
    run = tensorlog.load_run(run_dir)
    for call in run.calls():
        for t in call.tensors:
            if t.path is not None:
                t.load()
    return run


def test_file_size_limit_stops_logging_cleanly_and_the_model_runs_on(tmp_path):
    r = _drive("fsize", tmp_path)
    assert r.returncode == 0, r.stderr
    verdict = json.loads(r.stdout.strip().splitlines()[-1])
    assert "disk full or file too large" in verdict["stopped"]
    run = _assert_intact(tmp_path / "r")
    assert not run.complete and "file too large" in run.incomplete_reason
    assert run.steps[0].call("small").outputs[0].load().shape == (8, 8)  # written before the fault, kept


def _tmpfs(path: Path, size: str, *opts: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the full-disk test needs root")


def test_full_disk_stops_logging_cleanly(tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, "600k")
    try:
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
        x = torch.randn(64, 256)
        with torch.no_grad():
            ref = model(x)
        with pytest.warns(RuntimeWarning, match="disk full"):
            with tensorlog.capture(model, {"output_dir": str(disk), "run_name": "r", "log_step_ids": []}) as run:
                for _ in range(4):
                    with torch.no_grad():
                        assert torch.equal(model(x), ref)
        assert run.stopped_reason.startswith("disk full")
        loaded = _assert_intact(disk / "r")
        assert not loaded.complete
        assert any(c.outputs for c in loaded.calls())  # what was written before the disk filled is kept
    finally:
        subprocess.run(["umount", str(disk)])


def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    _tmpfs(ro, "1m", "ro")
    try:
        with pytest.raises(tensorlog.ConfigError, match="cannot create output directory"):
            tensorlog.capture(nn.Linear(2, 2), {"output_dir": str(ro)})
        r = subprocess.run([sys.executable, "-m", "tensorlog", "capture", "--model", "/nonexistent", "--input-ids", "1", "--output-dir", str(ro)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr
    finally:
        subprocess.run(["umount", str(ro)])


def test_output_dir_turning_read_only_mid_run(tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, "8m")
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        x = torch.randn(2, 4)
        with pytest.warns(RuntimeWarning, match="logging stopped"):
            with tensorlog.capture(model, {"output_dir": str(disk), "run_name": "r", "log_step_ids": []}) as run:
                model(x)
                run.flush()
                subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
                y = model(x)
                run.flush()
        assert torch.equal(y, model(x)) and run.stopped_reason
        assert _assert_intact(disk / "r").steps[0].call("0") is not None
    finally:
        subprocess.run(["umount", str(disk)])


class Hostile(dict):
    def items(self):
        raise RuntimeError("boom")


class Weird(nn.Module):
    def forward(self, x):
        return Hostile(y=x)


def test_a_hook_that_raises_is_contained(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), Weird())
    x = torch.randn(1, 3)
    with pytest.warns(RuntimeWarning, match="hook on '1' raised RuntimeError: boom"):
        with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "r"}) as run:
            out = model(x)
    assert torch.equal(out["y"], model[0](x))
    manifest = json.loads((run.path / "run.json").read_text())
    assert manifest["complete"] is False and "boom" in manifest["incomplete_reason"]
    assert (run.path / "step_0" / "0" / "outputs_cpu.pt").exists()  # written before the fault


def test_budget_stops_logging_and_says_so(tmp_path):
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    with pytest.warns(RuntimeWarning, match="max_total_bytes reached"):
        with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "r", "max_total_bytes": 40_000, "log_step_ids": []}) as run:
            for _ in range(3):
                model(torch.randn(16, 64))
    loaded = _assert_intact(run.path)
    assert not loaded.complete and "max_total_bytes" in loaded.incomplete_reason
    files = {f.stat().st_ino: f.stat().st_size for f in run.path.rglob("*.pt")}  # hard links count once
    assert 0 < sum(files.values()) <= 40_000 + 1600 * len(files)  # the budget, plus torch.save's framing per file


def test_backpressure_drop_records_what_was_dropped_and_block_loses_nothing(tmp_path):
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(30)])
    x = torch.randn(64, 128)
    with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "drop", "max_pending_bytes": 1, "on_backpressure": "drop"}) as run:
        model(x)
    dropped = json.loads((run.path / "run.json").read_text())["dropped"]
    written = {c.dirname for c in tensorlog.load_run(run.path).calls()}
    assert dropped and {d["module"] for d in dropped}.isdisjoint(written)
    assert len(written) + len(dropped) == 30
    with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "block", "max_pending_bytes": 1}) as run:
        model(x)
    assert len(list(tensorlog.load_run(run.path).calls())) == 30


def test_kill_9_mid_run_leaves_a_readable_incomplete_run(tmp_path):
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_driver.py"), "loop", str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "r" / "step_5" / "module_calls.txt").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    run = _assert_intact(tmp_path / "r")
    assert not run.complete
    assert len(run.steps) >= 6
    res = tensorlog.compare(tmp_path / "r", tmp_path / "r")
    assert res.exit_code == 0 and "incomplete" in " ".join(res.notes)


def test_sigterm_flushes_and_finalises(tmp_path):
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_driver.py"), "sigterm", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    run = _assert_intact(tmp_path / "r")
    assert run.complete and sorted(run.steps) == [0, 1]


def test_two_processes_share_an_output_dir_without_collisions(tmp_path):
    code = ("import sys, torch, tensorlog; m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64));"
            "cfg = {'output_dir': sys.argv[1], 'run_name': sys.argv[2], 'log_step_ids': []}\n"
            "with tensorlog.capture(m, cfg):\n    [m(torch.randn(8, 64)) for _ in range(20)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for name in ("a", "b"):
        run = _assert_intact(tmp_path / name)
        assert run.complete and len(run.steps) == 20
    same = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "same"], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in same]
    assert sorted(rc for rc, _ in results) == [0, 1]  # exactly one claims the name
    assert "already holds a run" in next(err for rc, err in results if rc)
    with tensorlog.capture(nn.Linear(2, 2), {"output_dir": str(tmp_path), "run_name": "same", "unique_run_name": True}) as run:
        pass
    assert run.path.name == "same-1"


def test_hostile_names_and_paths_cannot_escape_the_run(tmp_path):
    model = nn.ModuleDict({"a/b": nn.Linear(2, 2), "x" * 300: nn.Linear(2, 2)})

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = model

        def forward(self, x):
            return [m(x) for m in self.d.values()]

    root = Root()
    with tensorlog.capture(root, {"output_dir": str(tmp_path), "run_name": "h"}) as run:
        root(torch.randn(1, 2))
    names = sorted(p.name for p in (run.path / "step_0").iterdir() if p.is_dir())
    assert "d.a_b" in names and all(len(n) <= 180 for n in names)
    assert all(p.resolve().is_relative_to(run.path.resolve()) for p in run.path.rglob("*"))
    modules = {c.module for c in tensorlog.load_run(run.path).calls()}
    assert "d.a/b" in modules and "d." + "x" * 300 in modules  # the real names are kept in the json
    # a json that points outside the run is not followed
    meta = run.path / "step_0" / "d.a_b" / "outputs.json"
    data = json.loads(meta.read_text())
    data["outputs"][0]["file"] = "../../../../etc/passwd"
    meta.write_text(json.dumps(data))
    call = tensorlog.load_run(run.path).steps[0].call("d.a_b")
    assert all(t.path is None or t.path.parent == run.path / "step_0" / "d.a_b" for t in call.outputs)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with tensorlog.capture(model, {"output_dir": str(out), "run_name": "r"}) as run:
        model(torch.randn(2, 3))
    return run.path


_TARGETS = ["run.json", "step_0/module_calls.txt", "step_0/0/inputs.json", "step_0/0/outputs.json", "step_0/0/outputs_cpu.pt", "step_0/1/inputs_0_cpu.pt"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(_TARGETS), data=st.binary(max_size=300), truncate=st.booleans())
def test_fuzzed_files_give_per_file_errors_never_a_crash(good_run, tmp_path_factory, target, data, truncate):
    import shutil

    work = tmp_path_factory.mktemp("fuzz") / "r"
    shutil.copytree(good_run, work)
    f = work / target
    f.write_bytes(f.read_bytes()[: len(data)] if truncate else data)
    try:
        run = tensorlog.load_run(work)
    except RunReadError:
        return
    res = tensorlog.compare(good_run, run)  # never raises: unreadable data is reported
    assert res.exit_code in (0, 1, 2)
