"""Faults made real: back-pressure and memory bounds, file-size limits, a full disk, read-only directories,
a hook that raises, budgets, kill -9, SIGTERM, concurrent writers, colliding and overlong names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tensorlog
from tensorlog.report import headline

HERE = Path(__file__).resolve().parent


def _drive(mode, out, *args, timeout=120, **kw):
    return subprocess.run(
        [sys.executable, str(HERE / "fault_driver.py"), mode, str(out), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def _verdict(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_intact(run_dir: Path) -> tensorlog.Run:
    """Everything the reader lists loads; nothing half-written is listed."""
    run = tensorlog.load_run(run_dir)
    for call in run.calls():
        for t in call.tensors:
            if t.source is not None:
                t.load()
    return run


# -- the writer's bounds ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["block", "drop"])
@pytest.mark.parametrize("factor", [0.1, 0.6, 1.0, 3.0])
def test_backpressure_never_deadlocks_and_memory_stays_bounded(tmp_path, policy, factor):
    # 0.1 blocked for ever here: a small call pending, then one over half the budget.
    v = _verdict(_drive("pressure", tmp_path, policy, factor, timeout=90))
    assert v["stopped"] is None
    # pending copies <= the budget + one call in flight; 96 MB for torch's and the allocator's own overhead
    assert v["grew_mb"] <= v["budget_mb"] + v["call_mb"] + 96, v
    run = tensorlog.load_run(tmp_path / "r")
    calls = list(run.calls())
    if policy == "block":
        assert len(calls) == 6 and run.complete  # nothing lost
    else:
        assert len(calls) + sum(d.what == "call" for d in run.manifest.dropped) == 6


def test_shared_snapshots_do_not_pile_up_beyond_the_budget(tmp_path):
    # 0.1's cache of unchanged tensors kept every copy until the step ended: +508 MB here
    v = _verdict(_drive("many", tmp_path))
    assert v["grew_mb"] < 32 + 2 * 8 + 96, v


def slow_writes(monkeypatch, method):
    """Writer threads that take 50 ms a job: back-pressure is then certain, not a matter of the machine's load."""
    from tensorlog.storage.files import RunFiles

    orig = getattr(RunFiles, method)

    def slow(self, job):
        time.sleep(0.05)
        return orig(self, job)

    monkeypatch.setattr(RunFiles, method, slow)


def test_drop_records_what_was_dropped(tmp_path, monkeypatch):
    slow_writes(monkeypatch, "write_call")
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(30)])
    x = torch.randn(64, 128)
    with tensorlog.capture(
        model, {"output_dir": str(tmp_path), "run_name": "drop", "max_pending_bytes": 1, "on_backpressure": "drop"}
    ) as run:
        model(x)
    loaded = tensorlog.load_run(run.path)
    dropped = {d.module: d.what for d in loaded.manifest.dropped}
    assert dropped
    written = {c.dirname for c in loaded.calls()}
    for c in loaded.calls():  # each call is whole, or run.json says what of it was dropped
        assert c.outputs or dropped.get(c.dirname) == "outputs"
    assert len(written) + sum(w == "call" for w in dropped.values()) == 30


# -- disks that fail ---------------------------------------------------------------------------


def test_file_size_limit_stops_logging_cleanly_and_the_model_runs_on(tmp_path):
    verdict = _verdict(_drive("fsize", tmp_path))
    assert "disk full or file too large" in verdict["stopped"]
    run = _assert_intact(tmp_path / "r")
    assert not run.complete and "file too large" in run.incomplete_reason


def _tmpfs(path: Path, size: str, *opts: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the full-disk tests need root")


@pytest.mark.parametrize("size, width", [("600k", 256), ("200k", 8)], ids=["big-files", "many-small-files"])
def test_full_disk_stops_logging_cleanly_and_run_json_says_why(tmp_path, size, width):
    disk = tmp_path / "disk"
    _tmpfs(disk, size)
    try:
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(8)])
        x = torch.randn(64, width)
        with torch.no_grad():
            ref = model(x)
        with pytest.warns(RuntimeWarning, match="disk full"):
            with tensorlog.capture(model, {"output_dir": str(disk), "run_name": "r", "log_step_ids": []}) as run:
                for _ in range(40):
                    with torch.no_grad():
                        assert torch.equal(model(x), ref)
        assert run.stopped_reason.startswith("disk full")
        loaded = _assert_intact(disk / "r")
        # the final manifest was written even with no room for a new file (over the old one, in place)
        assert not loaded.complete and "disk full" in (loaded.incomplete_reason or ""), loaded.incomplete_reason
        # a gate comparing it against a whole run never passes: the steps that were not written are not "a match"
        with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "whole", "log_step_ids": []}):
            for _ in range(40):
                with torch.no_grad():
                    model(x)
        res = tensorlog.compare(tmp_path / "whole", disk / "r")
        assert res.exit_code == 2 and headline(res).startswith("INCOMPLETE RUN: run 2 is incomplete")
        w = tensorlog.compare(tmp_path / "whole", disk / "r", whole_steps=True)
        whole = [s for s in loaded.steps.values() if s.complete]
        assert w.exit_code == (0 if whole else 2), headline(w)  # the steps both finished, when there are any
    finally:
        subprocess.run(["umount", str(disk)])


def test_read_only_output_dir_is_one_warning_and_the_model_runs(tmp_path):
    ro = tmp_path / "ro"
    _tmpfs(ro, "1m", "ro")
    try:
        model = nn.Linear(2, 2)
        with pytest.warns(RuntimeWarning, match="not logging this run"):
            with tensorlog.capture(model, {"output_dir": str(ro)}) as run:
                model(torch.randn(1, 2))
        assert not run.enabled
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
                subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
                y = model(x)
        assert torch.equal(y, model(x)) and run.stopped_reason
        assert _assert_intact(disk / "r").steps[0].call("0") is not None
    finally:
        subprocess.run(["umount", str(disk)])


# -- errors inside the model's call --------------------------------------------------------------


class Hostile(dict):
    """A dict that cannot be walked, however a hook walks it."""

    def items(self):
        raise RuntimeError("boom")

    def __iter__(self):
        raise RuntimeError("boom")

    keys = values = items


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


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        y.mul_(2)  # an in-place change of a hooked module's output
        return y


def test_gradients_are_logged_even_when_a_module_output_is_changed_in_place(tmp_path):
    # 0.1's full backward hooks made this raise "a view ... is being modified inplace" inside the user's forward
    model = InPlaceAfter()
    x = torch.randn(3, 4, requires_grad=True)
    with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "g", "data_mode": ["forward", "backward"]}) as run:
        model(x).sum().backward()
    call = tensorlog.load_run(run.path).steps[0].call("lin.backward")
    assert torch.equal(call.inputs[0].load(), torch.full((3, 4), 2.0))  # d(sum(2y))/dy, before the in-place change


def test_budget_stops_logging_and_says_so(tmp_path):
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    with pytest.warns(RuntimeWarning, match="max_total_bytes reached"):
        with tensorlog.capture(
            model, {"output_dir": str(tmp_path), "run_name": "r", "max_total_bytes": 40_000, "log_step_ids": []}
        ) as run:
            for _ in range(3):
                model(torch.randn(16, 64))
    loaded = _assert_intact(run.path)
    assert not loaded.complete and "max_total_bytes" in loaded.incomplete_reason
    files = {
        f.stat().st_ino: f.stat().st_size
        for f in run.path.rglob("*")
        if f.is_file() and f.name.endswith((".pt", ".json")) and f.name not in ("run.json", "modules.json")
    }
    assert 0 < sum(files.values()) <= 40_000  # hard links count once


# -- processes that die ------------------------------------------------------------------------


def _kill_9_after(tmp_path: Path, step: int) -> None:
    """A process logging a step every 10 ms, killed with SIGKILL once ``step`` is on disk."""
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_driver.py"), "loop", str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "r" / f"step_{step}" / "tensorlog_index.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def test_kill_9_mid_run_leaves_a_readable_incomplete_run(tmp_path):
    _kill_9_after(tmp_path, 5)
    run = _assert_intact(tmp_path / "r")
    assert not run.complete
    finished = [s for s in run.steps.values() if s.complete]
    assert len(finished) >= 6
    # run.json is rewritten at most once a second while all goes well; the journal gets a line as each step
    # ends: together they list every whole step but one the kill may have caught between index and journal
    listed = set(run.manifest.steps_done())
    assert listed <= {s.index for s in finished} and len(listed) >= len(finished) - 1
    temps = sorted((tmp_path / "r").rglob(".*tmp*"))
    res = tensorlog.compare(tmp_path / "r", tmp_path / "r")
    assert res.exit_code == 2 and "INCOMPLETE RUN: run 1 is incomplete" in headline(res)  # a run that died is no match
    res = tensorlog.compare(tmp_path / "r", tmp_path / "r", whole_steps=True)
    assert res.exit_code == 0 and "compared only the steps both runs finished" in " ".join(res.notes)
    assert set(res.steps) == {s.index for s in finished}
    # temporary files of the killed writer are never read; readers remove nothing (the next writer on this host does)
    assert sorted((tmp_path / "r").rglob(".*tmp*")) == temps


def test_sigterm_between_steps_finishes_the_run(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fault_driver.py"), "sigterm", str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    run = _assert_intact(tmp_path / "r")
    assert run.complete and sorted(run.steps) == [0, 1]


def test_sigterm_mid_forward_marks_that_step_and_the_run_incomplete(tmp_path):
    # 0.1 wrote "complete": true here while the last step held part of its calls
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fault_driver.py"), "sigterm_mid", str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "IN_FORWARD"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    run = _assert_intact(tmp_path / "r")
    assert not run.complete and not run.steps[0].complete
    assert "SystemExit" in run.steps[0].incomplete_reason and "SystemExit" in run.incomplete_reason


def test_two_processes_share_an_output_dir_without_collisions(tmp_path):
    code = (
        "import sys, torch, tensorlog; m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64));"
        "cfg = {'output_dir': sys.argv[1], 'run_name': sys.argv[2], 'log_step_ids': []}\n"
        "with tensorlog.capture(m, cfg):\n    [m(torch.randn(8, 64)) for _ in range(20)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for name in ("a", "b"):
        run = _assert_intact(tmp_path / name)
        assert run.complete and len(run.steps) == 20
    same = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "same"], stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in same]
    assert sorted(rc for rc, _ in results) == [0, 1]  # exactly one claims the name
    assert "already holds a run" in next(err for rc, err in results if rc)
    with tensorlog.capture(nn.Linear(2, 2), {"output_dir": str(tmp_path), "run_name": "same", "unique_run_name": True}) as run:
        pass
    assert run.path.name == "same-1"


# -- names -----------------------------------------------------------------------------------------


class Calls(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.d = nn.ModuleDict({n: nn.Linear(2, 2) for n in names})
        self.order = list(names)

    def forward(self, x):
        return [self.d[n](x) for n in self.order]


def test_names_never_collide_and_no_call_is_lost(tmp_path):
    model = Calls(["a", "a_1", "a/b", "a_b"])
    model.order = ["a", "a", "a_1", "a/b", "a_b"]  # a's second call is "d.a_1", as is module d.a_1's first
    with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "n"}) as run:
        outs = model(torch.randn(1, 2))
    step = tensorlog.load_run(run.path).steps[0]
    calls = [(c.module, c.call_index) for c in step.calls if c.module.startswith("d.")]
    assert sorted(calls) == sorted([("d.a", 0), ("d.a", 1), ("d.a_1", 0), ("d.a/b", 0), ("d.a_b", 0)])
    assert len({c.dirname for c in step.calls}) == len(step.calls)
    for c in step.calls:  # every call kept its own output
        if c.module.startswith("d."):
            i = [i for i, n in enumerate(model.order) if f"d.{n}" == c.module][c.call_index]
            assert torch.equal(c.outputs[0].load(), outs[i])


def test_names_long_in_bytes_do_not_stop_the_run(tmp_path):
    long = "\U0001f600" * 100  # 400 bytes in UTF-8: 0.1 capped characters, not bytes, and got ENAMETOOLONG
    model = Calls([long, "tail"])
    with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "l"}) as run:
        model(torch.randn(1, 2))
    assert run.stopped_reason is None
    assert all(len(p.name.encode()) <= 255 for p in run.path.rglob("*"))
    assert {c.module for c in tensorlog.load_run(run.path).calls()} >= {"d." + long, "d.tail"}  # real names kept


def test_a_disk_that_cannot_take_the_first_file_is_one_warning_and_the_model_runs(tmp_path):
    script = tmp_path / "full.py"
    script.write_text(
        "import torch, tensorlog, warnings\n"
        "m = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(20)])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    with tensorlog.capture(m, {{'output_dir': {str(tmp_path / 'out')!r}}}) as h:\n"
        "        y = m(torch.randn(2, 64))\n"
        "print(tuple(y.shape), h.enabled, [str(x.message) for x in w if 'tensorlog' in str(x.message)])\n"
    )
    # every file over 300 bytes fails with EFBIG, as on a disk with no room: modules.json is the first
    r = subprocess.run(["prlimit", "--fsize=300", sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2, 64) False" in r.stdout and "not logging this run: cannot write to" in r.stdout
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no run that never started is left


class _Interrupted(nn.Module):
    """Its second call is left by a KeyboardInterrupt between its children: no call of it is open, and torch
    runs no always_call hook for a BaseException."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.calls = nn.Linear(4, 4), nn.Linear(4, 4), 0

    def forward(self, x):
        y = self.a(x)
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.b(y)


def test_ctrl_c_between_a_forwards_calls_marks_that_step_cut_short_and_logging_goes_on(tmp_path):
    model, x = _Interrupted(), torch.randn(2, 4)
    run = tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "r", "log_step_ids": []})
    model(x)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    model(x)  # the next forward is a step of its own, not a call nested in the one that was left
    run.remove()
    r = tensorlog.load_run(run.path)
    assert sorted(r.steps) == [0, 1, 2] and not r.complete
    assert [r.steps[i].complete for i in (0, 1, 2)] == [True, False, True]
    assert "never returned (KeyboardInterrupt, SystemExit" in r.steps[1].incomplete_reason
    assert tensorlog.compare(run.path, run.path).exit_code == 2


def test_sigterm_between_a_forwards_calls_without_a_with_block_marks_the_run_cut_short(tmp_path):
    script = f"""
import signal, sys, time, torch, tensorlog
from torch import nn
class Pause(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
    def forward(self, x):
        y = self.a(x)
        print("BETWEEN", flush=True)
        time.sleep(60)
        return y
m = Pause()
run = tensorlog.capture(m, {{"output_dir": {str(tmp_path)!r}, "run_name": "r"}})
m(torch.randn(2, 4))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "BETWEEN"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    r = tensorlog.load_run(tmp_path / "r")
    assert not r.complete and not r.steps[0].complete
    assert "never returned" in r.steps[0].incomplete_reason or "SystemExit" in r.steps[0].incomplete_reason


def test_remove_from_another_thread_mid_forward_waits_for_it_and_never_raises_into_the_model(tmp_path):
    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            started.set()
            time.sleep(0.3)
            return self.b(y)

    started, errors, model = threading.Event(), [], Slow()
    run = tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "r", "log_step_ids": []})

    def forwards():
        try:
            for _ in range(3):
                model(torch.randn(2, 4))
        except BaseException as e:  # the model's thread must never see tensorlog's removal
            errors.append(e)

    t = threading.Thread(target=forwards)
    t.start()
    started.wait(10)
    run.remove()  # while the first forward sleeps between its two calls
    t.join(30)
    assert not errors
    r = tensorlog.load_run(run.path)
    assert r.complete and sorted(r.steps) == [0] and r.steps[0].complete  # the forward in flight finished whole


def test_a_forked_child_logs_nothing_and_says_so_once(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    run = tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "r", "log_step_ids": []})
    model(torch.randn(2, 4))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: two forwards, a warning, no hang at exit
        os.close(r)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(torch.randn(2, 4))
            model(torch.randn(2, 4))
        os.write(w, json.dumps([str(c.message) for c in caught]).encode())
        os.close(w)
        run.remove()
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        said = json.loads(f.read())
    _, status = os.waitpid(pid, 0)
    assert status == 0 and len(said) == 1 and "was forked from the one that started the capture" in said[0]
    model(torch.randn(2, 4))
    run.remove()
    assert sorted(tensorlog.load_run(run.path).steps) == [0, 1]


def _boom(*args, **kwargs):
    raise RuntimeError("injected")


@pytest.mark.parametrize(
    "target, layout",
    [
        ("tensorlog.storage.files.RunFiles.write_call", "reference"),  # a writer thread's job
        ("tensorlog.storage.files.RunFiles.write_chunk", "packed"),  # a writer thread's chunk of the packed file
        ("tensorlog.storage.files.RunFiles.take_packed", "packed"),  # the finishing thread, before a step
        ("tensorlog.storage.finisher.StepFinisher.finish", "reference"),  # the finishing thread, a step
        ("tensorlog.storage.queue.JobQueue.take", "reference"),  # a writer thread's loop itself
        ("tensorlog.storage.queue.JobQueue.next_end", "reference"),  # the finishing thread's loop itself
    ],
)
def test_a_fault_in_any_stage_of_the_writer_never_hangs_or_breaks_the_model(tmp_path, monkeypatch, target, layout):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(4, 8)
    ref = model(x)
    monkeypatch.setattr(target, _boom)
    done: list[object] = []

    def forwards():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = {"output_dir": str(tmp_path), "run_name": "r", "log_step_ids": [], "layout": layout}
            with tensorlog.capture(model, cfg):
                outs = [model(x) for _ in range(3)]
        done.append((outs, [str(w.message) for w in caught]))

    t = threading.Thread(target=forwards, daemon=True)
    t.start()
    t.join(30)
    assert done, f"the model waited on a dead writer thread ({target})"
    outs, said = done[0]
    assert all(torch.equal(o, ref) for o in outs)  # logging never changed the model's output
    assert any("tensorlog: logging stopped" in w for w in said), said
    run = tensorlog.load_run(tmp_path / "r")
    assert not run.complete and "injected" in (run.incomplete_reason or "")


def test_a_final_run_json_that_cannot_be_written_is_one_warning(tmp_path, monkeypatch):
    from tensorlog.storage.finisher import StepFinisher

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    write = StepFinisher.write_manifest

    def fails_at_the_end(self, *, final=False, **kw):
        if final:
            raise OSError(5, "Input/output error")
        return write(self, final=final, **kw)

    monkeypatch.setattr(StepFinisher, "write_manifest", fails_at_the_end)
    with pytest.warns(RuntimeWarning, match="the final run.json of .* could not be written"):
        with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "r"}):
            model(torch.randn(2, 8))
    run = tensorlog.load_run(tmp_path / "r")
    assert not run.complete  # what is on disk still says "in progress": never read as whole


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("layout", ["reference", "packed"])
def test_a_step_directory_planted_as_a_link_is_never_written_through(tmp_path, layout):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "tensorlog_index.json").write_text("mine")
    before = _tree(victim)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    run = tensorlog.capture(model, {"output_dir": str(tmp_path / "out"), "run_name": "r", "log_step_ids": [], "layout": layout})
    model(torch.randn(2, 4))
    (run.path / "step_1").symlink_to(victim, target_is_directory=True)  # planted by someone else, mid-run
    with pytest.warns(RuntimeWarning, match="symbolic link"):
        for _ in range(3):
            model(torch.randn(2, 4))
    run.remove()
    assert _tree(victim) == before  # nothing written, replaced or removed outside the run
    r = tensorlog.load_run(run.path)
    assert not r.complete and "symbolic link" in r.incomplete_reason


def test_a_run_directory_swapped_for_a_link_mid_run_stops_logging(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    run = tensorlog.capture(model, {"output_dir": str(tmp_path / "out"), "run_name": "r", "log_step_ids": []})
    model(torch.randn(2, 4))
    moved = tmp_path / "moved"
    run.path.rename(moved)
    run.path.symlink_to(victim, target_is_directory=True)
    with pytest.warns(RuntimeWarning, match="moved or replaced"):
        model(torch.randn(2, 4))
    run.remove()
    assert list(victim.iterdir()) == []  # the link's target got nothing, not even run.json
    r = tensorlog.load_run(moved)  # its run.json cannot be reached by name any more: it never reads as whole
    assert not r.complete and sorted(r.steps) == [0]


def test_retention_never_deletes_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    (victim / "step_0").mkdir(parents=True)
    (victim / "step_0" / "precious").write_text("keep")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    cfg = {"output_dir": str(tmp_path / "out"), "run_name": "r", "log_step_ids": [], "retain_steps": 1}
    run = tensorlog.capture(model, cfg)
    model(torch.randn(2, 4))
    real = tmp_path / "real_step_0"
    (run.path / "step_0").rename(real)
    (run.path / "step_0").symlink_to(victim / "step_0", target_is_directory=True)
    for _ in range(3):
        model(torch.randn(2, 4))  # retention removes step 0: the link, never what it points to
    run.remove()
    assert (victim / "step_0" / "precious").read_text() == "keep"


def test_a_writer_killed_between_steps_is_closed_by_the_survivor_with_every_whole_step(tmp_path):
    from tensorlog.storage.finisher import close_orphaned

    _kill_9_after(tmp_path, 4)
    closed = close_orphaned(tmp_path / "r", "killed by the test")
    assert closed == [str(tmp_path / "r" / "run.json")]
    run = tensorlog.load_run(tmp_path / "r")
    assert not run.complete and "was killed before it closed the run (killed by the test)" in run.incomplete_reason
    whole = {s.index for s in run.steps.values() if s.complete}
    assert len(whole) >= 5 and len(set(run.manifest.steps_done()) & whole) >= len(whole) - 1
    assert run.manifest.end_time is not None
    assert close_orphaned(tmp_path / "r", "again") == []  # closed once; a live or closed run is never touched


@pytest.mark.parametrize("plant", ["hard link", "fifo"])
def test_a_hard_link_or_fifo_planted_at_the_journal_is_never_written_through_or_waited_on(tmp_path, plant):
    victim = tmp_path / "victim.txt"
    victim.write_text("VICTIM\n")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    run = tensorlog.capture(model, {"output_dir": str(tmp_path / "out"), "run_name": "r", "log_step_ids": []})
    model(torch.randn(2, 4))
    journal = run.path / "steps.jsonl"
    journal.unlink()
    if plant == "hard link":
        os.link(victim, journal)
    else:
        os.mkfifo(journal)
    done: list[bool] = []

    def forwards():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                model(torch.randn(2, 4))
            run.remove()
        done.append(True)

    t = threading.Thread(target=forwards, daemon=True)
    t.start()
    t.join(30)
    assert done, "the model waited on a FIFO planted in its run"
    assert victim.read_text() == "VICTIM\n"
    r = tensorlog.load_run(run.path)
    assert not r.complete and "steps.jsonl" in r.incomplete_reason  # not a plain file of the run / no reader


def test_a_relative_output_dir_is_confined_too_and_a_later_chdir_moves_nothing(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    run = tensorlog.capture(model, {"output_dir": "rel", "run_name": "r", "log_step_ids": []})
    assert run.path.is_absolute()
    model(torch.randn(2, 4))
    (run.path / "step_1").symlink_to(victim, target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.warns(RuntimeWarning, match="symbolic link"):
        model(torch.randn(2, 4))
    run.remove()
    assert list(victim.iterdir()) == [] and list(elsewhere.iterdir()) == []
