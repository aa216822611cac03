"""Graph-native taps: the compiled graph measures and copies its own values, with no Python per call.

What must hold, on plain PyTorch with Inductor: no graph break in either order of capture and compile,
outputs bit-identical to the untapped compiled model, values equal to an eager capture's within rounding,
one graph for two sequence lengths, no Python tap callback while the graph runs, and the calls of a step
that is logged told apart from those of the steps around it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tensorlog
from conftest import tiny_hf_llama
from tensorlog.capture import compiled as compiled_mod
from tensorlog.capture import graphtap

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89]])
STEPS = [IDS, IDS.flip(1), (IDS * 3) % 128]
"""Three different inputs: a row left over from another step would not match the eager capture."""


def _fresh() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def _breaks() -> dict[str, int]:
    return dict(torch._dynamo.utils.counters["graph_break"])


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _eager_run(model, tmp_path, inputs, **cfg) -> tensorlog.Run:
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "eager", **cfg}) as run:
        for x in inputs:
            model(x)
    return tensorlog.load_run(run.path)


def _untapped(model, inputs, **kw) -> tuple[list[torch.Tensor], int]:
    _fresh()
    compiled = torch.compile(model, **kw)
    with torch.no_grad():
        outs = [compiled(x).logits for x in inputs]
    return outs, _graphs()


def _assert_same_as_eager(eager: tensorlog.Run, native: tensorlog.Run, pairs: int = 51) -> None:
    assert sorted(native.steps) == sorted(eager.steps)
    for k in eager.steps:
        assert [c.dirname for c in native.steps[k].calls] == [c.dirname for c in eager.steps[k].calls], k
    res = tensorlog.compare(eager.path, native.path)
    assert res.exit_code == 0 and not res.first_divergence, (res.summary, res.first_divergence[:1], res.problems[:2])
    assert res.summary.only_in_1 == res.summary.only_in_2 == 0 and res.summary.pairs_compared >= pairs


@pytest.mark.parametrize("mode", ["statistics", "tensor"])
def test_capture_then_compile_with_the_default_config_taps_inside_the_graph(tmp_path, mode):
    model = tiny_hf_llama()
    cfg = {"mode": mode, "log_step_ids": [0, 2]}
    eager = _eager_run(model, tmp_path, STEPS, **cfg)
    untapped, graphs = _untapped(model, STEPS)
    _fresh()
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "native", **cfg}) as run:
        compiled = torch.compile(model)  # after capture, no `compiled` key: the hooks find themselves traced
        outs = [compiled(x).logits for x in STEPS]
    assert _breaks() == {}
    for a, b in zip(outs, untapped):
        assert torch.equal(a, b), f"the taps changed the output by {(a - b).abs().max().item():.3g}"
    native = tensorlog.load_run(run.path)
    info = native.manifest.compiled
    assert info.mode == "compiled" and info.not_observable == {}
    assert set(info.taps.values()) == {"graph"} and len(info.taps) == 31
    _assert_same_as_eager(eager, native)
    assert graphs >= 1
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("layout", ["reference", "packed"])
def test_compile_then_capture_writes_the_eager_files(tmp_path, layout):
    model = tiny_hf_llama()
    eager = _eager_run(model, tmp_path, STEPS[:2], log_step_ids=[1], layout=layout)
    _fresh()
    compiled = torch.compile(model)
    cfg = {"output_dir": str(tmp_path), "run_name": "native", "log_step_ids": [1], "layout": layout}
    with torch.no_grad(), tensorlog.capture(compiled, cfg) as run:
        for x in STEPS[:2]:
            compiled(x)
    assert _breaks() == {}
    native = tensorlog.load_run(run.path)
    _assert_same_as_eager(eager, native)
    a, b = (r.steps[1].call("model.norm").outputs[0] for r in (eager, native))
    assert a.shape == b.shape == (1, 7, 64) and torch.allclose(a.load(), b.load(), rtol=1e-5, atol=1e-6)


def test_two_sequence_lengths_share_one_graph(tmp_path):
    model = tiny_hf_llama()
    inputs = [IDS[:, :4].clone(), IDS, IDS[:, :6].clone()]  # not views: Dynamo recompiles for a view, taps or not
    eager = _eager_run(model, tmp_path, inputs, log_step_ids=[0, 1, 2], layout="packed")
    untapped, graphs = _untapped(model, inputs, dynamic=True)
    _fresh()
    compiled = torch.compile(model, dynamic=True)
    cfg = {"output_dir": str(tmp_path), "run_name": "native", "log_step_ids": [0, 1, 2], "layout": "packed"}
    with torch.no_grad(), tensorlog.capture(compiled, cfg) as run:
        outs = [compiled(x).logits for x in inputs]
    assert _breaks() == {} and _graphs() == graphs == 1
    assert all(torch.equal(a, b) for a, b in zip(outs, untapped))
    native = tensorlog.load_run(run.path)
    assert [native.steps[k].call("model.norm").outputs[0].shape for k in range(3)] == [(1, 4, 64), (1, 7, 64), (1, 6, 64)]
    _assert_same_as_eager(eager, native)


def test_a_size_beyond_the_staging_keeps_its_statistics_and_says_why(tmp_path):
    model = tiny_hf_llama()
    compiled = torch.compile(model, dynamic=True)
    long = torch.arange(40).reshape(1, 40) % 128
    _fresh()
    cfg = {"output_dir": str(tmp_path), "run_name": "over", "log_step_ids": [0, 1], "layout": "packed"}
    with warnings.catch_warnings(record=True) as seen, torch.no_grad(), tensorlog.capture(compiled, cfg) as run:
        warnings.simplefilter("always")
        compiled(IDS[:, :4].clone())  # traced with no bound on the length: staged for 4 x 4 tokens
        compiled(long)
    loaded = tensorlog.load_run(run.path)
    out = loaded.steps[1].call("model.norm").outputs[0]
    assert out.shape == (1, 40, 64) and out.stats is not None and out.stats["nan_count"] == 0
    if _graphs() == 1:  # one graph, staged for 16 tokens: the data of 40 is left out, and said so
        assert any("mark_dynamic" in str(w.message) for w in seen)
        assert "mark_dynamic" in (out.entry.skipped or "")
    else:  # Dynamo traced the long input again (in a full test session it may): staged for it, kept whole
        assert out.entry.skipped is None and out.load().shape == (1, 40, 64)
    assert loaded.steps[0].call("model.norm").outputs[0].load().shape == (1, 4, 64)
    assert run.stopped_reason is None


def test_no_python_runs_per_tapped_call(tmp_path, monkeypatch):
    """The callback op's kernel looks its site up in ``_sites``: count those lookups while the graph runs."""
    model = tiny_hf_llama()
    lookups = {"n": 0}

    class Counting(dict):
        def get(self, key, default=None):
            lookups["n"] += 1
            return super().get(key, default)

    def replayed(site, xs, leaves):  # the step's end hands the graph's values over, once per call: not a tap
        fn = dict.get(compiled_mod._sites, site)
        if fn is not None:
            fn(xs, leaves)

    monkeypatch.setattr(compiled_mod, "_sites", Counting())
    monkeypatch.setattr(compiled_mod, "_call_site", replayed)
    counts = {}
    for taps in ("native", "callback"):
        _fresh()
        compiled = torch.compile(model)
        lookups["n"] = 0
        cfg = {"output_dir": str(tmp_path), "run_name": taps, "mode": "statistics", "graph_taps": taps, "log_step_ids": [0, 1]}
        with torch.no_grad(), tensorlog.capture(compiled, cfg) as run:
            for x in STEPS[:2]:
                compiled(x)
        counts[taps] = lookups["n"]
        assert len(tensorlog.load_run(run.path).steps[1].calls) == 31
    assert counts["native"] == 0 and counts["callback"] >= 2 * 31 * 2, counts
    assert tensorlog.load_run(tmp_path / "callback").manifest.compiled.taps["model.norm"] == "callback"


def test_a_full_table_falls_back_to_callbacks_in_the_same_order(tmp_path, monkeypatch):
    model = tiny_hf_llama()
    eager = _eager_run(model, tmp_path, STEPS[:2], log_step_ids=[1], mode="statistics")
    monkeypatch.setattr(graphtap, "DEFAULT_ROWS", 40)  # room for the first dozen calls' tensors
    _fresh()
    compiled = torch.compile(model)
    cfg = {"output_dir": str(tmp_path), "run_name": "native", "log_step_ids": [1], "mode": "statistics"}
    with torch.no_grad(), tensorlog.capture(compiled, cfg) as run:
        for x in STEPS[:2]:
            compiled(x)
    native = tensorlog.load_run(run.path)
    kinds = native.manifest.compiled.taps
    assert kinds["model.embed_tokens"] == "graph" and kinds["lm_head"] == "callback"
    _assert_same_as_eager(eager, native)


class _Log(torch.nn.Module):
    def forward(self, z):
        return z, (z > 0).int(), torch.log(z)  # NaN wherever z < 0


class _Twice(torch.nn.Module):
    """One module called twice in a step, a bfloat16 round trip, an integer output and a NaN born inside."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.l = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), _Log()

    def forward(self, x):
        y = self.a(self.a(x))
        return self.l(self.b(y.to(torch.bfloat16).float()))


def test_a_nan_born_inside_the_graph_is_found_where_eager_finds_it(tmp_path):
    torch.manual_seed(0)
    model, x = _Twice(), torch.randn(4, 8)
    cfg = {"detect_anomaly": True, "log_step_ids": [0, 1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the NaN's own warning
        eager = _eager_run(model, tmp_path, [x, x + 1], **cfg)
        _fresh()
        compiled = torch.compile(model)
        with torch.no_grad(), tensorlog.capture(compiled, {"output_dir": str(tmp_path), "run_name": "native", **cfg}) as run:
            for step in (x, x + 1):
                compiled(step)
    assert _breaks() == {}
    native = tensorlog.load_run(run.path)
    assert [c.dirname for c in native.steps[0].calls] == ["a", "a_1", "b", "l"]
    assert run.anomaly is not None and (run.anomaly.step, run.anomaly.module) == (0, "l") and run.anomaly.born_here
    assert native.manifest.anomaly == eager.manifest.anomaly
    nan = native.steps[0].call("l").outputs[2].stats
    assert nan is not None and nan["nan_count"] == eager.steps[0].call("l").outputs[2].stats["nan_count"] > 0
    assert torch.equal(native.steps[1].call("l").outputs[1].load(), eager.steps[1].call("l").outputs[1].load())


def test_a_second_capture_taps_again_and_a_closed_one_leaves_no_trace(tmp_path):
    torch.manual_seed(0)
    model, x = _Twice(), torch.randn(4, 8)
    _fresh()
    compiled = torch.compile(model)
    with torch.no_grad():
        plain = compiled(x)[0]
    _fresh()  # the graph above has no taps: torch.compile keeps it, hooks or not
    for name in ("first", "second"):
        cfg = {"output_dir": str(tmp_path), "run_name": name, "mode": "statistics"}
        with torch.no_grad(), tensorlog.capture(compiled, cfg) as run:
            assert torch.equal(compiled(x)[0], plain)
        assert [c.dirname for c in tensorlog.load_run(run.path).steps[0].calls] == ["a", "a_1", "b", "l"]
    with torch.no_grad():
        assert torch.equal(compiled(x)[0], plain)  # retraced without taps: the closed capture's buffers are gone
    assert not [n for n in vars(graphtap._BUFFERS) if not n.startswith("__")], "buffers outlived their capture"


class _Boom(torch.nn.Module):
    fail = False

    def forward(self, x):
        if self.fail:
            raise ValueError("boom")
        return x * 2


class _WithBoom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.boom, self.b = torch.nn.Linear(8, 8), _Boom(), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.boom(self.a(x)))


def test_a_step_that_raises_leaves_the_next_steps_logged(tmp_path):
    """After the model raises, Dynamo may compile each hook as a frame of its own, whose ints are symbols: the
    hooks then call back (Python per call) instead of failing every later call."""
    torch.manual_seed(0)
    model, x = _WithBoom(), torch.randn(4, 8)
    eager = _eager_run(model, tmp_path, [x, x], mode="statistics", log_step_ids=[0, 1])
    _fresh()
    compiled = torch.compile(model)
    cfg = {"output_dir": str(tmp_path), "run_name": "native", "mode": "statistics", "log_step_ids": [0, 1, 2]}
    with torch.no_grad(), tensorlog.capture(compiled, cfg) as run:
        first = compiled(x)
        model.boom.fail = True
        with pytest.raises(ValueError, match="boom"):
            compiled(x)
        model.boom.fail = False
        assert torch.equal(compiled(x), first)
    native = tensorlog.load_run(run.path)
    assert [c.dirname for c in native.steps[2].calls] == ["a", "boom", "b"]
    assert native.steps[1].complete is False
    for k in (0, 2):
        for a, b in zip(native.steps[k].calls, eager.steps[0].calls):
            assert a.outputs[0].stats is not None and a.outputs[0].stats["max"] == pytest.approx(
                b.outputs[0].stats["max"], rel=1e-6
            )


def test_a_size_that_may_be_zero_is_still_measured(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    xs = [torch.randn(n, 8) for n in (4, 6)]
    cfg = {"mode": "statistics", "log_step_ids": [0, 1]}
    eager = _eager_run(model, tmp_path, xs, **cfg)
    for t in xs:
        torch._dynamo.decorators.mark_unbacked(t, 0)  # lower bound 0: no aminmax without a sentinel
    _fresh()
    compiled = torch.compile(model)
    with torch.no_grad(), tensorlog.capture(compiled, {"output_dir": str(tmp_path), "run_name": "native", **cfg}) as run:
        for t in xs:
            compiled(t)
    res = tensorlog.compare(eager.path, run.path)
    assert res.exit_code == 0 and res.summary.pairs_compared == 12, (res.summary, res.first_divergence[:1], res.problems[:2])


def test_capture_then_compile_on_a_step_that_is_not_logged_says_how_to_get_taps(tmp_path):
    """Dynamo does not guard on hooks: a graph traced while the step's module hooks are off keeps none."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8)
    cfg = {"mode": "statistics", "log_step_ids": [1, 2]}
    eager = _eager_run(model, tmp_path, [x, x, x], **cfg)
    _fresh()
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "native", **cfg}) as run:
            compiled = torch.compile(model)
            compiled(x)  # step 0, not logged: traced without module hooks
            torch.compiler.reset()  # what the warning says
            compiled(x)
            compiled(x)
    assert any("during a step that is not logged" in str(w.message) for w in seen)
    assert _breaks() == {}
    _assert_same_as_eager(eager, tensorlog.load_run(run.path), pairs=12)
