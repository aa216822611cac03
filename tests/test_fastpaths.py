"""The fast paths of capture: per-step statistics, the packed layout, the index writer.

Each fast path is held to the slow, obvious computation it replaced: statistics to
float64 arithmetic, the packed layout to the reference layout, the index to its schema.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tensorlog
from tensorlog.compare.metrics import compare_stats
from tensorlog.schema.records import STAT_KEYS, StepIndex
from tensorlog.storage import stats as _stats


class Chain(nn.Module):
    """Linear layers of growing width: outputs from 64 bytes to a few MB."""

    def __init__(self, widths=(4, 64, 1024, 4096)):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.act = nn.GELU()

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return x


def _run(model, tmp_path, name, x, steps=2, **cfg):
    with (
        torch.no_grad(),
        tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": name, "log_step_ids": [], **cfg}) as run,
    ):
        for _ in range(steps):
            model(x)
    return run.path


# -- statistics ------------------------------------------------------------------------------


def _truth(x: torch.Tensor) -> dict[str, float]:
    d = x.double().reshape(-1)
    finite = d[torch.isfinite(d)]
    return {
        "min": d.min().item(),
        "max": d.max().item(),
        "mean": d.mean().item(),
        "std": d.std().item() if d.numel() > 1 else 0.0,
        "l2_norm": torch.linalg.vector_norm(d).item(),
        "nan_count": int(torch.isnan(d).sum()),
        "inf_count": int(torch.isinf(d).sum()),
        "finite": finite.numel() == d.numel(),
    }


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]),
    offset=st.sampled_from([0.0, 1e3, -1e4]),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    special=st.sampled_from([None, "nan", "inf"]),
)
def test_statistics_are_exact_on_every_path(shape, dtype, offset, scale, special):
    """The hook's device-side path and the writer's host path agree with float64 arithmetic.

    A large offset against a small spread is where a one-pass variance loses every digit."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * scale + offset
    if special and dtype.is_floating_point:
        x.view(-1)[0] = float(special)
    x = x.to(dtype)
    truth = _truth(x)
    device = [float(v) for v in _stats.partial_stats(x)]
    rows = {
        "device": _stats.finish(device + [0.0] * (_stats.PARTIAL - len(device)), x.numel()),
        "host": _stats.host_stats(x),
    }
    for path, row in rows.items():
        got = dict(zip(STAT_KEYS, row))
        assert (got["nan_count"], got["inf_count"]) == (truth["nan_count"], truth["inf_count"]), path
        if not truth["finite"]:
            continue
        exact = 1e-6 if dtype == torch.float64 else 1e-5
        for k in ("min", "max"):
            assert got[k] == pytest.approx(truth[k], rel=1e-7, abs=1e-12), (path, k)
        spread = truth["std"] * math.sqrt(x.numel())
        assert got["mean"] == pytest.approx(truth["mean"], rel=exact, abs=exact * (spread + 1e-12)), (path, "mean")
        assert got["std"] == pytest.approx(truth["std"], rel=1e-4, abs=1e-9), (path, "std")
        assert got["l2_norm"] == pytest.approx(truth["l2_norm"], rel=1e-5), (path, "l2_norm")


def test_a_mean_near_zero_is_compared_at_the_precision_it_was_summed_in():
    """Two tools sum the same float32 values in different orders: a normalised tensor's mean (~1e-9)
    then differs in every digit. That is not a divergence; a real shift of the mean is."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    x = (x - x.mean()) / x.std()
    a = dict(zip(STAT_KEYS, _stats.host_stats(x)))
    b = {**a, "mean": x.mean().item()}  # torch's float32 summation order
    assert a["mean"] != b["mean"] and abs(b["mean"]) < 1e-6
    assert compare_stats(a, b, rtol=1e-5, atol=1e-8)[0]
    assert not compare_stats(a, {**b, "mean": b["mean"] + 1e-4}, rtol=1e-5, atol=1e-8)[0]


def test_statistics_mode_reads_device_values_once_per_step(tmp_path, monkeypatch):
    """On CUDA a read of a device value is a sync. With the host check off, as it is there, the model's
    thread reads nothing, and the whole step's statistics come back in one read by the finishing thread."""
    monkeypatch.setattr(_stats, "HOST_CHECK_DEVICES", frozenset())
    reads: collections.Counter[str] = collections.Counter()
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            reads[threading.current_thread().name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    model = Chain((4, 8, 16))
    x = torch.randn(3, 4)
    _run(model, tmp_path, "s", x, steps=3, mode="statistics", small_tensor_values=0)
    finishing = sum(n for t, n in reads.items() if t == "tensorlog-finisher")
    assert reads["MainThread"] == 0 and finishing == 3, dict(reads)


def test_tensor_mode_on_cpu_takes_statistics_from_the_files_when_asked(tmp_path):
    model, x = Chain(), torch.randn(2, 4)
    t = _run(model, tmp_path, "t", x, steps=1)
    s = _run(model, tmp_path, "s", x, steps=1, mode="statistics")
    index = json.loads((t / "step_0" / "tensorlog_index.json").read_text())
    assert all("stats" not in e for c in index["calls"] for e in c["tensors"])  # nothing computed on the hot path
    for a, b in zip(tensorlog.load_run(t).steps[0].calls, tensorlog.load_run(s).steps[0].calls):
        for ta, tb in zip(a.tensors, b.tensors):
            for k in STAT_KEYS:
                assert ta.stats[k] == pytest.approx(tb.stats[k], rel=1e-5, abs=1e-7), (a.module, ta.name, k)
    assert tensorlog.compare(t, s).exit_code == 0


def test_the_index_is_what_its_schema_says(tmp_path):
    model, x = Chain((4, 8)), torch.randn(2, 4)
    for mode in ("tensor", "statistics", "md5"):
        run = _run(model, tmp_path, mode, x, steps=1, mode=mode)
        raw = json.loads((run / "step_0" / "tensorlog_index.json").read_text())
        index = StepIndex.model_validate(raw)
        known = set(type(index.calls[0].tensors[0]).model_fields)
        assert {k for c in raw["calls"] for e in c["tensors"] for k in e} <= known
        assert {k for c in raw["calls"] for k in c} <= set(type(index.calls[0]).model_fields)


# -- the packed layout ------------------------------------------------------------------------


def test_packed_and_reference_layouts_hold_the_same_tensors_and_give_the_same_report(tmp_path):
    model, x = Chain(), torch.randn(8, 4)
    ref = _run(model, tmp_path, "ref", x)
    packed = _run(model, tmp_path, "packed", x, layout="packed")
    assert sorted(p.name for p in (packed / "step_0").iterdir()) == ["tensorlog_index.json", "tensors.safetensors"]
    a, b = tensorlog.load_run(ref), tensorlog.load_run(packed)
    for step in (0, 1):
        for ca, cb in zip(a.steps[step].calls, b.steps[step].calls):
            assert [t.name for t in ca.tensors] == [t.name for t in cb.tensors]
            for ta, tb in zip(ca.tensors, cb.tensors):
                assert torch.equal(ta.load(), tb.load()), (ca.module, ta.name)
    same, packed_res = tensorlog.compare(ref, ref, rtol=0, atol=0), tensorlog.compare(ref, packed, rtol=0, atol=0)
    assert same.exit_code == packed_res.exit_code == 0
    summary = [(m.module, m.verdict, [(t.name, t.status) for t in m.tensors]) for m in same.modules]
    assert [(m.module, m.verdict, [(t.name, t.status) for t in m.tensors]) for m in packed_res.modules] == summary
    # a plain safetensors file: every byte indexed, every tensor readable by the safetensors library
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(packed / "step_0" / "tensors.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert "layers.2/outputs_cpu" in keys and all(k.startswith("__pad_") or "/" in k for k in keys)
        assert torch.equal(f.get_tensor("layers.2/outputs_cpu"), b.steps[0].call("layers.2").outputs[0].load())


def test_packed_tensors_larger_than_a_staging_chunk_span_chunks_intact(tmp_path):
    """A 1 MiB budget makes 512 KiB chunks: the 4096-wide outputs (128 KiB a row) lie across them."""
    model, x = Chain(), torch.randn(16, 4)
    with torch.no_grad():
        want = model.layers[2](model.act(model.layers[1](model.act(model.layers[0](x)))))
    run = _run(model, tmp_path, "p", x, steps=3, layout="packed", max_pending_bytes=1 << 20)
    got = tensorlog.load_run(run)
    assert sorted(got.steps) == [0, 1, 2] and got.complete
    for step in got.steps.values():
        assert torch.equal(step.call("layers.2").outputs[0].load(), want)


def test_packed_layout_under_backpressure_drop_stays_valid_and_says_what_it_dropped(tmp_path, monkeypatch):
    from test_faults import slow_writes

    slow_writes(monkeypatch, "write_chunk")
    model, x = Chain(), torch.randn(64, 4)
    with torch.no_grad():
        want = model(x)
    with (
        torch.no_grad(),
        tensorlog.capture(
            model,
            {
                "output_dir": str(tmp_path),
                "run_name": "d",
                "layout": "packed",
                "max_pending_bytes": 1 << 17,
                "on_backpressure": "drop",
            },
        ) as run,
    ):
        assert torch.equal(model(x), want)  # logging never changes what the model computes
    got = tensorlog.load_run(run.path)
    assert not got.problems and got.manifest.dropped
    for call in got.steps[0].calls:
        for t in call.tensors:
            if t.has_data:
                t.load()  # what was kept is whole


def test_packed_layout_with_a_dtype_safetensors_lacks_skips_that_tensor_and_keeps_the_rest(tmp_path):
    class ToComplex(nn.Module):
        def forward(self, x):
            return torch.polar(x, x).to(torch.complex128)

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = ToComplex()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.c(x), self.lin(x)

    run = tensorlog.load_run(_run(Both(), tmp_path, "c", torch.rand(3), steps=1, layout="packed"))
    out = run.steps[0].call("c").outputs[0]
    assert not out.has_data and out.entry.skipped == "torch.complex128 cannot be stored in safetensors"
    assert run.steps[0].call("lin").outputs[0].load().shape == (3,)
