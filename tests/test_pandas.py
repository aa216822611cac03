"""Notebooks: a run and a comparison as pandas DataFrames, with the Parquet export's columns and the compare's verdicts."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import tensorlog
from tensorlog.compare.metrics import STAT_COMPARED, TensorMetrics
from tensorlog.compare.results import PAIR_COLUMNS
from tensorlog.report.parquet import export_parquet
from tensorlog.schema.columns import COLUMNS

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

STEPS = 3
DIVERGING = "layers.1.down"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, defect: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        if defect:  # registered before capture's hooks, so that capture sees the changed output
            self.layers[1].down.register_forward_hook(lambda m, a, o: o * 1.01)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def capture(tmp_path, name: str, defect: bool = False, **cfg):
    model = Net(defect)
    config = {"output_dir": str(tmp_path), "run_name": name, "log_step_ids": list(range(STEPS)), **cfg}
    with tensorlog.capture(model, config) as run, torch.no_grad():
        for s in range(STEPS):
            torch.manual_seed(s)
            model(torch.randn(2, 8))
    return run.path


def exported(run, dest):
    """The export's rows, read back from its Parquet file."""
    out = export_parquet(run, dest)
    assert len(out.files) == 1 and out.rows > 0
    return pq.read_table(out.files[0])


def tensor_rows(run) -> int:
    return sum(t.is_tensor for c in run.calls() for t in c.inputs + c.outputs + c.post_fwd_inputs)


def assert_same_as_export(df, table) -> None:
    assert list(df.columns) == list(COLUMNS) == table.column_names
    assert [df[c].dtype.pyarrow_dtype for c in df.columns] == table.schema.types
    pd.testing.assert_frame_equal(df, table.to_pandas(types_mapper=pd.ArrowDtype))


@pytest.mark.parametrize("mode", ["statistics", "md5"])
def test_a_statistics_or_md5_run_is_the_frame_its_parquet_files_hold(tmp_path, mode):
    path = capture(tmp_path, mode, mode=mode, parquet_window=10)
    run = tensorlog.load_run(path)
    df = run.to_pandas()
    assert len(df) == tensor_rows(run) == STEPS * 9 * 2  # 9 modules (3 blocks, 6 linears), one input and one output each
    assert_same_as_export(df, exported(run, tmp_path / "export"))
    # the files capture wrote while running: the same rows, made by another path (the writer's own index documents)
    (live,) = (path / "parquet").iterdir()
    assert_same_as_export(df, pq.read_table(live))
    assert df["rank"].isna().all() and df["step"].tolist() == sorted(df["step"].tolist())
    if mode == "md5":
        rec = run.steps[1].call("layers.2.up").outputs[0]
        row = df[(df.step == 1) & (df.module == "layers.2.up") & (df.kind == "outputs")]
        assert df["checksum"].notna().all() and row["checksum"].tolist() == [rec.checksum]
        assert row["checksum_algorithm"].tolist() == [rec.checksum_algorithm] and rec.checksum_algorithm
    else:
        rec = run.steps[1].call("layers.2.up").outputs[0]
        row = df[(df.step == 1) & (df.module == "layers.2.up") & (df.kind == "outputs")]
        assert len(row) == 1 and row["abs_max"].iloc[0] == rec.stats["abs_max"] and row["shape"].iloc[0] == [2, 16]


def test_a_tensor_runs_statistics_are_taken_from_its_files_as_the_export_does(tmp_path):
    run = tensorlog.load_run(capture(tmp_path, "tensors"))
    df = run.to_pandas()
    assert len(df) == tensor_rows(run) == STEPS * 9 * 2
    assert_same_as_export(df, exported(run, tmp_path / "export"))
    out = run.steps[2].call("layers.0.down").outputs[0].load()
    row = df[(df.step == 2) & (df.module == "layers.0.down") & (df.kind == "outputs")].iloc[0]
    assert row["abs_max"] == pytest.approx(out.abs().max().item(), rel=1e-6)
    assert row["mean"] == pytest.approx(out.mean().item(), rel=1e-5, abs=1e-7) and row["nan_count"] == 0


def test_a_comparison_is_one_row_per_pair_with_its_verdict(tmp_path):
    a = capture(tmp_path, "a")
    b = capture(tmp_path, "b", defect=True)
    cmp = tensorlog.compare(a, b)
    df = cmp.to_pandas()
    assert list(df.columns) == list(PAIR_COLUMNS)
    assert set(TensorMetrics.model_fields) <= set(df.columns), "every metric the JSON holds per pair is a column"
    assert [str(df[c].dtype) for c in df.columns] == [str(pd.Series([], dtype=t).dtype) for t in PAIR_COLUMNS.values()]
    assert len(df) == sum(len(m.tensors) for m in cmp.modules) == STEPS * 9 * 2
    assert df["step"].tolist() == [t.step for m in cmp.modules for t in m.tensors]
    assert df["name"].tolist() == [t.name for m in cmp.modules for t in m.tensors]

    born = df[df.module == DIVERGING]
    assert len(born) == STEPS * 2 and set(born["verdict"]) == {"born"}
    out = born[born.kind == "outputs"]
    assert set(out["status"]) == {"mismatch"} and out["failed"].all() and not out["ok"].any()
    assert (out["max_abs"] > 0).all() and out["max_rel"].tolist() == pytest.approx([0.01 / 1.01] * STEPS, rel=1e-3)
    first = cmp.modules[[m.module for m in cmp.modules].index(DIVERGING)].tensors
    worst = next(t for t in first if t.kind == "outputs").metrics
    assert worst is not None and out["max_abs"].iloc[0] == worst.max_abs and out["worst_index"].iloc[0] == worst.worst_index
    assert set(df[df.module == "layers.2"]["verdict"]) == {"inherited"}

    clean = df[df.module == "layers.0.up"]
    assert set(clean["verdict"]) == {"match"} and set(clean["status"]) == {"match"} and clean["ok"].all()
    assert clean["exact"].all() and (clean["snr_db"] == float("inf")).all() and (clean["max_abs"] == 0).all()
    assert clean["stat_rel_max"].isna().all() and clean["rank"].isna().all() and (clean["method"] == "tensor").all()


def test_a_comparison_of_statistics_runs_has_the_relative_error_of_each_statistic(tmp_path):
    a = capture(tmp_path, "a", mode="statistics")
    b = capture(tmp_path, "b", defect=True, mode="statistics")
    df = tensorlog.compare(a, b).to_pandas()
    assert set(df["method"]) == {"statistics"} and df["max_abs"].isna().all()
    out = df[(df.module == DIVERGING) & (df.kind == "outputs")]
    assert set(out["verdict"]) == {"born"} and out["failed"].all()
    assert out["stat_rel_abs_max"].tolist() == pytest.approx([0.01 / 1.01] * STEPS, rel=1e-3)
    assert (df[df.module == "layers.0"][[f"stat_rel_{k}" for k in STAT_COMPARED]] == 0).all().all()


def test_an_empty_comparison_still_has_the_columns(tmp_path):
    path = capture(tmp_path, "a", mode="statistics")
    df = tensorlog.compare(path, path).model_copy(update={"modules": []}).to_pandas()
    assert df.empty and list(df.columns) == list(PAIR_COLUMNS)


def test_without_pandas_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    path = capture(tmp_path, "a", mode="statistics")
    run = tensorlog.load_run(path)
    cmp = tensorlog.compare(run, run)
    monkeypatch.setitem(sys.modules, "pandas", None)
    for frame in (run.to_pandas, cmp.to_pandas):
        with pytest.raises(tensorlog.DependencyError, match=r"pip install 'tensorlog\[pandas\]'") as e:
            frame()
        assert isinstance(e.value, tensorlog.TensorlogError)


def test_without_pyarrow_a_runs_frame_says_how_to_install_it(tmp_path, monkeypatch):
    run = tensorlog.load_run(capture(tmp_path, "a", mode="statistics"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(tensorlog.DependencyError, match=r"pyarrow: pip install 'tensorlog\[pandas\]'"):
        run.to_pandas()
