"""Aligning two runs whose names, layouts or sharding differ, before comparing them.

Alignment turns each run into a *virtual* run of the same reader objects, so
the ordinary compare (pairing, metrics, first divergence) works unchanged:

1. **Ranks**: a tensor-parallel run's per-rank tensors are reassembled into one:
   equal on every rank -> replicated; else concatenated along the last dim when
   that gives the other run's shape, summed when each shard already has it
   (partial results). ``shard`` rules in a mapping override the guess.
2. **Names**: ``rename``, ``split`` (a fused module's output cut into named
   parts, e.g. vLLM ``qkv_proj`` -> HF ``q_proj``/``k_proj``/``v_proj`` by head
   counts) and ``combine`` (e.g. vLLM's ``(hidden, residual)`` decoder-layer
   output summed to HF's single output). ``ignore`` lists modules with no
   counterpart; they are reported, never counted as mismatches.
3. **Tokens**: when both runs recorded each step's requests, token counts and
   start positions, activations are re-keyed by (request, position): HF's
   ``[batch, seq, ...]`` and vLLM's flattened ``[num_tokens, ...]`` then meet
   row by row, whichever steps the scheduler put each token in.

A mapping is a JSON or YAML file (schema: :class:`MappingSpec`), or a preset name.
"""

from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...config import ConfigError
from ...formats.tensorlog import ModuleCall, Run, Step, TensorRecord

__all__ = ["MappingSpec", "PRESETS", "load_mapping", "align_runs", "detect_preset"]


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
    # returns (cos, sin), vLLM's rotates q and k. vLLM's attn and HF's LlamaModel have no counterpart.
    ignore=[r"(^|\.)act_fn$", r"(^|\.)rotary_emb(_\d+)?$", r"\.attn$", r"^model$"],
    outputs_only=True,
)
PRESETS: dict[str, MappingSpec] = {"hf-vllm": HF_VLLM, "identity": MappingSpec(name="identity")}


def load_mapping(spec: str | Path | MappingSpec | dict[str, Any]) -> MappingSpec:
    """A preset name (``hf-vllm``), a JSON/YAML file, or a dict, validated."""
    if isinstance(spec, MappingSpec):
        return spec
    if isinstance(spec, dict):
        data: Any = spec
    elif str(spec) in PRESETS:
        return PRESETS[str(spec)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--map: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a mapping file")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:
            raise ConfigError(f"cannot parse mapping {path}: {e}") from None
    try:
        spec_obj = MappingSpec.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid mapping: {problems}") from None
    for rule in [*spec_obj.rename, *spec_obj.split, *spec_obj.combine, *spec_obj.shard]:
        try:
            re.compile(rule.pattern)
        except re.error as err:
            raise ConfigError(f"invalid mapping: pattern {rule.pattern!r} does not compile: {err}") from None
    return spec_obj


def detect_preset(run1: Run, run2: Run) -> MappingSpec | None:
    """``hf-vllm`` when one run comes from HF transformers and the other from vLLM."""
    kinds = {run1.manifest.get("framework"), run2.manifest.get("framework")}
    return HF_VLLM if kinds == {"transformers", "vllm"} else None


# -- tensors as lazy, cached functions ----------------------------------------------------


class _Cache:
    """Keeps the few most recently loaded tensors: alignment reads one tensor for many rows."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.data: OrderedDict[Any, torch.Tensor] = OrderedDict()

    def get(self, key: Any, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        t = load()
        self.data[key] = t
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return t


_Loader = Callable[[], torch.Tensor]


def _primary(call: ModuleCall) -> list[TensorRecord]:
    return [t for t in call.outputs if t.is_tensor]


def _split_sizes(rule: SplitRule, width: int, dims: dict[str, Any], tp: int) -> list[int]:
    if isinstance(rule.sizes, list):
        return [s // tp for s in rule.sizes] if sum(rule.sizes) != width else list(rule.sizes)
    if rule.sizes == "halves":
        return [width // 2, width - width // 2]
    heads, kv, hd = dims.get("num_attention_heads"), dims.get("num_key_value_heads"), dims.get("head_dim")
    if not (heads and kv and hd):
        raise ValueError("splitting qkv needs num_attention_heads, num_key_value_heads and head_dim in run.json")
    q, k = heads * hd, kv * hd
    total = q + 2 * k
    if width == total:
        return [q, k, k]
    if tp > 1 and width * tp == total:
        return [q // tp, k // tp, k // tp]
    raise ValueError(f"qkv width {width} fits neither {total} nor a 1/{tp} shard of it")


@dataclass
class _Entry:
    """One (module, tensor) of a virtual call: per-rank loaders and the rules that made it.

    ``base_name`` (the tensor's name without a rank suffix) and ``records`` are set when every
    tensor of a call is compared; a module's primary output alone has neither.
    """

    kind: str
    key: str | None
    ranks: list[_Loader]
    rules: list[str]
    base_name: str | None = None
    records: list[TensorRecord] = field(default_factory=list)

    @property
    def ident(self) -> str:
        return self.base_name or "primary"

    @property
    def tensor_name(self) -> str:
        return self.base_name or "outputs"


def _module_entries(call_group: list[ModuleCall], spec: MappingSpec, dims: dict[str, Any], tp: int, cache: _Cache) -> dict[str, list[_Entry]]:
    """Canonical module name -> entries, for one module call on every rank."""
    ref = call_group[0]
    name = ref.dirname
    rules: list[str] = []
    for r in spec.rename:
        new = re.sub(r.pattern, r.replace, name)
        if new != name:
            rules.append(f"rename {name} -> {new}")
            name = new

    def loader(rec: TensorRecord) -> _Loader:
        return lambda: cache.get(id(rec), rec.load)

    if not spec.outputs_only:
        out: list[_Entry] = []
        by_key: dict[tuple[str, str | None, str], list[TensorRecord]] = {}
        for c in call_group:
            for t in c.tensors:
                by_key.setdefault((t.kind, t.key, _strip_rank(t.name)), []).append(t)
        for (kind, key, base), recs in by_key.items():
            out.append(_Entry(kind, key, [loader(r) for r in recs], list(rules), base_name=base, records=recs))
        return {name: out}

    per_rank = [_primary(c) for c in call_group]
    if not per_rank[0]:
        return {}
    for rule in spec.combine:
        if re.search(rule.pattern, ref.dirname) and len(per_rank[0]) > 1:
            def summed(recs: list[TensorRecord]) -> _Loader:
                def load() -> torch.Tensor:
                    parts = [cache.get(id(r), r.load) for r in recs]
                    return functools.reduce(torch.add, [p.double() for p in parts]).to(parts[0].dtype)
                return load
            return {name: [_Entry("outputs", None, [summed(recs) for recs in per_rank], rules + [f"sum of {len(per_rank[0])} outputs"])]}
    for rule in spec.split:
        if re.search(rule.pattern, ref.dirname):
            out_map: dict[str, list[_Entry]] = {}
            for i, template in enumerate(rule.into):
                part = re.sub(rule.pattern, template, ref.dirname)

                def piece(rec: TensorRecord, i: int = i, rule: SplitRule = rule) -> _Loader:
                    def load() -> torch.Tensor:
                        t = cache.get(id(rec), rec.load)
                        sizes = _split_sizes(rule, t.shape[rule.dim], dims, tp)
                        return torch.split(t, sizes, dim=rule.dim)[i]
                    return load

                out_map[part] = [_Entry("outputs", None, [piece(recs[0]) for recs in per_rank], rules + [f"split {ref.dirname} ({rule.sizes}) -> part {i}"])]
            return out_map
    return {name: [_Entry("outputs", None, [loader(recs[0]) for recs in per_rank], rules)]}


def _strip_rank(name: str) -> str:
    return re.sub(r"_rank\d+$", "", name)


def _merge_ranks(parts: list[torch.Tensor], other: torch.Tensor | None, rule: ShardRule | None) -> tuple[torch.Tensor, str]:
    if len(parts) == 1:
        return parts[0], ""
    how = rule.how if rule else None
    dim = rule.dim if rule else -1
    if how is None:
        if all(p.shape == parts[0].shape and torch.equal(p, parts[0]) for p in parts[1:]):
            how = "replicated"
        elif other is not None and other.dim() == parts[0].dim() and other.shape[dim] == sum(p.shape[dim] for p in parts):
            how = "concat"
        elif other is not None and other.shape == parts[0].shape:
            how = "sum"
        else:
            how = "concat"
    if how == "replicated":
        return parts[0], f"{len(parts)} ranks: replicated"
    if how == "sum":
        return functools.reduce(torch.add, [p.double() for p in parts]).to(parts[0].dtype), f"{len(parts)} ranks: partial sums added"
    return torch.cat(parts, dim=dim), f"{len(parts)} ranks: shards concatenated along dim {dim}"


# -- tokens -------------------------------------------------------------------------------


def _req_keys(run1: Run, run2: Run) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """Request id -> a key shared by both runs (vLLM adds a random suffix; HF rows are 0, 1, ...)."""

    def norm(r: str) -> str:
        return re.sub(r"-[0-9a-f]{8}$", "", str(r))

    def ids(run: Run) -> list[str]:
        seen: dict[str, None] = {}
        for _, info in sorted(_steps_info(run).items()):
            for r in info.get("req_ids", []):
                seen.setdefault(norm(r), None)
        return list(seen)

    a, b = ids(run1), ids(run2)
    if set(a) & set(b):
        return norm, norm
    order_a = {r: str(i) for i, r in enumerate(a)}
    order_b = {r: str(i) for i, r in enumerate(b)}
    return (lambda r: order_a.get(norm(r), norm(r))), (lambda r: order_b.get(norm(r), norm(r)))


def _steps_info(run: Run) -> dict[int, dict[str, Any]]:
    steps = run.manifest.get("steps") or {}
    return {int(k): v for k, v in steps.items() if isinstance(v, dict) and v.get("req_ids")}


def _rows(t: torch.Tensor, info: dict[str, Any], req_key: Callable[[str], str]) -> dict[tuple[str, int], torch.Tensor] | None:
    """(request, position) -> row, or None when the tensor is not laid out by tokens."""
    reqs, nums = info["req_ids"], info["num_tokens"]
    starts = info.get("start_positions") or [0] * len(reqs)
    out: dict[tuple[str, int], torch.Tensor] = {}
    if info.get("layout") == "batch_major":
        if t.dim() < 2 or t.shape[0] != len(reqs) or t.shape[1] > max(nums):
            return None
        for b, (r, n, s) in enumerate(zip(reqs, nums, starts)):
            width = t.shape[1]
            for j in range(width):
                out[(req_key(r), s + n - width + j)] = t[b, j]
        return out
    if t.dim() < 1:
        return None
    if t.shape[0] == sum(nums):
        row = 0
        for r, n, s in zip(reqs, nums, starts):
            for j in range(n):
                out[(req_key(r), s + j)] = t[row]
                row += 1
        return out
    if t.shape[0] == len(reqs):  # one row per request: its last scheduled token (logits)
        for i, (r, n, s) in enumerate(zip(reqs, nums, starts)):
            out[(req_key(r), s + n - 1)] = t[i]
        return out
    return None


# -- building the virtual runs ---------------------------------------------------------------


def _group_calls(step: Step) -> list[list[ModuleCall]]:
    groups: dict[str, list[ModuleCall]] = {}
    for c in step.by_completion():
        groups.setdefault(c.dirname, []).append(c)
    return [sorted(g, key=lambda c: c.rank or 0) for g in groups.values()]


def _tp_size(run: Run) -> int:
    return int(run.manifest.get("tp_size") or run.manifest.get("world_size") or 1)


def align_runs(run1: Run, run2: Run, spec: MappingSpec) -> tuple[Run, Run, list[str]]:
    """Two virtual runs on common module names, tensor names and token layout, and notes."""
    cache = _Cache()
    ignore = [re.compile(p) for p in spec.ignore]
    notes: list[str] = [f"aligned with mapping {spec.name!r}"]
    ignored: set[str] = set()

    def canon(run: Run) -> dict[int, list[tuple[str, ModuleCall, list[_Entry]]]]:
        dims = run.manifest.get("model_dims") or {}
        tp = _tp_size(run)
        out: dict[int, list[tuple[str, ModuleCall, list[_Entry]]]] = {}
        for index, step in run.steps.items():
            rows = []
            for group in _group_calls(step):
                if any(p.search(group[0].dirname) for p in ignore):
                    ignored.add(group[0].dirname)
                    continue
                for name, entries in _module_entries(group, spec, dims, tp, cache).items():
                    rows.append((name, group[0], entries))
            out[index] = rows
        return out

    c1, c2 = canon(run1), canon(run2)
    if ignored:
        notes.append("no counterpart by design, not compared: " + ", ".join(sorted(ignored)))
    info1, info2 = _steps_info(run1), _steps_info(run2)
    by_tokens = bool(info1) and bool(info2)
    if by_tokens:
        notes.append("tensors aligned by request and token position (the runs' step boundaries may differ)")
    key1, key2 = _req_keys(run1, run2) if by_tokens else (str, str)
    shard_rules = spec.shard

    def shard_rule(name: str) -> ShardRule | None:
        return next((r for r in shard_rules if re.search(r.pattern, name)), None)

    # run2's entries by canonical (module, tensor) across all steps, for token lookup
    index2: dict[tuple[str, str, str | None], list[tuple[int, _Entry]]] = {}
    for s, rows in c2.items():
        for name, _, entries in rows:
            for e in entries:
                index2.setdefault((name, e.kind, e.ident), []).append((s, e))

    steps1: dict[int, Step] = {}
    steps2: dict[int, Step] = {}
    for s, rows in c1.items():
        calls1, calls2 = [], []
        for name, src, entries in rows:
            v1 = ModuleCall(step=s, dirname=name, module=name, cls=src.cls, seq_start=src.seq_start, seq_end=src.seq_end, position=src.position)
            v2 = ModuleCall(step=s, dirname=name, module=name, cls=src.cls, seq_start=src.seq_start, seq_end=src.seq_end, position=src.position)
            for e in entries:
                matches = index2.get((name, e.kind, e.ident), [])
                if not by_tokens:
                    matches = [(s2, e2) for s2, e2 in matches if s2 == s]
                if not matches:
                    v1.outputs.append(_virtual(e, name, e.tensor_name, lambda e=e: _merge_ranks([f() for f in e.ranks], None, shard_rule(name))[0], e.rules))
                    continue
                make = _token_pair if by_tokens else _step_pair
                rec1, rec2 = make(e, matches, name, s, info1, info2, key1, key2, shard_rule(name))
                getattr(v1, e.kind).append(rec1)
                getattr(v2, e.kind).append(rec2)
            calls1.append(v1)
            if v2.tensors:
                calls2.append(v2)
        steps1[s] = Step(index=s, calls=calls1)
        steps2[s] = Step(index=s, calls=calls2)
    # modules of run2 with no counterpart in run1 at all
    names1 = {name for rows in c1.values() for name, _, _ in rows}
    for s, rows in c2.items():
        for name, src, entries in rows:
            if name not in names1 and s in steps2:
                v = ModuleCall(step=s, dirname=name, module=name, cls=src.cls, position=10**6 + src.position)
                for e in entries:
                    getattr(v, e.kind).append(_virtual(e, name, e.tensor_name, lambda e=e: e.ranks[0](), e.rules))
                steps2[s].calls.append(v)
    v1 = Run(path=run1.path, manifest=run1.manifest, steps=steps1, layout=run1.layout, problems=run1.problems)
    v2 = Run(path=run2.path, manifest=run2.manifest, steps=steps2, layout=run2.layout, problems=run2.problems)
    return v1, v2, notes


def _virtual(e: _Entry, module: str, name: str, load: _Loader, rules: list[str], extra: dict[str, Any] | None = None) -> TensorRecord:
    first = e.records[0] if e.records else None
    meta: dict[str, Any] = {"kind": "tensor", "_loader": load, "mapping": "; ".join(rules) or None}
    if first is not None:
        meta.update({k: v for k, v in first.meta.items() if k in ("kind", "type", "value", "class")})
        if not first.is_tensor:
            meta.pop("_loader")
    meta.update(extra or {})
    return TensorRecord(name=name, kind=e.kind, key=e.key, meta=meta)


def _step_pair(e1: _Entry, matches: list[tuple[int, _Entry]], name: str, step: int, info1: Any, info2: Any,
               key1: Any, key2: Any, rule: ShardRule | None) -> tuple[TensorRecord, TensorRecord]:
    e2 = matches[0][1]
    state: dict[str, Any] = {}

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        if "t" not in state:
            p1, p2 = [f() for f in e1.ranks], [f() for f in e2.ranks]
            t1, how1 = _merge_ranks(p1, p2[0] if len(p2) == 1 else None, rule)
            t2, how2 = _merge_ranks(p2, t1, rule)
            state["t"] = (t1, t2)
            for rec, how in ((r1, how1), (r2, how2)):  # say how the shards were put together
                if how:
                    rec.meta["mapping"] = "; ".join(filter(None, [rec.meta.get("mapping"), how]))
        return state["t"]

    r1 = _virtual(e1, name, e1.tensor_name, lambda: both()[0], e1.rules, _shape_meta(e1))
    r2 = _virtual(e2, name, e1.tensor_name, lambda: both()[1], e2.rules, _shape_meta(e2))
    return r1, r2


def _shape_meta(e: _Entry) -> dict[str, Any]:
    recs = e.records
    if len(recs) == 1:
        return {k: recs[0].meta.get(k) for k in ("shape", "dtype") if recs[0].meta.get(k) is not None}
    return {}


def _token_pair(e1: _Entry, matches: list[tuple[int, _Entry]], name: str, step: int, info1: dict[int, Any], info2: dict[int, Any],
                key1: Callable[[str], str], key2: Callable[[str], str], rule: ShardRule | None) -> tuple[TensorRecord, TensorRecord]:
    state: dict[str, Any] = {}

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        if "t" in state:
            return state["t"]
        t1, _ = _merge_ranks([f() for f in e1.ranks], None, rule)
        rows1 = _rows(t1, info1[step], key1) if step in info1 else None
        if rows1 is None:
            raise ValueError(f"{name}: run 1's tensor {tuple(t1.shape)} is not laid out by tokens")
        rows2: dict[tuple[str, int], torch.Tensor] = {}
        for s2, e2 in matches:
            if s2 not in info2:
                continue
            parts = [f() for f in e2.ranks]
            t2, _ = _merge_ranks(parts, t1 if t1.dim() == parts[0].dim() else None, rule)
            r = _rows(t2, info2[s2], key2)
            if r:
                rows2.update(r)
        common = [k for k in rows1 if k in rows2]
        if not common:
            raise ValueError(f"{name}: no (request, position) of run 1's step {step} is in run 2")
        a = torch.stack([rows1[k] for k in common])
        b = torch.stack([rows2[k] for k in common])
        state["t"] = (a, b)
        state["missing"] = len(rows1) - len(common)
        return state["t"]

    r1 = _virtual(e1, name, e1.tensor_name, lambda: both()[0], e1.rules)
    r2 = _virtual(matches[0][1], name, e1.tensor_name, lambda: both()[1], matches[0][1].rules + ["rows gathered by (request, position)"])
    return r1, r2
