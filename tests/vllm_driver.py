"""Runs a real vLLM engine on a tiny local model; used by test_vllm.py in a subprocess.

    python vllm_driver.py MODEL_DIR [--dtype float32] [--max-tokens 3] [--prompts "5,6,7,8,9;11,12,13"]
        [--config-json JSON] [--perturb MODULE] [--report FILE]

Also a valid target for `tensorlog vllm run vllm_driver.py ... --intermediate-log-config-path cfg.json`.
--report writes what the worker saw: hook counts on the model and whether tensorlog equipped the runner
(only in single-process mode, where apply_model runs in this process).
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=3)
    ap.add_argument("--prompts", default="5,6,7,8,9;11,12,13")
    ap.add_argument("--config-json")
    ap.add_argument("--perturb")
    ap.add_argument("--report")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-num-batched-tokens", type=int, help="small values split a prefill over several steps")
    ap.add_argument("--eager", action="store_true", help="pass enforce_eager=True (else tensorlog must force it)")
    ap.add_argument("--check-run", help="a run directory: report which step indexes exist the moment generate() returns")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {}
    if args.max_num_batched_tokens:
        kwargs.update(max_num_batched_tokens=args.max_num_batched_tokens, enable_chunked_prefill=True)
    if args.config_json:
        kwargs["additional_config"] = {"intermediate_log_config": json.loads(args.config_json)}
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_model_len=128,
        enforce_eager=args.eager,
        seed=0,
        tensor_parallel_size=args.tp,
        **kwargs,
    )
    if args.perturb:
        name = args.perturb

        def perturb(model):
            # vLLM's CPU linear layers may run on prepacked weights, so scaling .weight would not
            # reach the kernel: scale the layer's output instead (the hook runs before tensorlog's).
            def scale(module, args, output):
                if isinstance(output, tuple):
                    return (output[0] * 1.01, *output[1:])
                return output * 1.01

            model.get_submodule(name).register_forward_hook(scale)

        llm.apply_model(perturb)
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p.split(",")]) for p in args.prompts.split(";")]
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True))
    on_disk = sorted(p.parent.name for p in Path(args.check_run).glob("step_*/tensorlog_index*.json")) if args.check_run else None
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "on_disk_at_return": on_disk}
    if args.report:
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            result["hooks"] = llm.apply_model(_hook_count)
            result["equipped"] = llm.collective_rpc(lambda self: hasattr(self.model_runner, "_tensorlog"))
            result["enforce_eager"] = llm.llm_engine.vllm_config.model_config.enforce_eager
        with open(args.report, "w") as f:
            json.dump(result, f)
    print("TOKENS", json.dumps(result["tokens"]))


if __name__ == "__main__":
    main()
