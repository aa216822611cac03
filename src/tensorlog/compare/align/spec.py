"""Mapping specs: how two runs' module names and tensor layouts correspond (rename, split, combine, shard, ignore).

A mapping is a JSON or YAML file validated against :class:`MappingSpec`, or a
preset name (``hf-vllm``, ``identity``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...config import compile_pattern
from ...errors import ConfigError
from ...formats import Run

__all__ = [
    "RenameRule",
    "SplitRule",
    "CombineRule",
    "ShardRule",
    "MappingSpec",
    "PRESETS",
    "HF_VLLM",
    "load_mapping",
    "detect_preset",
]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RenameRule(_Rule):
    pattern: str
    replace: str


class SplitRule(_Rule):
    """Cut a module's primary output along ``dim`` into parts named by ``into`` (``re.sub`` templates)."""

    pattern: str
    into: list[str]
    sizes: Literal["qkv", "halves"] | list[int]
    dim: int = -1


class CombineRule(_Rule):
    """Replace a module's tensor outputs by their sum (vLLM ``(hidden, residual)`` -> HF hidden)."""

    pattern: str
    op: Literal["sum"] = "sum"


class ShardRule(_Rule):
    """How a module's per-rank tensors make the whole one, for layers whose run did not record it."""

    pattern: str
    how: Literal["concat", "sum", "replicated"]
    dim: int = -1


class MappingSpec(_Rule):
    """How to bring two runs' modules and tensors onto common names and layouts."""

    name: str = "custom"
    rename: list[RenameRule] = Field(default_factory=list)
    split: list[SplitRule] = Field(default_factory=list)
    combine: list[CombineRule] = Field(default_factory=list)
    shard: list[ShardRule] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=list)
    outputs_only: bool = False
    """Compare each module's primary output only (inputs differ in form across frameworks)."""


# The Llama family (Llama, Mistral, Qwen2, Qwen3) as HF transformers and vLLM name and shape it.
HF_VLLM = MappingSpec(
    name="hf-vllm",
    rename=[RenameRule(pattern=r"^logits_processor$", replace="lm_head")],
    split=[
        SplitRule(pattern=r"^(.*)\.qkv_proj$", into=[r"\1.q_proj", r"\1.k_proj", r"\1.v_proj"], sizes="qkv"),
        SplitRule(pattern=r"^(.*)\.gate_up_proj$", into=[r"\1.gate_proj", r"\1.up_proj"], sizes="halves"),
    ],
    combine=[CombineRule(pattern=r"^model\.layers\.\d+$")],
    # Same name, different quantity: HF act_fn is silu(gate), vLLM's is silu(gate)*up; HF rotary_emb
    # returns (cos, sin), vLLM's rotates q and k. vLLM's attn (the attention kernel) has no HF counterpart.
    ignore=[r"(^|\.)act_fn$", r"(^|\.)rotary_emb(_\d+)?$", r"\.attn$"],
    outputs_only=True,
)
PRESETS: dict[str, MappingSpec] = {"hf-vllm": HF_VLLM, "identity": MappingSpec(name="identity")}


def load_mapping(spec: str | Path | MappingSpec | dict[str, Any]) -> MappingSpec:
    """A preset name (``hf-vllm``), a JSON/YAML file, or a dict, validated.

    Raises:
        ConfigError: not a preset nor a readable file, or a spec that does not validate.
    """
    if isinstance(spec, MappingSpec):
        return spec
    if isinstance(spec, dict):
        data: Any = spec
    elif str(spec) in PRESETS:
        return PRESETS[str(spec)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"mapping {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor a mapping file")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:
            raise ConfigError(f"cannot parse mapping {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        spec_obj = MappingSpec.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid mapping: {problems}") from None
    rules: list[RenameRule | SplitRule | CombineRule | ShardRule] = [
        *spec_obj.rename,
        *spec_obj.split,
        *spec_obj.combine,
        *spec_obj.shard,
    ]
    for pattern in [*(r.pattern for r in rules), *spec_obj.ignore]:
        try:
            compile_pattern(pattern)
        except ValueError as err:
            raise ConfigError(f"invalid mapping: {err}") from None
    return spec_obj


def detect_preset(run1: Run, run2: Run) -> MappingSpec | None:
    """``hf-vllm`` when one run comes from HF transformers and the other from vLLM."""
    kinds = {run1.manifest.framework, run2.manifest.framework}
    return HF_VLLM if kinds == {"transformers", "vllm"} else None
