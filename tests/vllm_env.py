"""The environment every test that starts a real vLLM engine gives it: no tensorlog config inherited from the
caller, a 1 GiB KV cache, and one process (``single_process``) or vLLM's default multi-process engine."""

from __future__ import annotations

import os


def engine_env(single_process: bool = True, **extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORLOG_", "VLLM_DEBUG_TENSOR_DUMP"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1", PYTHONUNBUFFERED="1")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if single_process else "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env
