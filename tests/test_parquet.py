"""Long runs as columns: statistics written live as Parquet, exported from any run, and retention."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import clirun
import tensorlog
from tensorlog.errors import ConfigError

pq = pytest.importorskip("pyarrow.parquet")
duckdb = pytest.importorskip("duckdb")

README = Path(__file__).resolve().parent.parent / "README.md"
STEPS = 25
NAN_STEP, NAN_MODULE = 17, "layers.2.up"
GROWING = "layers.1.down"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Server(nn.Module):
    """Three blocks; layer 1's output grows with every step, and layer 2's up-projection emits a NaN once."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.step = 0
        # registered before capture attaches its own, so that capture sees what these hooks return
        self.layers[1].down.register_forward_hook(lambda m, a, o: o * (1 + 0.5 * self.step))
        nan_at = torch.tensor([3])
        self.layers[2].up.register_forward_hook(lambda m, a, o: o.index_fill(1, nan_at, math.nan) if self.step == NAN_STEP else o)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        self.step += 1
        return x


def serve(model: Server, steps: int = STEPS) -> None:
    with torch.no_grad():
        for s in range(steps):
            torch.manual_seed(s)
            model(torch.randn(4, 16))


def capture(tmp_path, name, **cfg):
    model = Server()
    config = {"output_dir": str(tmp_path), "run_name": name, "log_step_ids": [], "mode": "statistics", **cfg}
    with tensorlog.capture(model, config) as run:
        serve(model)
    return run.path


def rows(files):
    """Every row, as plain dicts sorted by (step, rank, seq_start, name)."""
    table = pq.ParquetDataset([str(f) for f in files]).read().to_pylist()
    return sorted(table, key=lambda r: (r["step"], r["rank"] or 0, r["seq_start"], r["kind"], r["name"]))


def same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_live_parquet_windows_hold_every_statistic_of_the_run(tmp_path):
    path = capture(tmp_path, "live", parquet_window=10)
    files = sorted((path / "parquet").iterdir())
    assert [f.name for f in files] == [
        "stats.steps000000000-000000009.parquet",
        "stats.steps000000010-000000019.parquet",
        "stats.steps000000020-000000024.parquet",
    ]
    got = rows(files)
    run = tensorlog.load_run(path)
    want = [(c, t) for s in sorted(run.steps) for c in sorted(run.steps[s].calls, key=lambda c: c.seq_start) for t in c.tensors]
    want.sort(key=lambda ct: (ct[0].step, ct[0].seq_start, ct[1].kind, ct[1].name))
    assert len(got) == len(want) == STEPS * 9 * 2  # 9 modules (3 blocks, 6 linears), one input and one output each
    for row, (call, rec) in zip(got, want):
        assert (row["step"], row["module"], row["kind"], row["name"]) == (call.step, call.module, rec.kind, rec.name)
        assert row["shape"] == list(rec.shape) and row["dtype"] == rec.dtype and row["seq_end"] == call.seq_end
        for key, value in rec.stats.items():
            assert same(row[key], value), (row["step"], row["module"], key, row[key], value)


def test_export_gives_the_same_rows_as_the_live_files_and_a_tensor_run_exports_too(tmp_path):
    path = capture(tmp_path, "live", parquet_window=10)
    r = clirun.run("export", path, "--parquet", tmp_path / "exported", "--window", "10")
    assert r.returncode == 0, r.stderr
    exported = sorted((tmp_path / "exported").iterdir())
    assert [f.name for f in exported] == [f.name for f in sorted((path / "parquet").iterdir())]
    live = rows(sorted((path / "parquet").iterdir()))
    assert len(rows(exported)) == len(live)
    assert all(all(same(a[k], b[k]) for k in a) for a, b in zip(rows(exported), live))

    # a tensor run has no statistics in its index: export takes them from the files
    model = Server()
    with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "tensors", "log_step_ids": [0, 1]}) as run:
        serve(model, steps=2)
    r = clirun.run("export", run.path, "--parquet", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    table = rows((tmp_path / "t").iterdir())
    first = tensorlog.load_run(run.path).steps[0].calls[0].outputs[0]
    row = next(x for x in table if x["step"] == 0 and x["name"] == first.name and x["module"] == "layers.0")
    assert row["abs_max"] == pytest.approx(first.load().abs().max().item(), rel=1e-6) and row["nan_count"] == 0


def test_the_readme_duckdb_example_works_as_written(tmp_path):
    path = capture(tmp_path, "server", parquet_window=10)
    text = README.read_text()
    block = re.search(r"<!-- parquet-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "the README's Parquet example is marked <!-- parquet-example -->"
    code = block.group(1)
    assert '"/tmp/tensorlog/server/parquet/*.parquet"' in code
    code = code.replace("/tmp/tensorlog/server", str(path))  # the only change: where this test's run is
    printed: list[object] = []
    exec(compile(code, "README.md", "exec"), {"print": printed.append})
    first_nan, growth = printed
    assert first_nan[0][:2] == (NAN_STEP, NAN_MODULE)
    assert growth[0][0] == GROWING


def test_retention_keeps_the_newest_steps_of_a_run_that_never_ends(tmp_path):
    path = capture(tmp_path, "last3", retain_steps=3, parquet_window=5)
    assert sorted(p.name for p in path.glob("step_*")) == ["step_22", "step_23", "step_24"]
    # Parquet windows entirely older than the steps kept are gone too
    assert [p.name for p in sorted((path / "parquet").iterdir())] == ["stats.steps000000020-000000024.parquet"]
    run = tensorlog.load_run(path)
    assert run.complete and run.manifest.removed_through == 21 and sorted(run.steps) == [22, 23, 24]
    r = clirun.run("inspect", path)
    assert r.returncode == 0 and "steps up to 21 were removed by retention" in r.stdout

    budget = 40_000
    path = capture(tmp_path, "bytes", retain_bytes=budget)
    kept = sorted(int(p.name.split("_")[1]) for p in path.glob("step_*"))
    size = sum(f.stat().st_size for p in path.glob("step_*") for f in p.rglob("*") if f.is_file())
    assert kept == list(range(kept[0], STEPS)) and 1 < len(kept) < STEPS and size <= budget
    assert tensorlog.load_run(path).manifest.removed_through == kept[0] - 1

    # two retained runs still compare, on the steps both kept
    other = capture(tmp_path, "last3b", retain_steps=3)
    result = tensorlog.compare(tmp_path / "last3", other)
    assert result and result.steps == [22, 23, 24]


def test_export_keeps_post_forward_inputs_and_an_unwritable_destination_is_one_line(tmp_path):
    path = capture(tmp_path, "pf", parquet_window=100, log_post_fwd_inputs=True)
    live = rows(sorted((path / "parquet").iterdir()))
    assert {r["kind"] for r in live} == {"inputs", "outputs", "post_fwd_inputs"}
    r = clirun.run("export", path, "--parquet", tmp_path / "e", "--window", "100")
    assert r.returncode == 0 and len(rows((tmp_path / "e").iterdir())) == len(live)
    (tmp_path / "file").write_text("")
    r = clirun.run("export", path, "--parquet", tmp_path / "file")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cannot write Parquet files" in r.stderr


def test_parquet_needs_statistics_and_a_bad_window_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="parquet_window writes statistics"):
        tensorlog.load_config({"parquet_window": 10})
    with pytest.raises(ConfigError, match="retain_steps"):
        tensorlog.load_config({"retain_steps": 0})
    path = capture(tmp_path, "s")
    r = clirun.run("export", path, "--parquet", tmp_path / "x", "--window", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_export_names_each_unreadable_file_and_exits_2(tmp_path):
    model = Server()
    with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "t", "log_step_ids": [0]}) as run:
        serve(model, steps=1)
    victim = next(run.path.glob("step_0/layers.0.up/outputs*.pt"))
    victim.write_bytes(b"not a tensor file")
    r = clirun.run("export", run.path, "--parquet", tmp_path / "out")
    assert r.returncode == 2
    assert "layers.0.up" in r.stderr and "Traceback" not in r.stderr
    table = rows((tmp_path / "out").iterdir())
    bad = [x for x in table if x["module"] == "layers.0.up" and x["kind"] == "outputs"]
    assert bad and bad[0]["abs_max"] is None and json.dumps(bad[0]["shape"])


def test_ranks_sharing_a_run_directory_each_remove_only_their_own_files(tmp_path):
    from tensorlog.capture.handle import start_capture
    from tensorlog.capture.run import RunInfo

    cfg = {"output_dir": str(tmp_path), "run_name": "tp", "log_step_ids": [], "mode": "statistics", "retain_steps": 2}
    for rank in (0, 1):
        model = Server()
        with start_capture(model, cfg, info=RunInfo(rank=rank, world_size=2)):
            serve(model, steps=5)
        if rank == 0:  # rank 1 may still write steps 0-2: rank 0 took its own files, the directories stay
            steps = sorted(p.name for p in (tmp_path / "tp").glob("step_*"))
            assert steps == [f"step_{i}" for i in range(5)]
            assert not [f for i in range(3) for f in (tmp_path / "tp" / f"step_{i}").rglob("*") if f.is_file()]
    path = tmp_path / "tp"
    assert sorted(p.name for p in path.glob("step_*")) == ["step_3", "step_4"]
    assert sorted(p.name for p in (path / "step_4").iterdir()) == ["tensorlog_index.rank0.json", "tensorlog_index.rank1.json"]
    run = tensorlog.load_run(path)
    assert run.complete and sorted(run.steps) == [3, 4] and {c.rank for c in run.calls()} == {0, 1}
    ranks = run.manifest.ranks or {}
    assert sorted(ranks) == [0, 1] and all(e.complete and e.removed_through == 2 for e in ranks.values())

    # a kill in the middle of a removal leaves some of a removed step's files: still a complete run
    leftover = path / "step_1" / "layers.0"
    leftover.mkdir(parents=True)
    (leftover / "outputs.rank0.json").write_text("{}")
    run = tensorlog.load_run(path)
    assert run.complete and not run.problems and sorted(s for s in run.steps if run.steps[s].calls) == [3, 4]
