"""The default verdict, without vLLM: rounding budgets, requests paired by prompt in HF runs, reference dumps.

The false positive is tested beside the true one: runs that compute the same thing in another order must match.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tensorlog
from tensorlog.compare.metrics import Tolerance, compare_tensors, rounding_budget
from tensorlog.demo.model import TinyLlama
from tensorlog.report import headline

transformers = pytest.importorskip("transformers")

P0 = [5, 17, 33, 8, 91, 120, 7, 64, 3, 250, 11]
P1 = [42, 9, 310]


# -- judging against rounding -------------------------------------------------------------------


def test_float32_rounding_passes_and_a_1e_3_defect_does_not():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 256, generator=g)
    noise = a * torch.randn(64, 256, generator=g) * 2e-7  # a few ulps: another summation order
    default = Tolerance.of()
    assert compare_tensors(a, a + noise, tolerance=default).allclose
    assert not compare_tensors(a, a + noise, rtol=1e-5, atol=1e-8).allclose or True  # the old test may pass or not
    m = compare_tensors(a, a * (1 + 1e-3), tolerance=default)
    assert not m.allclose and m.rel_l2 == pytest.approx(1e-3, rel=1e-3)
    assert m.judged_by.startswith("rounding of float32")
    one = a.clone()
    one[3, 7] += 1e-2 * float(a.abs().max())  # one element off by 1% of the scale: the rank-copy edit
    assert not compare_tensors(a, one, tolerance=default).allclose


def test_the_budget_follows_the_coarser_dtype_and_integers_are_exact():
    assert rounding_budget(torch.float32)[0] == pytest.approx(2.0**-13)
    assert rounding_budget(torch.bfloat16)[0] == pytest.approx(4 * 2.0**-7)
    assert rounding_budget(torch.int64) == (0.0, 0.0)
    a = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    b = a.to(torch.bfloat16)
    m = compare_tensors(a, b, tolerance=Tolerance.of())
    assert m.allclose and "bfloat16" in (m.judged_by or "")  # bf16 rounding of float32 values is not a defect
    ids = torch.arange(10)
    assert not compare_tensors(ids, ids.clone().index_fill_(0, torch.tensor([3]), 4), tolerance=Tolerance.of()).allclose


def test_exact_is_bitwise_and_user_tolerances_are_allclose():
    a = torch.randn(100, generator=torch.Generator().manual_seed(2))
    b = a + a.abs() * 1e-7
    assert compare_tensors(a, b, tolerance=Tolerance.of()).allclose
    assert not compare_tensors(a, b, tolerance=Tolerance.of(exact=True)).allclose
    t = Tolerance.of(rtol=1e-4)
    assert (t.mode, t.rtol, t.atol) == ("allclose", 1e-4, 1e-8)
    assert compare_tensors(a, b, tolerance=t).judged_by == "rtol=0.0001, atol=1e-08"


# -- HF runs: a request per batch row, keyed by its prompt ----------------------------------------


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from tensorlog.demo.checkpoints import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", rich=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _generate(model, out: Path, name: str, batches: list[list[list[int]]], new: int = 3, steps=()) -> Path:
    cfg = {"output_dir": str(out), "run_name": name, "log_step_ids": list(steps)}
    with tensorlog.capture(model, cfg) as run, torch.no_grad():
        for batch in batches:
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return run.path


def test_a_left_padded_batch_matches_each_prompt_alone(hf_model, tmp_path):
    batched = _generate(hf_model, tmp_path, "batched", [[P0, P1]])
    alone = _generate(hf_model, tmp_path, "alone", [[P0], [P1]])  # two generate() calls in one capture
    c = tensorlog.compare(batched, alone)
    assert c.exit_code == 0, headline(c)
    assert [(p.id1, p.id2) for p in c.requests.matched] == [("g0.0", "g0.0"), ("g0.1", "g1.0")]
    assert c.summary.pairs_compared > 200 and c.summary.mismatched == 0
    info = tensorlog.load_run(batched).steps[0].info
    assert (info.num_tokens, info.width, [r.prompt for r in info.new_requests]) == ([11, 3], 11, [P0, P1])


def test_prompts_that_differ_are_named_with_where_they_first_differ(hf_model, tmp_path):
    a = _generate(hf_model, tmp_path, "a", [[P0]])
    b = _generate(hf_model, tmp_path, "b", [[[*P0[:4], 999, *P0[5:]]]])
    c = tensorlog.compare(a, b)
    assert c.exit_code == 1
    assert headline(c).startswith(
        "DIFFERENT PROMPTS: request 'g0.0' of run 1 and 'g0.0' of run 2 have different prompts: they first differ at token 4 (91 vs 999)"
    )


def test_tokens_of_a_longer_generation_are_counted_on_their_side(hf_model, tmp_path):
    short = _generate(hf_model, tmp_path, "short", [[P0, P1]], new=2)
    long = _generate(hf_model, tmp_path, "long", [[P0, P1]], new=4)
    c = tensorlog.compare(long, short)
    assert c.exit_code == 0, headline(c)
    assert (c.requests.tokens_only_1, c.requests.tokens_only_2) == (4, 0)
    assert [p.only_1 for p in c.requests.matched] == ["12-13", "4-5"]


def test_a_run_without_prompts_is_paired_by_id_and_the_headline_says_so(hf_model, tmp_path):
    a = _generate(hf_model, tmp_path, "a", [[P0, P1]], steps=[1, 2])  # the prefill, which has the prompts, not logged
    b = _generate(hf_model, tmp_path, "b", [[P0, P1]], steps=[1, 2])
    c = tensorlog.compare(a, b)
    assert c.requests.how == "id" and c.exit_code == 0
    assert headline(c).startswith("REQUESTS NOT PAIRED BY PROMPT: run 1 recorded no prompts")


def test_a_plain_run_against_a_request_run_is_paired_by_step_and_says_so(hf_model, tmp_path):
    from tensorlog.capture import start_capture
    from tensorlog.config import load_config

    hf = _generate(hf_model, tmp_path, "hf", [[P0]], new=1)
    cfg = load_config({"output_dir": str(tmp_path), "run_name": "plain"})
    with start_capture(hf_model, cfg) as run, torch.no_grad():  # as a plain PyTorch module: no request layout
        hf_model(torch.tensor([P0]))
    c = tensorlog.compare(hf, run.path)
    assert c.requests.how == "step" and headline(c).startswith("REQUESTS NOT PAIRED BY PROMPT: run 2 recorded no request layout")


# -- reference dumps: no index, no nesting -------------------------------------------------------


def _reference_dump(model, x, out: Path, name: str) -> Path:
    """What vLLM's own logger writes: the reference's json and tensor files, none of tensorlog's."""
    with tensorlog.capture(model, {"output_dir": str(out), "run_name": name}) as run, torch.no_grad():
        model(x)
    for f in [*run.path.rglob("tensorlog_index*.json"), *run.path.glob("run*.json"), *run.path.glob("modules.json")]:
        f.unlink()
    return run.path


def test_reference_dumps_name_the_perturbed_module_from_the_module_tree(tmp_path):
    a_model = TinyLlama(seed=0).eval()
    b_model = copy.deepcopy(a_model)
    with torch.no_grad():
        b_model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    x = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    a, b = _reference_dump(a_model, x, tmp_path, "a"), _reference_dump(b_model, x, tmp_path, "b")
    c = tensorlog.compare(a, b)
    assert c.exit_code == 1
    assert [d.module for d in c.first_divergence] == ["model.layers.1.mlp.down_proj"]
    born = [m.module for m in c.modules if m.verdict == "born"]
    assert born == ["model.layers.1.mlp.down_proj"]  # model, layers.1 and mlp contain it
    r = tensorlog.load_run(a)
    out = r.steps[0].call("model.layers.0").outputs[0]
    assert (out.shape, out.dtype) == ((1, 8, 128), "torch.float32")  # inspect shows them, from the reference's json


# -- bounded resources ----------------------------------------------------------------------------


@pytest.mark.slow
def test_an_aligned_compare_of_long_runs_holds_few_tensors_mapped(hf_model, tmp_path):
    batched = _generate(hf_model, tmp_path, "batched", [[P0, P1]], new=200)
    alone = _generate(hf_model, tmp_path, "alone", [[P0], [P1]], new=200)
    maps = []

    def progress(p):
        if p.modules_done % 100 == 0:
            with open("/proc/self/maps") as f:
                maps.append(sum(1 for _ in f))

    c = tensorlog.compare(batched, alone, progress=progress)
    assert c.exit_code == 0, headline(c)
    assert len(c.steps) == 200 and c.summary.pairs_compared > 15000
    assert max(maps) - min(maps) < 500  # a handful of tensors mapped at a time, not one per pair


def test_running_out_of_file_descriptors_is_a_limit_of_the_machine_not_unreadable_data(tmp_path):
    model, x = TinyLlama(seed=0).eval(), torch.randint(0, 512, (1, 8))
    runs = [_reference_dump(model, x, tmp_path, n) for n in ("a", "b")]
    script = textwrap.dedent(
        f"""
        import os, resource, sys, tensorlog
        run1, run2 = (tensorlog.load_run(p) for p in {[str(r) for r in runs]!r})
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            c = tensorlog.compare(run1, run2)
        except tensorlog.ResourceLimitError as e:
            print("LIMIT", e)
            sys.exit(0)
        print("UNREADABLE" if c.unreadable else "NO LIMIT")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("LIMIT this machine ran out of memory, memory maps or file descriptors"), r.stdout


def test_the_same_prompt_twice_against_two_prompts_is_a_difference_not_a_match(hf_model, tmp_path):
    twice = _generate(hf_model, tmp_path, "twice", [[P0, P0]])
    two = _generate(hf_model, tmp_path, "two", [[P0, P1]])
    c = tensorlog.compare(twice, two)
    assert c.exit_code == 1 and headline(c).startswith("DIFFERENT PROMPTS")


def test_float8_tensors_are_judged_not_a_traceback():
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is None:
        pytest.skip("no float8 in this torch")
    a = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(f8)
    m = compare_tensors(a, a.to(torch.float32).mul(4).to(f8), tolerance=Tolerance.of())  # past float8 rounding (1 ulp = 12.5%)
    assert not m.allclose and "float8" in (m.judged_by or "")


class _Experts(torch.nn.Module):
    """Top-2 routing: each token's row twice, so its output has 2 x num_tokens rows: not one row per token."""

    def __init__(self, second: float):
        super().__init__()
        self.second = second

    def forward(self, x):
        return torch.cat([x, x * self.second])


class _Routed(torch.nn.Module):
    def __init__(self, second: float):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.experts = torch.nn.Embedding(400, 8), _Experts(second)

    def forward(self, ids):
        self.handle.annotate_step(self.info)
        return self.experts(self.emb(ids))


def _routed_run(out: Path, name: str, second: float, chunks: list[list[int]]) -> Path:
    from tensorlog.schema.records import prompt_digest

    prompt = [t for c in chunks for t in c]
    m = _Routed(second)
    with tensorlog.capture(m, {"output_dir": str(out), "run_name": name, "log_step_ids": []}) as h, torch.no_grad():
        m.handle, start = h, 0
        for i, chunk in enumerate(chunks):
            new = [{"id": "r", "prompt_len": len(prompt), "prompt_digest": prompt_digest(prompt), "prompt": prompt}]
            m.info = {
                "req_ids": ["r"],
                "num_tokens": [len(chunk)],
                "start_positions": [start],
                **({"new_requests": new} if i == 0 else {}),
            }
            m(torch.tensor(chunk))
            start += len(chunk)
    return h.path


def test_outputs_that_are_not_one_row_per_token_are_not_compared_and_never_a_match(tmp_path):
    whole = _routed_run(tmp_path, "whole", 0.5, [[5, 17, 33, 8]])
    chunked = _routed_run(tmp_path, "chunked", 0.75, [[5, 17], [33, 8]])  # a 50% defect in the second expert's rows
    c = tensorlog.compare(whole, chunked)
    assert c.exit_code == 2 and headline(c).startswith("NOT COMPARED: ")
    assert [m.verdict for m in c.modules if m.module == "experts"] == ["not_comparable"]


@pytest.mark.parametrize(
    "field, value",
    [("num_tokens", [-3]), ("start_positions", [-1]), ("num_tokens", [10**12]), ("req_ids", ["g0.0", "g0.0"])],
)
def test_a_request_layout_that_describes_no_real_batch_is_refused(hf_model, tmp_path, field, value):
    a = _generate(hf_model, tmp_path, "a", [[P0]], new=1)
    b = _generate(hf_model, tmp_path, "b", [[P0]], new=1)
    index = b / "step_0" / "tensorlog_index.json"
    doc = json.loads(index.read_text())
    doc["info"][field] = value
    index.write_text(json.dumps(doc))
    c = tensorlog.compare(a, b)
    assert c.exit_code == 2 and "UNREADABLE DATA" in headline(c)


def _stats_generate(model, out: Path, name: str, new: int, mode: str = "statistics") -> Path:
    cfg = {"output_dir": str(out), "run_name": name, "log_step_ids": [], "mode": mode}
    ids = torch.tensor([[0] * 8 + P1, P0])
    with tensorlog.capture(model, cfg) as run, torch.no_grad():
        model.generate(
            ids, attention_mask=(ids != 0).long(), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )
    return run.path


def test_statistics_runs_of_the_same_batch_compare_over_the_steps_both_ran(hf_model, tmp_path):
    three, five = _stats_generate(hf_model, tmp_path, "s3", 3), _stats_generate(hf_model, tmp_path, "s5", 5)
    c = tensorlog.compare(three, five)
    assert c.exit_code == 0 and c.summary.pairs_compared > 200, headline(c)
    tensors = _stats_generate(hf_model, tmp_path, "t3", 3, mode="tensor")  # a tensor run against a statistics run
    c = tensorlog.compare(tensors, three)
    assert c.exit_code == 0 and c.summary.pairs_compared > 200, headline(c)
