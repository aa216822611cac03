"""Watching a live model, on plain PyTorch: the watcher's numbers, its cost model, the flight recorder.

What must hold: the watched statistics equal a statistics capture's of the same forward, eager or
compiled; a compiled model keeps zero graph breaks and bit-identical outputs; an eager model carries
no hook on a step that is not watched; the flight recorder's run reads as an ordinary statistics run
that names where a NaN was born (DuckDB finds it too); and a capture request over HTTP is validated
into one clear line.
"""

from __future__ import annotations

import math

import pytest
import torch

import tensorlog
from conftest import tiny_hf_llama
from tensorlog.capture.flight import write_watched_run
from tensorlog.capture.run import RunInfo
from tensorlog.capture.watch import Watcher, summarize, watched_modules
from tensorlog.config import load_config
from tensorlog.errors import ConfigError
from watch_stats import expected

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

IDS = [torch.tensor([[3, 14, 15, 92, 65, 35, 89]]), torch.tensor([[5, 6, 7]]), torch.tensor([[9, 8, 7, 6, 5]])]


def _watch(model, fwd, tmp_path, every=1, keep=8, **cfg):
    config = load_config({"watch_every": every, "watch_keep": keep, "output_dir": str(tmp_path), **cfg})
    return config, Watcher(model, config, compiled=fwd is not model)


def _run_steps(w, fwd, inputs, first=0):
    out, steps = [], []
    with torch.no_grad():
        for i, x in enumerate(inputs):
            w.begin_step(first + i)
            out.append(fwd(x).logits)
            steps.append(w.end_step({"req_ids": [f"r{i}"], "num_tokens": [x.shape[1]]}))
    return out, steps


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_watched_statistics_equal_a_statistics_capture_of_the_same_forward(tmp_path, compiled):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_hf_llama()
    fwd = torch.compile(model) if compiled else model
    _, w = _watch(model, fwd, tmp_path)
    assert w.names == ["model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    outs, steps = _run_steps(w, fwd, IDS)
    w.close()
    if compiled:
        assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
        torch._dynamo.reset()
        with torch.no_grad():
            plain = [torch.compile(model)(x).logits for x in IDS]
        assert all(torch.equal(a, b) for a, b in zip(outs, plain))  # watching changes nothing the model computes
    with (
        torch.no_grad(),
        tensorlog.capture(
            model,
            {
                "mode": "statistics",
                "output_dir": str(tmp_path),
                "run_name": "ref",
                "log_step_ids": [],
                "module_call_match": [r"layers\.\d+$", r"model\.norm$", "lm_head"],
            },
        ) as ref,
    ):
        for x in IDS:
            model(x)
    run = tensorlog.load_run(ref.path)
    for k, step in enumerate(steps):
        assert step is not None and step.step == k
        got = summarize(step)
        want = expected(run, k)
        assert set(got) == set(want)
        for key, (abs_max, rms, mean) in want.items():
            s = got[key]
            assert s.nonfinite == 0
            assert s.abs_max == pytest.approx(abs_max, rel=1e-6), key
            assert s.rms == pytest.approx(rms, rel=1e-5), key
            assert s.mean == pytest.approx(mean, rel=1e-4, abs=1e-7), key


def test_an_eager_model_carries_hooks_only_on_watched_steps(tmp_path):
    model = tiny_hf_llama()
    _, w = _watch(model, model, tmp_path, every=3)
    layer = model.model.layers[0]
    seen = []
    with torch.no_grad():
        for k in range(7):
            watched = w.begin_step(k)
            seen.append((watched, bool(layer._forward_hooks), bool(layer._forward_pre_hooks)))
            model(IDS[0])
            step = w.end_step(None)
            assert (step is not None) == watched
            assert not layer._forward_hooks and not layer._forward_pre_hooks
    assert seen == [(k % 3 == 0,) * 3 for k in range(7)]
    assert [s.step for s in w.recent] == [0, 3, 6]
    w.close()


def test_the_keep_bound_holds_and_the_default_selection_is_small():
    names = [f"model.layers.{i}{suffix}" for i in range(3) for suffix in ("", ".mlp", ".self_attn.q_proj")]
    names += ["model.norm", "model.embed_tokens", "lm_head", "logits_processor", "transformer.h.0", "transformer.ln_f"]
    assert watched_modules(names, None) == [
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "model.norm",
        "lm_head",
        "logits_processor",
        "transformer.h.0",
        "transformer.ln_f",
    ]
    assert watched_modules(names, ["mlp$"]) == ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]
    with pytest.raises(ConfigError, match="watch_keep"):
        load_config({"watch_every": 1, "watch_keep": 100000})
    with pytest.raises(ConfigError, match="watch_every"):
        load_config({"watch_every": 0})


class _Bomb(torch.nn.Module):
    """Multiplies by a factor that a test turns to inf: a NaN/Inf born here, at a step the test picks."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        return x * self.factor


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_the_flight_recorder_writes_the_steps_before_a_nan_as_a_statistics_run(tmp_path, compiled):
    torch._dynamo.reset()
    model = tiny_hf_llama()
    bomb = _Bomb()
    mlp = model.model.layers[1].mlp
    mlp.down_proj = torch.nn.Sequential(mlp.down_proj, bomb)
    fwd = torch.compile(model, dynamic=True) if compiled else model
    config, w = _watch(model, fwd, tmp_path, keep=3)
    steps = []
    with torch.no_grad():
        for k in range(6):
            if k == 4:
                bomb.factor = math.inf
                if compiled:  # a Python float is baked into the graph: the change recompiles, as a weight update would not
                    torch._dynamo.reset()
            w.begin_step(100 + k)
            fwd(IDS[k % 3])
            steps.append(w.end_step({"req_ids": [f"req-{k}"], "num_tokens": [IDS[k % 3].shape[1]]}))
            if any(v.nonfinite for v in summarize(steps[-1]).values()):
                break  # where the flight recorder writes: at the first step that shows one
    assert [s.step for s in steps] == [100, 101, 102, 103, 104]
    first = summarize(steps[-1])
    assert first[("model.layers.0", "output")].nonfinite == 0 and first[("model.layers.1", "output")].nonfinite > 0
    path, anomaly = write_watched_run(config, model, RunInfo(), list(w.recent), "flight")
    w.close()
    assert anomaly is not None and anomaly.step == 104 and anomaly.born_here
    assert anomaly.module == "model.layers.1.mlp.down_proj" or anomaly.module == "model.layers.1", anomaly
    run = tensorlog.load_run(path)
    assert sorted(run.steps) == [102, 103, 104] and run.complete
    assert run.steps[104].info.req_ids == ["req-4"]
    assert run.manifest.config["mode"] == "statistics"
    # the birth, found with DuckDB in the run's Parquet export (one row per tensor per call)
    duckdb = pytest.importorskip("duckdb")
    from tensorlog.cli import main

    assert main(["export", str(path), "--parquet", str(tmp_path / "pq")]) == 0
    row = duckdb.sql(
        f"SELECT step, module FROM '{tmp_path / 'pq'}/*.parquet' "
        "WHERE kind = 'outputs' AND nan_count + inf_count > 0 ORDER BY step, seq_start LIMIT 1"
    ).fetchall()
    assert row == [(104, "model.layers.1")]


def test_a_capture_request_is_checked_into_one_line():
    from tensorlog.integrations.vllm.control import capture_request

    base = load_config({"output_dir": "/srv/il", "watch_every": 10})
    req = capture_request({"steps": 2, "mode": "statistics", "module_call_match": ["layers"]}, base, "c1", "/tmp/x")
    assert req["steps"] == 2 and req["request_ids"] is None
    assert req["config"]["output_dir"] == "/srv/il" and req["config"]["run_name"] == "c1"
    assert req["config"]["log_step_ids"] == [] and req["config"]["mode"] == "statistics"
    assert capture_request({"request_id": "abc"}, None, "c2", "/tmp/x")["request_ids"] == ["abc"]
    assert capture_request({}, None, "c2", "/tmp/x")["steps"] == 1
    for body, text in [
        ({"stepz": 2}, "unknown key 'stepz' (did you mean 'steps'?)"),
        ({"steps": 0}, "steps: an integer from 1"),
        ({"steps": True}, "steps: an integer from 1"),
        ({"steps": 1, "request_id": "a"}, "not both"),
        ({"output_dir": "/etc"}, "output_dir: set when the server starts"),
        ({"stop_on_anomaly": True}, "stop_on_anomaly: set when the server starts"),
        ({"mode": "tensors"}, "mode"),
        ({"module_call_match": ["("]}, "module_call_match"),
        ([1, 2], "expected a JSON object"),
        ({"request_id": [1]}, "request_id"),
    ]:
        with pytest.raises(ConfigError, match="invalid") as e:
            capture_request(body, base, "c", "/tmp/x")
        assert text in str(e.value) and "\n" not in str(e.value), (body, str(e.value))


def test_only_loopback_callers_count_as_local():
    from tensorlog.integrations.vllm.endpoints import _loopback

    assert _loopback("127.0.0.1") and _loopback("127.8.9.1") and _loopback("::1") and _loopback("::ffff:127.0.0.1")
    assert _loopback(None)  # a Unix socket
    assert not _loopback("192.0.2.2") and not _loopback("::ffff:10.0.0.1") and not _loopback("fd00::2")
    assert not _loopback("localhost.evil") and not _loopback("")


def test_the_metrics_carry_the_latest_watched_step_and_count_every_nonfinite_value(tmp_path):
    prometheus_client = pytest.importorskip("prometheus_client")
    from tensorlog.capture.watch import ModuleStats
    from tensorlog.integrations.prometheus import Publisher

    pub = Publisher(None)
    pub.publish({("model.layers.0", "output"): ModuleStats(2.5, 0.5, 0.1, 0, 64)})
    pub.publish({("model.layers.0", "output"): ModuleStats(3.0, 0.75, -0.2, 3, 64)})
    pub.publish({("model.layers.0", "output"): ModuleStats(math.nan, math.nan, math.nan, 2, 64)})
    text = prometheus_client.generate_latest().decode()
    assert 'tensorlog_abs_max{kind="output",module="model.layers.0"} NaN' in text
    assert 'tensorlog_nonfinite_total{kind="output",module="model.layers.0"} 5.0' in text
    assert "tensorlog_steps_watched_total 3.0" in text
    with pytest.raises(ValueError, match="watched without metrics"):
        Publisher(1)  # a registry takes each name once: another label set in the same process is refused


def test_the_endpoints_take_the_servers_config_and_keep_other_plugins_loaded(monkeypatch):
    import asyncio
    from argparse import Namespace
    from types import SimpleNamespace

    from tensorlog.integrations.vllm import launcher
    from tensorlog.integrations.vllm.endpoints import TensorlogEndpoints

    monkeypatch.delenv("TENSORLOG_CONFIG", raising=False)
    monkeypatch.delenv("TENSORLOG_CONFIG_PATH", raising=False)
    state = SimpleNamespace()
    args = Namespace(api_key=None, additional_config={"intermediate_log_config": {"output_dir": "/srv/il", "watch_every": 5}})
    asyncio.run(TensorlogEndpoints().init_state(object(), state, args))
    assert state.tensorlog.base.output_dir == "/srv/il" and state.tensorlog.tokens == []
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    names = launcher._endpoint_env()["VLLM_PLUGINS"].split(",")
    import importlib.metadata as md

    general = {ep.name for d in md.distributions() for ep in d.entry_points if ep.group == "vllm.general_plugins"}
    assert "tensorlog" in names and general <= set(names)
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    assert launcher._endpoint_env() == {}  # the user's own list stays as given
