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

from ..capture import CaptureHandle, RunInfo, start_capture
from ..config import ConfigLike, load_config
from ..errors import DependencyError, UsageError
from ..schema.records import request_start
from .model_facts import model_dims

__all__ = ["capture_generate", "run_facts", "step_layout", "StepLayout", "load_causal_lm", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_facts(model: Any, model_path: str | None = None) -> dict[str, Any]:
    """What ``run.json`` records about an HF model (framework, sizes, dtype)."""
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
        facts["model_path"] = model_path or getattr(cfg, "_name_or_path", None) or None
    param = next(iter(model.parameters()), None)
    if param is not None:
        facts["dtype"] = str(param.dtype)
    return facts


class StepLayout:
    """The request layout of each ``forward`` of one capture, from ``input_ids`` and ``attention_mask``.

    Each ``generate()`` call (a forward with an empty cache) starts new requests, one per batch row,
    named ``g<call>.<row>`` so that two calls in one capture never share rows; each is keyed across runs
    by its prompt with the padding removed (recorded at its first logged step), so a left-padded batch
    pairs with the same prompts run alone. A row's real tokens are the last ``num_tokens`` columns of
    the step; their positions count the real tokens before them in the attention mask.
    """

    def __init__(self) -> None:
        self.call = -1
        self.started: set[str] = set()

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any], logged: bool = True) -> dict[str, Any] | None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        if _cache_empty(kwargs):
            self.call += 1
        if not logged:
            return None  # reading the mask would cost a host sync on a step that logs nothing
        batch, n = ids.shape
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= n:
            m = mask.detach().to("cpu", torch.int64)
            real = [int(v) for v in m[:, -n:].sum(1)]
            starts = [int(v) for v in m[:, : m.shape[1] - n].sum(1)]
        else:
            real, starts = [int(n)] * batch, self._starts(kwargs, batch)
        call = max(self.call, 0)
        req_ids = [f"g{call}.{b}" for b in range(batch)]
        info: dict[str, Any] = {
            "req_ids": req_ids,
            "num_tokens": real,
            "start_positions": starts,
            "total_tokens": int(sum(real)),
            "layout": "batch_major",
            "width": int(n),
        }
        new = []
        host_ids = None
        for b, r in enumerate(req_ids):
            if r in self.started or starts[b] != 0:
                continue  # a request whose prompt this capture never saw whole is keyed by nothing
            if host_ids is None:
                host_ids = ids.detach().to("cpu", torch.int64)
            prompt = [int(v) for v in host_ids[b, n - real[b] :]]
            self.started.add(r)
            new.append(request_start(r, prompt))
        if new:
            info["new_requests"] = new
        return info

    @staticmethod
    def _starts(kwargs: dict[str, Any], batch: int) -> list[int]:
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.numel():
            return [int(v) for v in pos[:, 0]]
        cache_pos = kwargs.get("cache_position")
        start = int(cache_pos[0]) if isinstance(cache_pos, torch.Tensor) and cache_pos.numel() else 0
        return [start] * batch


def _cache_empty(kwargs: dict[str, Any]) -> bool:
    """A forward that starts a generation: no KV cache yet, or an empty one (a length read from shapes: no sync)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        return True
    try:
        return int(cache.get_seq_length()) == 0
    except Exception:
        return False


def step_layout(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """One forward's request layout, for a caller with no capture of its own (see :class:`StepLayout`)."""
    return StepLayout()(args, kwargs)


def load_causal_lm(model: str, *, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """A causal LM from a local directory (or a hub id where the network allows), eager, in eval mode."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise DependencyError("transformers is not installed: pip install 'tensorlog[transformers]'") from None
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        auto: Any = AutoModelForCausalLM
        m = auto.from_pretrained(model, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None
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
        raise UsageError("input ids: give one or more prompts of equal, non-zero length (e.g. 1,2,3 or 1,2,3;4,5,6)")
    cfg = load_config(config if config is not None else {})
    path = str(model) if isinstance(model, (str, Path)) else None
    m = load_causal_lm(str(model), dtype=dtype, device=device) if path is not None else model
    assert isinstance(m, torch.nn.Module)
    ids = torch.tensor(input_ids, device=device)
    handle: CaptureHandle = start_capture(m, cfg, info=RunInfo(facts=run_facts(m, path)), step_info=StepLayout(), **overrides)
    with torch.no_grad(), handle:
        generate: Any = m.generate
        out = generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=getattr(m.config, "pad_token_id", None) or 0,
        )
    return handle.path, out


def replay_states() -> dict[str, Any]:
    """The state HF modules carry across steps, rebuilt by replay: a fresh ``DynamicCache`` per module."""
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:
        return {}
    return {f"{DynamicCache.__module__}.{DynamicCache.__qualname__}": DynamicCache}


def model_a_of(run: Any) -> torch.nn.Module | None:
    """Model A of an HF run, from the checkpoint and dtype its ``run.json`` names, when that checkpoint is here."""
    extra = run.manifest.model_extra or {}
    path = extra.get("model_path")
    if not isinstance(path, str) or not Path(path).is_dir():
        return None
    dtype = str(extra.get("dtype") or "torch.float32").removeprefix("torch.")
    try:
        return load_causal_lm(path, dtype=dtype if dtype in DTYPES else "float32")
    except (UsageError, DependencyError):
        return None
