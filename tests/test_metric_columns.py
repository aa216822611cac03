"""A metric is one accumulator and one column: the column spec is what every report and the JSON docs read."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import clirun
import tensorlog
from tensorlog.compare import metrics as _metrics
from tensorlog.compare.metrics import Accumulator, Chunk, Column, Pair, TensorMetrics, columns, register_metric
from tensorlog.compare.results import PAIR_COLUMNS, ModuleResult
from tensorlog.report import render_markdown
from tensorlog.report.html import render_html

ROOT = Path(__file__).resolve().parents[1]


class SignFlips(Accumulator):
    """Elements whose sign differs between the runs: a metric none of the built-in ones is."""

    fields = ("sign_flips",)

    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.flips = 0
        self.chunks = 0

    def add(self, c: Chunk) -> None:
        self.flips += int((torch.sign(c.xs) != torch.sign(c.ys)).sum())
        self.chunks += 1

    def finish(self) -> dict[str, Any]:
        assert self.chunks == -(-self.pair.a.numel() // _metrics.CHUNK_ELEMENTS)  # fed every chunk, once
        return {"sign_flips": self.flips}

    @classmethod
    def identical(cls, n: int) -> dict[str, Any]:
        return {"sign_flips": 0}


SIGN_FLIPS = Column("sign_flips", "sign flips", "elements whose sign differs", "Int64", style="integer")


def _capture(model: nn.Module, out: Path, name: str, x: torch.Tensor) -> str:
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(out), "run_name": name}) as run:
        model(x)
    return str(run.path)


def _two_runs(tmp_path: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 6), nn.Tanh()), torch.randn(5, 4)
    a = _capture(model, tmp_path, "a", x)
    with torch.no_grad():
        model[0].bias += 0.3  # moves outputs near zero across it
    return a, _capture(model, tmp_path, "b", x)


def _expected_flips(a: str, b: str) -> dict[tuple[str, str], int]:
    """Sign flips of every tensor pair, computed from the files without the comparison."""
    r1, r2 = tensorlog.load_run(a), tensorlog.load_run(b)
    out = {}
    for call in r1.steps[0].calls:
        other = {t.name: t for t in r2.steps[0].call(call.dirname).tensors}
        for t in call.tensors:
            out[(call.dirname, t.name)] = int((torch.sign(t.load()) != torch.sign(other[t.name].load())).sum())
    return out


def test_a_metric_defined_here_reaches_the_json_and_the_reports(tmp_path, monkeypatch):
    a, b = _two_runs(tmp_path)
    expected = _expected_flips(a, b)
    assert expected[("0", "outputs_cpu")] > 0 and expected[("0", "inputs_0_cpu")] == 0
    before = render_markdown(tensorlog.compare(a, b), verbose=True)
    monkeypatch.setattr(_metrics, "CHUNK_ELEMENTS", 7)  # several chunks per tensor

    with register_metric(SignFlips, SIGN_FLIPS):
        result = tensorlog.compare(a, b)
        doc = json.loads(result.model_dump_json())
        md = clirun.run("compare", a, b, "--verbose", "--output", tmp_path / "r.md")
        html = clirun.run("compare", a, b, "--verbose", "--output", tmp_path / "r.html")
    assert md.returncode == 1 and html.returncode == 1

    found = {(m["module"], t["name"]): t["metrics"]["sign_flips"] for m in doc["modules"] for t in m["tensors"] if t["metrics"]}
    assert found == expected
    first = doc["modules"][0]["tensors"][0]["metrics"]
    assert list(first)[-1] == "sign_flips"  # after the built-in fields, which keep their order

    lines = (tmp_path / "r.md").read_text().splitlines()
    head = next(line for line in lines if line.startswith("| module | tensor |"))
    assert head.endswith("| judged by | sign flips | note |")
    at = head.split(" | ").index("sign flips")
    row = next(line for line in lines if line.startswith("| `0` | outputs_cpu |"))
    assert row.split(" | ")[at] == str(expected[("0", "outputs_cpu")])

    page = (tmp_path / "r.html").read_text()
    assert "<th>cosine</th><th>sign flips</th><th>note</th>" in page
    tr = next(r for r in page.split("<tr>") if r.startswith("<td><code>0</code></td><td>outputs_cpu</td>"))
    assert "<td>mismatch</td>" in tr  # a failing pair's metrics are shown, not left empty
    assert re.findall(r"<td[^>]*>(.*?)</td>", tr)[-2] == str(expected[("0", "outputs_cpu")])

    after = tensorlog.compare(a, b)  # removed: the comparison is as before, to the byte
    assert "sign_flips" not in after.model_dump_json() and render_markdown(after, verbose=True) == before


def test_registering_a_metric_checks_its_columns_and_removing_it_twice_is_harmless():
    with pytest.raises(ValueError, match="one column per field"):
        register_metric(SignFlips, Column("flips", "flips", "misnamed"))

    class Clash(SignFlips):
        fields = ("max_abs",)

    with pytest.raises(ValueError, match="taken"):
        register_metric(Clash, Column("max_abs", "x", "y"))
    with pytest.raises(ValueError, match="module-level"):
        register_metric(SignFlips, Column("sign_flips", "x", "y", module="worst_sign_flips"))
    handle = register_metric(SignFlips, SIGN_FLIPS)
    with pytest.raises(ValueError, match="taken"):
        register_metric(SignFlips, SIGN_FLIPS)
    handle.remove()
    handle.remove()
    assert SIGN_FLIPS not in columns() and SignFlips not in _metrics.accumulators()
    assert "sign_flips" not in _metrics.compare_tensors(torch.ones(3), torch.zeros(3)).model_dump()


def test_columns_are_tensor_metrics_fields_in_order_each_computed_by_one_accumulator():
    assert [c.field for c in columns()] == list(TensorMetrics.model_fields)
    made = [f for acc in _metrics.accumulators() for f in acc.fields]
    assert len(made) == len(set(made))
    assert set(made) | {"allclose", "numel", "exact", "judged_by"} == set(TensorMetrics.model_fields)
    for acc in _metrics.accumulators():  # two equal tensors skip the chunks: their fields come from identical()
        assert set(acc.identical(5)) == set(acc.fields)
    # the pandas frame keeps its columns and dtypes
    metric_cols = {k: v for k, v in PAIR_COLUMNS.items() if k in TensorMetrics.model_fields}
    assert metric_cols == {c.field: c.dtype for c in columns()}


def test_every_report_table_names_columns_that_exist():
    for view in ("modules", "modules_brief", "tensors", "tensors_brief"):
        cols = columns(view)
        assert cols and all(c in columns() for c in cols)
        if view.startswith("modules"):  # module tables show the worst value over a module's outputs
            assert all(c.module in ModuleResult.model_fields for c in cols)


def test_docs_list_every_column_as_the_spec_says():
    doc = (ROOT / "docs" / "compare-json.md").read_text()
    for c in columns():
        assert f"| `{c.field}` | {c.header} | {c.doc} |" in doc, f"docs/compare-json.md lacks the row of {c.field}"


def test_the_worst_over_a_module_follows_each_columns_direction(tmp_path):
    a, b = _two_runs(tmp_path)
    for m in tensorlog.compare(a, b).modules:
        outs = [t.metrics for t in m.tensors if t.kind == "outputs" and t.metrics is not None]
        assert m.worst_max_abs == max(t.max_abs for t in outs) and m.min_cosine == min(t.cosine for t in outs)


def test_a_comparison_made_before_a_metric_was_registered_still_renders(tmp_path):
    a, b = _two_runs(tmp_path)
    result = tensorlog.compare(a, b)
    with register_metric(SignFlips, SIGN_FLIPS):
        md = render_markdown(result, verbose=True)
        html = render_html(result, verbose=True)
    assert "| sign flips |" in md and "<th>sign flips</th>" in html
    row = next(line for line in md.splitlines() if line.startswith("| `0` | outputs_cpu |"))
    assert row.endswith("|  |  |")  # no value: the pair was compared before the metric existed


def test_a_comparison_on_ray_refuses_a_registered_metric_it_would_not_compute(tmp_path):
    a, b = _two_runs(tmp_path)
    with register_metric(SignFlips, SIGN_FLIPS), pytest.raises(tensorlog.UsageError, match="SignFlips"):
        tensorlog.compare(a, b, ray="auto")
