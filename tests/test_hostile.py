"""Every file on disk may be hostile: readers give a per-file error or exit 2 with one line; never a traceback,
a hang, unbounded memory, or a silent "match". Drills first, then a hypothesis fuzz suite over run directories."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import foreign_dumps as formats
import tensorlog
from tensorlog import cli
from tensorlog.report import headline


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Two identical runs of a small model in the reference layout (with tensorlog's index)."""
    out = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    for name in ("a", "b"):
        with tensorlog.capture(model, {"output_dir": str(out), "run_name": name}), torch.no_grad():
            model(x)
    return out


def _copy(good: Path, tmp_path: Path, name: str = "b") -> Path:
    dst = tmp_path / name
    shutil.copytree(good / name, dst)
    return dst


def _cli(*args) -> tuple[int, str, str]:
    """The CLI in process, with strict UTF-8 output, as a terminal that cannot print stray bytes would be."""
    out, err = io.BytesIO(), io.BytesIO()
    so, se = sys.stdout, sys.stderr
    wo = sys.stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict")
    we = sys.stderr = io.TextIOWrapper(err, encoding="utf-8", errors="strict")
    try:
        code = cli.main([str(a) for a in args])
    finally:
        sys.stdout, sys.stderr = so, se
        wo.flush()
        we.flush()
        wo.detach()
        we.detach()
    return code, out.getvalue().decode(), err.getvalue().decode()


def _compare_exits_2(a: Path, b: Path, needle: str | None = None) -> str:
    code, out, err = _cli("compare", "--dir1", a, "--dir2", b)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert "UNREADABLE" in out.splitlines()[2] or err.count("\n") <= 1, out[:2000]  # the headline says so first
    assert "All " not in out.splitlines()[2]
    if needle:
        assert needle in out + err, (out[:3000], err)
    return out


# -- wrong types and shapes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["calls"][0]["tensors"][0].update(dtype=5), "dtype"),
        (lambda d: d["calls"][0]["tensors"][0].update(shape="abc"), "shape"),
        (lambda d: d["calls"][0].update(seq_start=1e999), "seq_start"),
        (lambda d: d.update(calls=[[]] * 3), "calls"),
        (lambda d: d.update(complete="false"), "complete"),
    ],
)
def test_a_step_index_of_the_wrong_shape_is_a_per_file_error(good, tmp_path, mutate, needle):
    b = _copy(good, tmp_path)
    f = b / "step_0" / "tensorlog_index.json"
    doc = json.loads(f.read_text())
    mutate(doc)
    f.write_text(json.dumps(doc))
    run = tensorlog.load_run(b)
    assert any(needle in p for p in run.problems), run.problems
    _compare_exits_2(good / "a", b, needle)


@pytest.mark.parametrize("ranks", ["two", [0, 1], {"0": {"pid": "x"}}, {"0": {"complete": True, "steps_written": [0]}, "1": "x"}])
def test_ranks_in_a_run_json_list_no_rank_whatever_they_hold(good, tmp_path, ranks):
    """``ranks`` is made by readers that merge a run's ranks; capture never writes it, and one found in a file
    (with JSON's string keys) is left out, never an error of the run nor a rank it does not have."""
    assert "ranks" not in json.loads((good / "a" / "run.json").read_text())
    b = _copy(good, tmp_path)
    doc = json.loads((b / "run.json").read_text())
    doc["ranks"] = ranks
    (b / "run.json").write_text(json.dumps(doc))
    run = tensorlog.load_run(b)
    assert run.complete and not run.problems and run.manifest.ranks is None
    assert {c.rank for c in run.calls()} == {None}


@pytest.mark.parametrize("patch", [{"world_size": "two"}, {"complete": "false"}, {"steps_written": [[0, "x"]]}])
def test_a_run_json_of_the_wrong_shape_is_an_error_not_a_lie(good, tmp_path, patch):
    b = _copy(good, tmp_path)
    doc = json.loads((b / "run.json").read_text())
    doc.update(patch)
    (b / "run.json").write_text(json.dumps(doc))
    run = tensorlog.load_run(b)
    assert not run.complete and run.problems  # "complete": "false" is not read as complete
    _compare_exits_2(good / "a", b, "run.json")


def test_json_nested_100k_deep_and_json_too_big_are_refused(good, tmp_path):
    b = _copy(good, tmp_path)
    (b / "step_0" / "tensorlog_index.json").write_text("[" * 100_000 + "]" * 100_000)
    with open(b / "step_0" / "0" / "inputs.json", "wb") as f:  # 0.1 took 5 GB to read 200 MB of these
        f.write(b"[" + b"[]," * (70 << 20) + b"[]]")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = tensorlog.load_run(b)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 100
    assert any("recursion" in p or "nest" in p for p in run.problems), run.problems
    assert any("limit" in e for c in run.calls() for e in c.errors)
    _compare_exits_2(good / "a", b)


def test_a_zero_stride_tensor_is_refused_before_it_expands(good, tmp_path):
    b = _copy(good, tmp_path)
    f = b / "step_0" / "0" / "outputs_cpu.pt"
    f.unlink()
    torch.save(torch.zeros(2).expand(1 << 28, 2), f)  # 34 bytes of data claiming 2 GB: 0.1 expanded it in compare
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = _compare_exits_2(good / "a", b, "zero or overlapping strides")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200
    assert "unreadable" in out


# -- special files, links, stray names --------------------------------------------------------


@pytest.mark.parametrize("what", ["fifo_json", "fifo_pt", "dir_pt"])
def test_special_files_are_refused_without_hanging(good, tmp_path, what):
    b = _copy(good, tmp_path)
    target = b / "step_0" / "0" / ("inputs.json" if what == "fifo_json" else "outputs_cpu.pt")
    target.unlink()
    if what.startswith("fifo"):
        os.mkfifo(target)  # a reader that opens it blocks for ever
    else:
        target.mkdir()
    _compare_exits_2(good / "a", b)


@pytest.mark.parametrize("where", ["tensor", "json", "module_dir", "step_dir", "index"])
def test_symbolic_links_are_refused_even_when_they_point_at_good_data(good, tmp_path, where):
    b = _copy(good, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(good / "a", outside)
    link, target = {
        "tensor": (b / "step_0" / "0" / "outputs_cpu.pt", outside / "step_0" / "0" / "outputs_cpu.pt"),
        "json": (b / "step_0" / "0" / "outputs.json", outside / "step_0" / "0" / "outputs.json"),
        "module_dir": (b / "step_0" / "2", outside / "step_0" / "2"),
        "step_dir": (b / "step_0", outside / "step_0"),
        "index": (b / "step_0" / "tensorlog_index.json", outside / "step_0" / "tensorlog_index.json"),
    }[where]
    shutil.rmtree(link) if link.is_dir() else link.unlink()
    link.symlink_to(target)
    _compare_exits_2(good / "a", b, "symbolic link")


def test_a_non_utf8_file_name_prints_under_a_strict_encoding(good, tmp_path):
    b = _copy(good, tmp_path)
    (b / "step_0" / "tensorlog_index.json").unlink()  # read from the directories as they lie
    os.rename(b / "step_0" / "2", os.path.join(os.fsencode(b / "step_0"), b"bad\xff\xfename"))
    code, out, err = _cli("inspect", b)
    assert code == 0 and "Traceback" not in err
    code, out, err = _cli("compare", "--dir1", good / "a", "--dir2", b)
    # run.json lists the step whose index was removed: the disk wins and the disagreement is a problem (2);
    # the name still prints, escaped
    assert code == 2 and "Traceback" not in err and "\\udcff" in out and "lists step(s) 0 as written" in out


def test_a_corrupt_tensor_is_unreadable_in_the_headline_the_verdict_and_the_exit_code(good, tmp_path):
    b = _copy(good, tmp_path)
    (b / "step_0" / "0" / "outputs_cpu.pt").write_bytes(b"not a zip")
    _compare_exits_2(good / "a", b, "unreadable")
    res = tensorlog.compare(good / "a", b)
    verdicts = {m.module: m.verdict for m in res.modules}
    assert verdicts["0"] == "unreadable" and not res


def test_the_load_error_keeps_torchs_safety_advice(tmp_path):
    from tensorlog.storage.tensorfile import load_tensor_file

    f = tmp_path / "x.pt"
    torch.save({"a": nn.Linear(2, 2)}, f)  # a pickled module: weights_only refuses it
    with pytest.raises(tensorlog.RunReadError) as e:
        load_tensor_file(f)
    assert "weights_only" in str(e.value) and "\n" not in str(e.value)


def test_control_characters_in_names_are_escaped_in_every_report(tmp_path):
    model = nn.ModuleDict({"evil\x1b[31mred": nn.Linear(2, 2)})

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = model

        def forward(self, x):
            return self.d["evil\x1b[31mred"](x)

    root = Root()
    runs = []
    x = torch.randn(1, 2)
    for name in ("a", "b"):
        with tensorlog.capture(root, {"output_dir": str(tmp_path), "run_name": name}):
            root(x)
        runs.append(tmp_path / name)
    for fmt in ("md", "html", "json"):
        code, out, _ = _cli("compare", "--dir1", runs[0], "--dir2", runs[1], "--format", fmt)
        assert code == 0 and "\x1b" not in out
    code, out, _ = _cli("inspect", runs[0])
    assert "\x1b[31m" not in out


# -- other tools' dumps ---------------------------------------------------------------------------


def _pass(tmp_path: Path, name: str, tensors: dict) -> Path:
    return formats.pass_dump(tmp_path / name, [tensors])


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty", "int_keys", "not_a_dict", "zero_stride"])
def test_a_damaged_pass_dump_never_compares_as_a_match(tmp_path, damage):
    good = _pass(tmp_path, "good", {"lin": torch.ones(2, 2)})
    bad = _pass(tmp_path, "bad", {"lin": torch.ones(2, 2)})
    f = next(bad.rglob("Pass00000.pt"))
    if damage == "corrupt":
        f.write_bytes(os.urandom(400))
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:300])
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "int_keys":
        torch.save({1: torch.ones(2, 2)}, f)
    elif damage == "not_a_dict":
        torch.save([torch.ones(2, 2)], f)
    else:
        torch.save({"lin": torch.ones(1).expand(1 << 27, 2)}, f)
    _compare_exits_2(good, bad)


def test_a_good_pass_dump_compares(tmp_path):
    a = _pass(tmp_path, "a", {"lin": torch.ones(2, 2), "lin.1": torch.zeros(3)})
    b = _pass(tmp_path, "b", {"lin": torch.ones(2, 2), "lin.1": torch.zeros(3)})
    res = tensorlog.compare(a, b)
    assert res.exit_code == 0 and res.summary.pairs_compared == 2
    assert tensorlog.load_run(a).steps[0].calls[0].outputs[0].stats["max"] == 1.0  # inspect shows statistics


@pytest.mark.parametrize("damage", ["truncated", "wrong_types", "deep", "data_symlink", "entry_not_object"])
def test_a_damaged_msprobe_dump_never_compares_as_a_match(tmp_path, damage):
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    good = formats.msprobe_dump(tmp_path / "good", [{"lin": (x, y)}])
    bad = formats.msprobe_dump(tmp_path / "bad", [{"lin": (x, y)}])
    dump = bad / "step0" / "rank0" / "dump.json"
    if damage == "truncated":
        dump.write_text(dump.read_text()[:-40])
    elif damage == "wrong_types":
        doc = json.loads(dump.read_text())
        leaf = doc["data"]["Module.lin.Linear.forward.0"]["output"][0]
        leaf.update(dtype=5, shape="abc")
        dump.write_text(json.dumps(doc))
    elif damage == "deep":
        (bad / "step0" / "rank0" / "construct.json").write_text("[" * 100_000 + "]" * 100_000)
        dump.write_text("{" + '"data": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif damage == "data_symlink":
        f = bad / "step0" / "rank0" / "dump_tensor_data" / "Module.lin.Linear.forward.0.output.0.pt"
        f.unlink()
        f.symlink_to(good / "step0" / "rank0" / "dump_tensor_data" / "Module.lin.Linear.forward.0.output.0.pt")
    else:
        doc = json.loads(dump.read_text())
        doc["data"]["Module.lin.Linear.forward.0"] = "x"
        dump.write_text(json.dumps(doc))
    _compare_exits_2(good, bad)


def test_a_good_msprobe_dump_compares_with_itself(tmp_path):
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    a = formats.msprobe_dump(tmp_path / "a", [{"lin": (x, y)}, {"lin": (y, x)}])
    res = tensorlog.compare(a, a)
    assert res.exit_code == 0 and res.summary.pairs_compared == 4
    run = tensorlog.load_run(a)
    assert run.layout == "msprobe" and run.steps[1].call("lin").outputs[0].load().equal(x)


# -- the fuzz suite ----------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_TARGETS = [
    "run.json",
    "modules.json",
    "step_0/tensorlog_index.json",
    "step_0/module_calls.txt",
    "step_0/0/inputs.json",
    "step_0/0/outputs.json",
    "step_0/0/outputs_cpu.pt",
    "step_0/2/inputs_0_cpu.pt",
    "step_0/0",
    "step_0",
]


@st.composite
def _damage(draw):
    target = draw(st.sampled_from(_TARGETS))
    how = draw(st.sampled_from(["bytes", "truncate", "json", "symlink_out", "symlink_in", "fifo", "empty_dir", "remove"]))
    payload = draw(st.binary(max_size=400)) if how == "bytes" else draw(_json) if how == "json" else draw(st.integers(0, 400))
    return target, how, payload


def _apply(run: Path, target: str, how: str, payload, outside: Path) -> None:
    p = run / target
    if not p.parent.is_dir() or p.parent.is_symlink():
        return  # an earlier damage took the directory away
    if how == "truncate" and p.is_file():
        p.write_bytes(p.read_bytes()[: int(payload)])
        return
    if how == "bytes" and p.is_file():
        p.write_bytes(payload)
        return
    if how == "json" and p.is_file():
        p.write_text(json.dumps(payload))
        return
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
    if how == "symlink_out":
        p.symlink_to(outside)
    elif how == "symlink_in":
        p.symlink_to(run / "run.json")
    elif how == "fifo":
        os.mkfifo(p)
    elif how == "empty_dir":
        p.mkdir()


@pytest.mark.slow
@settings(max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damages=st.lists(_damage(), min_size=1, max_size=3))
def test_fuzzed_runs_give_per_file_errors_never_a_crash_a_hang_or_a_silent_match(good, tmp_path_factory, damages):
    work = tmp_path_factory.mktemp("fuzz")
    run = work / "b"
    shutil.copytree(good / "b", run)
    outside = work / "outside.json"
    outside.write_text('{"secret": 1}')
    for target, how, payload in damages:
        _apply(run, target, how, payload, outside)
    try:
        loaded = tensorlog.load_run(run)
    except tensorlog.RunReadError:
        return  # the whole directory is not a run any more: one line, exit 2
    for call in loaded.calls():
        for t in call.tensors:
            if t.has_data:
                try:
                    t.load()
                except tensorlog.RunReadError:
                    pass
    res = tensorlog.compare(good / "a", loaded)
    if res.exit_code == 0:  # a "match" must mean every tensor was read and equal
        assert not loaded.problems and all(not c.errors for c in loaded.calls())
        assert res.summary.unreadable == 0 and res.summary.pairs_compared > 0
    code, out, err = _cli("compare", "--dir1", good / "a", "--dir2", run)
    assert code == res.exit_code or code == 2
    assert "Traceback" not in out + err
    code, out, err = _cli("inspect", run)
    assert code in (0, 2) and "Traceback" not in err


@pytest.mark.parametrize(
    "field, value, said",
    [("dtype", "torch.float64", "but its index says torch.float64"), ("shape", [2, 2], "but its index says [2, 2]")],
)
def test_a_tensor_file_that_contradicts_its_index_is_unreadable_not_a_verdict(good, tmp_path, field, value, said):
    b = _copy(good, tmp_path)
    index = b / "step_0" / "tensorlog_index.json"
    doc = json.loads(index.read_text())
    entry = next(t for c in doc["calls"] for t in c["tensors"] if t.get("file") and t["kind"] == "outputs")
    entry[field] = value
    index.write_text(json.dumps(doc))
    res = tensorlog.compare(good / "a", b)
    assert res.exit_code == 2 and said in headline(res)


def test_index_values_that_contradict_the_file_are_unreadable(good, tmp_path):
    b = _copy(good, tmp_path)
    index = b / "step_0" / "tensorlog_index.json"
    doc = json.loads(index.read_text())
    entry = next(t for c in doc["calls"] for t in c["tensors"] if t.get("file") and t.get("values") is not None)
    flat = entry["values"]
    while isinstance(flat[0], list):
        flat = flat[0]
    flat[0] = flat[0] + 1
    index.write_text(json.dumps(doc))
    res = tensorlog.compare(good / "a", b)
    assert res.exit_code == 2 and "its values disagree with those its index records" in headline(res)


def test_a_parts_file_listing_one_directory_many_times_is_refused_at_once(good, tmp_path):
    parts = tmp_path / "run.parts.json"
    parts.write_text(json.dumps({"format": "tensorlog-run-parts", "parts": [{"path": str(good / "a")}] * 10_000}))
    t0 = time.monotonic()
    code, _out, err = _cli("compare", parts, good / "b")
    assert code == 2 and "list one directory twice" in err and time.monotonic() - t0 < 10


def test_bidirectional_overrides_in_names_are_escaped_in_every_report(good, tmp_path):
    from tensorlog.report.text import clean

    assert clean("evil\u202egnp.exe") == "evil\\u202egnp.exe" and clean("a\u2066b\u200fc") == "a\\u2066b\\u200fc"
    b = _copy(good, tmp_path)
    os.rename(b / "step_0" / "0", b / "step_0" / "x\u202ey")
    (b / "step_0" / "tensorlog_index.json").unlink()
    _code, out, err = _cli("compare", "--dir1", good / "a", "--dir2", b)
    assert "\u202e" not in out + err and "x\\u202ey" in out
