"""``python -m tensorlog.demo.vllm_child MODEL OUTPUT_DIR RUN_NAME IDS MAX_TOKENS``: one vLLM capture.

Run in its own process by ``tensorlog demo --engine vllm``: vLLM keeps
process-wide state and its engine wants a ``__main__`` guard.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    model, output_dir, run_name, ids, max_tokens = argv
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg: dict[str, object] = {"output_dir": output_dir, "run_name": run_name, "module_call_match": None, "log_step_ids": []}
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=128,
        seed=0,
        additional_config={"intermediate_log_config": cfg},
    )
    prompt = TokensPrompt(prompt_token_ids=[int(t) for t in ids.split(",")])
    out = llm.generate([prompt], SamplingParams(max_tokens=int(max_tokens), temperature=0, ignore_eos=True), use_tqdm=False)
    print(json.dumps(list(out[0].outputs[0].token_ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
