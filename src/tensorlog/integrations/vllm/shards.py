"""What vLLM's tensor-parallel layers say about how their outputs lie across ranks.

Read from each layer's own attributes at load time and recorded in ``run.json``
(``shard_layouts``), so that compare merges ranks by the model's word instead
of guessing from shapes. Layers are recognised by class name and attributes,
so a vLLM whose classes moved still works where the attributes are the same.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["shard_layouts"]


def _layout(m: Any) -> dict[str, Any] | None:
    names = {k.__name__ for k in type(m).__mro__}
    tp = int(getattr(m, "tp_size", 1) or 1)
    if "QKVParallelLinear" in names:
        head, v_head = int(m.head_size), int(getattr(m, "v_head_size", m.head_size))
        replicas = int(getattr(m, "num_kv_head_replicas", 1) or 1)
        return {
            "rule": "concat_parts",
            "dim": -1,
            "layer": "QKVParallelLinear",
            "inputs": "replicated",
            "parts": [int(m.num_heads) * head, int(m.num_kv_heads) * head, int(m.num_kv_heads) * v_head],
            "replicas": [1, replicas, replicas],
        }
    if "MergedColumnParallelLinear" in names:
        return {
            "rule": "concat_parts",
            "dim": -1,
            "layer": "MergedColumnParallelLinear",
            "inputs": "replicated",
            "parts": [int(s) // tp for s in m.output_sizes],
        }
    if "ColumnParallelLinear" in names:
        gathered = bool(getattr(m, "gather_output", False))
        return {
            "rule": "replicated" if gathered else "concat",
            "dim": -1,
            "inputs": "replicated",
            "layer": f"ColumnParallelLinear(gather_output={gathered})",
        }
    if "RowParallelLinear" in names:
        reduced = bool(getattr(m, "reduce_results", True))
        return {
            "rule": "replicated" if reduced else "partial_sum",
            "dim": -1,
            "inputs": "concat" if getattr(m, "input_is_parallel", True) else "replicated",
            "layer": f"RowParallelLinear(reduce_results={reduced})",
        }
    if type(m).__name__.endswith("AndMul"):  # SiluAndMul, GeluAndMul: act(gate) * up over a merged column output
        return {"rule": "concat", "dim": -1, "inputs": "concat_halves", "layer": type(m).__name__}
    if "ParallelLMHead" in names:
        return None  # its weight is used by the logits processor; the module itself is not called
    if "VocabParallelEmbedding" in names:
        return {"rule": "replicated", "layer": "VocabParallelEmbedding (all-reduced)", "inputs": "replicated"}
    if "LogitsProcessor" in names:
        vocab = getattr(m, "org_vocab_size", None)
        return {"rule": "vocab", "vocab": int(vocab) if vocab else None, "layer": "LogitsProcessor (gathered)"}
    return None


def shard_layouts(model: torch.nn.Module, tp_size: int) -> dict[str, dict[str, Any]]:
    """Module name -> layout (a :class:`~tensorlog.schema.records.ShardLayout` as a dict), when TP > 1."""
    if tp_size <= 1:
        return {}
    out = {}
    for name, m in model.named_modules():
        try:
            layout = _layout(m)
        except Exception:  # an attribute of another shape than expected: no record, compare falls back to shapes
            layout = None
        if layout is not None:
            out[name] = layout
    return out
