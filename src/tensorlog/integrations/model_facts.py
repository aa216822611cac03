"""Facts about a model that alignment needs, read from an HF-style config with no framework imported."""

from __future__ import annotations

from typing import Any

__all__ = ["model_dims"]


def model_dims(hf_config: Any) -> dict[str, Any]:
    """The sizes cross-framework alignment needs: fused qkv splits, heads per rank, vocabulary."""
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = _int(getattr(text, "num_attention_heads", None))
    hidden = _int(getattr(text, "hidden_size", None))
    head_dim = _int(getattr(text, "head_dim", None)) or (hidden // heads if hidden and heads else None)
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": _int(getattr(text, "num_key_value_heads", None)) or heads,
        "head_dim": head_dim,
        "intermediate_size": _int(getattr(text, "intermediate_size", None)),
        "vocab_size": _int(getattr(text, "vocab_size", None)),
        "model_type": getattr(text, "model_type", None),
    }


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None
