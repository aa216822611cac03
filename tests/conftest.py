"""Shared fixtures: tiny models built on the fly (never downloaded)."""

from __future__ import annotations

import pytest
import torch


def tiny_hf_llama(attn: str | None = None):
    """A 2-layer random-init HF LlamaForCausalLM (hidden 64) in eval mode; ``attn`` picks the attention kernel."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
    )
    if attn is not None:
        cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def hf_llama():
    return tiny_hf_llama()


@pytest.fixture
def prompt():
    return torch.tensor([[3, 14, 15, 92, 65, 35, 89]])


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "runs"
