"""Tiny random-init Hugging Face checkpoints, built on the fly: the demo and the tests never download weights."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_tiny_checkpoint", "TINY"]

TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
"""Two layers, hidden 256, 4 heads over 2 KV heads: small enough for a CPU, shaped like the real thing."""


def save_tiny_checkpoint(directory: Path, kind: str = "llama", seed: int = 0, *, rich: bool = False) -> Path:
    """Save a random-init ``llama`` / ``mistral`` / ``qwen2`` / ``qwen3`` causal LM to ``directory``.

    ``rich``: random biases and norm weights too (HF initialises them to 0 and 1, which hides a mis-applied
    bias or norm: a tool that compares runs must see them matter).
    """
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    extra = {"head_dim": 64} if kind == "qwen3" else {}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**TINY, **extra))
    if rich:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
                elif "norm" in name:
                    p.normal_(1.0, 0.2)
    model.save_pretrained(directory)
    return directory
