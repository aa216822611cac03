"""HF transformers: step facts for alignment, and ``tensorlog capture`` for local checkpoints.

HF ``generate`` calls the model once per step with ``input_ids`` of shape
``[batch, new_tokens]`` and ``position_ids`` (the positions of those tokens),
so each step's request layout can be recorded the same way the vLLM
integration records it: request ids (batch rows), tokens per request, and the
position of each request's first token. Compare uses that to align HF's
``[batch, seq, hidden]`` activations with vLLM's flattened ``[num_tokens, hidden]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..capture.handle import CaptureHandle, capture
from ..config import ConfigError, ConfigLike, load_config

__all__ = ["capture_generate", "attach_step_info", "run_facts"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_facts(model: Any) -> dict[str, Any]:
    from .vllm.plugin import model_dims

    facts: dict[str, Any] = {"framework": "transformers"}
    try:
        import transformers

        facts["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    cfg = getattr(model, "config", None)
    if cfg is not None:
        facts["model_dims"] = model_dims(cfg)
        facts["architectures"] = list(getattr(cfg, "architectures", None) or [type(model).__name__])
        facts["model_path"] = getattr(cfg, "_name_or_path", None) or None
    param = next(iter(model.parameters()), None)
    if param is not None:
        facts["dtype"] = str(param.dtype)
    return facts


def attach_step_info(handle: CaptureHandle, model: torch.nn.Module) -> None:
    """Record each step's request layout from the root call's ``input_ids`` / ``cache_position``."""
    if not handle.enabled:
        return

    def pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                return
            batch, n = ids.shape
            pos = kwargs.get("position_ids")
            if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.numel():
                starts = [int(v) for v in pos[:, 0]]
            else:
                cache_pos = kwargs.get("cache_position")
                start = int(cache_pos[0]) if isinstance(cache_pos, torch.Tensor) and cache_pos.numel() else 0
                starts = [start] * batch
            handle.annotate_step(
                {"req_ids": [str(i) for i in range(batch)], "num_tokens": [int(n)] * batch,
                 "start_positions": starts, "total_tokens": int(batch * n), "layout": "batch_major"}
            )
        except Exception:  # facts for alignment only; never break the model
            pass

    handle._handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))


def load_causal_lm(model: str, *, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """A causal LM from a local directory (or a hub id where the network allows), eager, in eval mode."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConfigError("transformers is not installed: pip install 'tensorlog[transformers]'") from None
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    try:
        m = AutoModelForCausalLM.from_pretrained(model, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None
    return m.to(device).eval()


def capture_generate(
    model: str | torch.nn.Module,
    input_ids: list[list[int]],
    config: ConfigLike | None = None,
    *,
    max_new_tokens: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    **overrides: Any,
) -> tuple[Path, torch.Tensor]:
    """Greedy-decode ``input_ids`` with an HF causal LM under capture; returns (run dir, sequences).

    Args:
        model (str | nn.Module): a local checkpoint directory (or hub id), or a loaded model.
        input_ids (list of list of int): one prompt per batch row; rows must have equal length
            (no padding, so positions are the same in every framework).
        config: as for :func:`tensorlog.capture`.
        max_new_tokens (int, default 1): decode steps after the prefill.
        dtype (str, default "float32"): float32, bfloat16 or float16 (when ``model`` is a path).

    Example:
        >>> path, seq = capture_generate("/models/tiny", [[1, 2, 3]], {"log_step_ids": [0, 1]}, max_new_tokens=2)
    """
    if not input_ids or len({len(r) for r in input_ids}) != 1 or not input_ids[0]:
        raise ConfigError("input ids: give one or more prompts of equal, non-zero length (e.g. 1,2,3 or 1,2,3;4,5,6)")
    cfg = load_config(config if config is not None else {})
    m = load_causal_lm(model, dtype=dtype, device=device) if isinstance(model, (str, Path)) else model
    if isinstance(model, (str, Path)):
        overrides.setdefault("run_name", cfg.run_name)
    ids = torch.tensor(input_ids, device=device)
    with torch.no_grad(), capture(m, cfg, **overrides) as run:
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=getattr(m.config, "pad_token_id", None) or 0)
    if isinstance(model, (str, Path)):
        _record_model_path(run.path, str(model))
    return run.path, out


def _record_model_path(run_dir: Path, model: str) -> None:
    import json

    from ..storage.writer import write_json

    manifest_path = run_dir / "run.json"
    data = json.loads(manifest_path.read_text())
    data["model_path"] = model
    write_json(manifest_path, data)
