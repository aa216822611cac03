"""Aligning two runs into two *virtual* runs of the same reader objects, which the ordinary compare then pairs.

1. **Names**: ``rename``; ``split`` (a fused module's output cut into named
   parts, e.g. vLLM ``qkv_proj`` into HF ``q_proj``/``k_proj``/``v_proj``);
   ``combine`` (vLLM's ``(hidden, residual)`` summed into HF's single output);
   ``ignore`` for modules with no counterpart (reported, never counted).
2. **Ranks**: a tensor-parallel run's per-rank tensors are made whole by the
   layout each layer recorded (:mod:`.shards`); replicated ones are compared
   rank by rank.
3. **Tokens**: when both runs recorded their steps' request layouts, rows are
   matched by (request, position) (:mod:`.tokens`).

Every virtual tensor names the rules that made it (its ``mapping``), and adds
what it found while loading (how ranks merged, ranks that disagree).
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...config import compile_pattern
from ...errors import AlignmentError
from ...formats.model import DerivedSource, ModuleCall, Run, Step, TensorRecord
from ...schema.records import ShardLayout, StepInfo, TensorEntry
from .requests import RequestReport, id_keys, match_requests, request_table, unmatched_reason
from .shards import DISAGREE, ShardPlan, disagreement, merge, plan_for
from .spec import MappingSpec, ShardRule, SplitRule
from .tokens import TokenIndex, rows_by_token, step_tokens, steps_info, token_rows

__all__ = ["align_runs", "Alignment", "token_plan", "Tokens", "same_schedule", "RowsMissing"]

_Loader = Callable[[], torch.Tensor]


class _Cache:
    """The few most recently loaded or made tensors, for the whole alignment: one tensor serves many rows,
    and nothing else holds a loaded tensor, so memory and memory maps stay bounded however long the runs."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        t = load()
        self.data[key] = t
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return t


@dataclass
class _Entry:
    """One (module, tensor) of a virtual call: a loader per rank (None where a rank has no tensor), its plan."""

    kind: str
    key: str | None
    ranks: list[_Loader | None]
    rules: list[str]
    plan: ShardPlan
    base_name: str | None = None
    records: list[TensorRecord] = field(default_factory=list)

    @property
    def ident(self) -> str:
        return self.base_name or "primary"

    @property
    def tensor_name(self) -> str:
        return self.base_name or "outputs"


def _strip_rank(name: str) -> str:
    return re.sub(r"_rank\d+$", "", name)


def _split_sizes(rule: SplitRule, width: int, dims: dict[str, Any], tp: int) -> list[int]:
    if isinstance(rule.sizes, list):
        return [s // tp for s in rule.sizes] if sum(rule.sizes) != width else list(rule.sizes)
    if rule.sizes == "halves":
        return [width // 2, width - width // 2]
    heads, kv, hd = dims.get("num_attention_heads"), dims.get("num_key_value_heads"), dims.get("head_dim")
    if not (heads and kv and hd):
        raise AlignmentError("splitting qkv needs num_attention_heads, num_key_value_heads and head_dim in run.json")
    q, k = heads * hd, kv * hd
    if width == q + 2 * k:
        return [q, k, k]
    if tp > 1 and width * tp == q + 2 * k:
        return [q // tp, k // tp, k // tp]
    raise AlignmentError(f"qkv width {width} fits neither {q + 2 * k} nor a 1/{tp} shard of it")


class _Side:
    """One run, as alignment sees it: its calls grouped across ranks, its layouts, its sizes."""

    def __init__(self, run: Run, spec: MappingSpec, cache: _Cache, ignored: set[str]) -> None:
        self.run = run
        self.spec = spec
        self.cache = cache
        self.dims = run.manifest.model_dims.model_dump() if run.manifest.model_dims is not None else {}
        self.tp = int(run.manifest.tp_size or run.manifest.world_size or 1)
        self.layouts: dict[str, ShardLayout] = dict(run.manifest.shard_layouts)
        self.ignore = [compile_pattern(p) for p in spec.ignore]
        self.ignored = ignored

    def rule(self, name: str) -> ShardRule | None:
        return next((r for r in self.spec.shard if re.search(r.pattern, name)), None)

    def loader(self, rec: TensorRecord | None) -> _Loader | None:
        if rec is None or not rec.is_tensor:
            return None
        if not rec.has_data:
            return _no_data  # statistics or a checksum: of a whole step's batch, not of rows that can be realigned
        return lambda: self.cache.get(id(rec), rec.load)

    def rows(self) -> dict[int, list[tuple[str, ModuleCall, list[_Entry]]]]:
        out: dict[int, list[tuple[str, ModuleCall, list[_Entry]]]] = {}
        for index, step in self.run.steps.items():
            rows = []
            for group in _group_calls(step):
                if any(p.search(group[0].dirname) for p in self.ignore):
                    self.ignored.add(group[0].dirname)
                    continue
                for name, entries in self.entries(group).items():
                    rows.append((name, group[0], entries))
            out[index] = rows
        return out

    def entries(self, group: list[ModuleCall]) -> dict[str, list[_Entry]]:
        """Canonical module name -> entries, for one module call on every rank."""
        ref = group[0]
        name = ref.dirname
        rules: list[str] = []
        for rename in self.spec.rename:
            new = re.sub(rename.pattern, rename.replace, name)
            if new != name:
                rules.append(f"rename {name} -> {new}")
                name = new
        layout = self.layouts.get(ref.module)
        if not self.spec.outputs_only:
            by_key: dict[tuple[str, str | None, str], list[TensorRecord | None]] = {}
            for rank, c in enumerate(group):
                for t in c.tensors:
                    slot = by_key.setdefault((t.kind, t.key, _strip_rank(t.name)), [None] * len(group))
                    slot[rank] = t
            out = []
            for (kind, key, base), recs in by_key.items():
                plan = plan_for(layout, self.rule(ref.dirname), kind)
                present = [r for r in recs if r is not None]
                out.append(_Entry(kind, key, [self.loader(r) for r in recs], list(rules), plan, base, present))
            return {name: out}
        per_rank = [[t for t in c.outputs if t.is_tensor] for c in group]
        if not any(per_rank):
            return {}
        plan = plan_for(layout, self.rule(ref.dirname), "outputs")
        for combine in self.spec.combine:
            if re.search(combine.pattern, ref.dirname) and max(len(p) for p in per_rank) > 1:
                summed = [self._summed(recs) if recs else None for recs in per_rank]
                return {name: [_Entry("outputs", None, summed, rules + [f"sum of {len(per_rank[0])} outputs"], plan)]}
        for split in self.spec.split:
            if re.search(split.pattern, ref.dirname):
                return self._split(ref, split, per_rank, layout, rules)
        return {
            name: [
                _Entry(
                    "outputs",
                    None,
                    [self.loader(recs[0]) if recs else None for recs in per_rank],
                    rules,
                    plan,
                    records=[recs[0] for recs in per_rank if recs],
                )
            ]
        }

    def _summed(self, recs: list[TensorRecord]) -> _Loader:
        def load() -> torch.Tensor:
            parts = [self.cache.get(id(r), r.load) for r in recs]
            return functools.reduce(torch.add, [p.double() for p in parts]).to(parts[0].dtype)

        return load

    def _split(
        self, ref: ModuleCall, rule: SplitRule, per_rank: list[list[TensorRecord]], layout: ShardLayout | None, rules: list[str]
    ) -> dict[str, list[_Entry]]:
        out: dict[str, list[_Entry]] = {}
        for i, template in enumerate(rule.into):
            part = re.sub(rule.pattern, template, ref.dirname)
            stride = (layout.replicas or [1] * len(rule.into))[i] if layout and layout.replicas else 1
            source = (
                (f"recorded: {layout.layer}, part {i}" + (f", one in {stride} ranks" if stride > 1 else ""))
                if layout
                else "per part; no recorded layout"
            )
            plan = ShardPlan("concat", rule.dim, source=source)

            def piece(rec: TensorRecord, i: int = i) -> _Loader:
                def load() -> torch.Tensor:
                    t = self.cache.get(id(rec), rec.load)
                    sizes = (
                        list(layout.parts)
                        if layout and layout.parts
                        else _split_sizes(rule, t.shape[rule.dim], self.dims, self.tp)
                    )
                    return torch.split(t, sizes, dim=rule.dim)[i]

                return load

            loaders = [piece(recs[0]) if recs else None for r, recs in enumerate(per_rank) if r % stride == 0]
            out[part] = [_Entry("outputs", None, loaders, rules + [f"split {ref.dirname} ({rule.sizes}) -> part {i}"], plan)]
        return out


def _no_data() -> torch.Tensor:
    raise AlignmentError(
        "no tensor data (a statistics or checksum run): statistics cover a whole step's batch or shard, so they "
        "compare only between runs of the same schedule and world size"
    )


def _group_calls(step: Step) -> list[list[ModuleCall]]:
    groups: dict[str, list[ModuleCall]] = {}
    for c in step.by_completion():
        groups.setdefault(c.dirname, []).append(c)
    return [sorted(g, key=lambda c: c.rank or 0) for g in groups.values()]


# -- one tensor of one module, on each side ---------------------------------------------------------


class _Whole:
    """Lazily makes an entry's tensor whole (or one rank's copy), recording how into ``notes``, and into
    ``faults`` what makes the pair a mismatch whatever its values (ranks whose copies disagree)."""

    def __init__(self, e: _Entry) -> None:
        self.e = e
        self.notes: dict[str, list[str]] = {}
        self.faults: dict[str, list[str]] = {}

    def variants(self) -> list[str]:
        """``[""]``, or one suffix per rank for a replicated tensor: each copy is compared on its own."""
        tensor = not self.e.records or self.e.records[0].is_tensor
        if tensor and len(self.e.ranks) > 1 and self.e.plan.how == "replicated":
            return [f"@rank{r}" for r in range(len(self.e.ranks))]
        return [""]

    def get(self, variant: str, other: Callable[[], torch.Tensor | None], *, tokens: bool = False) -> torch.Tensor:
        notes = self.notes.setdefault(variant, [])
        parts = [f() if f is not None else None for f in self.e.ranks]
        if variant:
            r = int(variant.removeprefix("@rank"))
            t = parts[r]
            if t is None:
                raise AlignmentError(f"rank {r} holds no tensor")
            if not notes:
                notes.append(self.e.plan.describe(len(parts)))
                if r:
                    base = parts[0]
                    if base is None or base.shape != t.shape or not torch.equal(base, t):
                        _, worst = disagreement([base, t]) if base is not None else (r, float("inf"))
                        notes.append(f"{DISAGREE}: rank {r}'s copy differs from rank 0's by max abs {worst:.3g}")
                    else:
                        notes.append(f"rank {r}'s copy equals rank 0's")
            return t
        t, how = merge(parts, self.e.plan, other(), tokens=tokens)
        if how and not notes:
            notes.append(how)
            if DISAGREE in how:
                self.faults.setdefault(variant, []).append(how[how.index(DISAGREE) :].split(";")[0])
        return t


def _nothing() -> torch.Tensor | None:
    return None


def _record(
    e: _Entry, name: str, load: _Loader, rules: list[str], w: _Whole, variant: str, meta: dict[str, Any], *, whole: bool = False
) -> TensorRecord:
    first = e.records[0] if e.records else None
    # a value, or statistics or a checksum of one whole tensor of a step that pairs whole: compared as recorded
    as_recorded = first is not None and (
        not first.is_tensor or (whole and not first.has_data and len(e.ranks) == 1 and not variant)
    )
    if as_recorded:
        assert first is not None
        return TensorRecord(entry=first.entry.model_copy(update={"name": name}), mapping="; ".join(rules) or None)
    entry = TensorEntry(name=name, kind=e.kind, key=e.key, **meta)  # type: ignore[arg-type]
    source = DerivedSource(load, w.notes.setdefault(variant, []), w.faults.setdefault(variant, []))
    return TensorRecord(entry=entry, source=source, mapping="; ".join(rules) or None)


def _shape_meta(e: _Entry) -> dict[str, Any]:
    if len(e.ranks) == 1 and len(e.records) == 1:
        return {k: getattr(e.records[0].entry, k) for k in ("shape", "dtype") if getattr(e.records[0].entry, k) is not None}
    return {}


def _pairs(s1: list[str], s2: list[str]) -> list[tuple[str, str]]:
    """Every copy of each side is judged: against the other side's one tensor, its own rank's copy, or its first."""
    if len(s1) == 1:
        return [(s1[0], v) for v in s2]
    if len(s1) == len(s2):
        return list(zip(s1, s2))
    if len(s2) == 1:
        return [(v, s2[0]) for v in s1]
    return [(v, s2[0]) for v in s1] + [(s1[0], v) for v in s2[1:]]


class _Both:
    """One tensor pair, made whole lazily and once: the side with fewer ranks first, as the other's reference."""

    def __init__(self, w1: _Whole, w2: _Whole, tokens: bool, cache: _Cache) -> None:
        self.sides = {1: w1, 2: w2}
        self.tokens = tokens
        self.cache = cache

    def get(self, side: int, variant: str) -> torch.Tensor:
        me, them = self.sides[side], self.sides[3 - side]
        if len(me.e.ranks) <= len(them.e.ranks):
            ref: Callable[[], torch.Tensor | None] = lambda: None  # noqa: E731
        else:
            ref = lambda: self.get(3 - side, them.variants()[0])  # noqa: E731
        return self.cache.get((id(self), side, variant), lambda: me.get(variant, ref, tokens=self.tokens))


def _step_pairs(e1: _Entry, e2: _Entry, cache: _Cache) -> list[tuple[TensorRecord, TensorRecord]]:
    w1, w2 = _Whole(e1), _Whole(e2)
    both = _Both(w1, w2, tokens=False, cache=cache)
    out = []
    for v1, v2 in _pairs(w1.variants(), w2.variants()):
        name = e1.tensor_name + (v1 or v2)
        meta1, meta2 = (_shape_meta(e1) if not v1 else {}), (_shape_meta(e2) if not v2 else {})
        r1 = _record(e1, name, functools.partial(both.get, 1, v1), e1.rules, w1, v1, meta1, whole=True)
        r2 = _record(e2, name, functools.partial(both.get, 2, v2), e2.rules, w2, v2, meta2, whole=True)
        out.append((r1, r2))
    return out


class RowsMissing(AlignmentError):
    """Run 2 has no rows of this tensor for (some of) run 1's tokens: the tensor is on run 1's side only there."""


@dataclass
class Tokens:
    """How the two runs' rows meet: request keys shared by both runs, and where run 2 computed each token."""

    info1: dict[int, StepInfo]
    info2: dict[int, StepInfo]
    key1: Callable[[str], str]
    key2: Callable[[str], str]
    index2: TokenIndex
    report: RequestReport

    def same_step(self, step: int) -> bool:
        """Both runs' step ``step`` holds the same tokens of the same requests in the same order (then its tensors,
        and statistics or checksums of whole tensors, pair as they are)."""
        a, b = self.info1.get(step), self.info2.get(step)
        if a is None or b is None or (a.layout, a.width) != (b.layout, b.width):
            return False  # another padding width lays the same tokens out in other rows
        return step_tokens(a, self.key1) == step_tokens(b, self.key2)


def token_plan(run1: Run, run2: Run) -> Tokens | None:
    """Pair the runs' requests (by prompt where both recorded prompts, else by id); None when a run has no layout."""
    info1, info2 = steps_info(run1), steps_info(run2)
    if not info1 or not info2:
        return None
    t1, t2 = request_table(run1), request_table(run2)
    why = unmatched_reason(t1, t2)
    key1: Callable[[str], str]
    key2: Callable[[str], str]
    if why is None:
        assert t1 is not None and t2 is not None
        key1, key2, report = t1.key, t2.key, match_requests(t1, t2)
    else:
        key1, key2 = id_keys(run1, run2)
        report = RequestReport(how="id", why=f"{why}: requests paired by their ids, which engines reuse")
    tokens = Tokens(info1, info2, key1, key2, TokenIndex(info2, key2), report)
    same = set(info1) == set(info2) and all(tokens.same_step(s) for s in info1)
    tokens.report = report.model_copy(update={"rebatched": not same})
    return tokens


def same_schedule(tokens: Tokens | None) -> bool:
    """Both runs put the same tokens of the same requests (paired by prompt) into the same steps, in the same order,
    and requests pair one to one: pairing by step is then pairing by token."""
    if tokens is None or tokens.report.how != "prompt" or tokens.report.only_in_1 or tokens.report.only_in_2:
        return False
    return not tokens.report.rebatched


class _Rows:
    """Run 1's rows of one tensor in one step against run 2's rows of the same tokens, from whichever steps hold them.

    Only the tokens both runs computed are compared; the others are counted per request (:mod:`.requests`).
    """

    def __init__(self, w1: _Whole, per_step: list[tuple[int, _Both]], step: int, tokens: Tokens, cache: _Cache) -> None:
        self.w1, self.per_step, self.step, self.t, self.cache = w1, per_step, step, tokens, cache

    def get(self, v1: str, v2: str, side: int) -> torch.Tensor:
        return self.cache.get((id(self), v1, v2), lambda: self._make(v1, v2))[side - 1]

    def _make(self, v1: str, v2: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.t
        t1 = self.per_step[0][1].get(1, v1)
        rows1 = rows_by_token(t1, t.info1[self.step], t.key1)
        if rows1 is None:
            raise AlignmentError(f"run 1's tensor {tuple(t1.shape)} is not laid out by tokens")
        rows2: dict[tuple[str, int], torch.Tensor] = {}
        every_token = True  # run 2's tensors have a row for every token they computed
        for s2, pair in self.per_step:
            w2 = pair.sides[2]
            found = token_rows(pair.get(2, v2 if v2 in w2.variants() else w2.variants()[0]), t.info2[s2], t.key2)
            if found is None:
                every_token = False
                continue
            every_token &= found[1]
            for k, row in found[0].items():
                rows2.setdefault(k, row)
        common = [k for k in rows1 if k in rows2]
        if not common:
            raise RowsMissing(f"run 2's tensors hold none of these rows (request, position) of run 1's step {self.step}")
        lost = [k for k in rows1 if k not in rows2 and k in t.index2.step_of] if every_token else []
        if lost:  # run 2 computed these tokens, but this tensor of theirs is not there: never a smaller "match"
            where = sorted({t.index2.step_of[k] for k in lost})
            raise RowsMissing(
                f"run 2 computed {len(lost)} of these {len(rows1)} tokens in step(s) {where[:5]}, where this tensor is missing"
            )
        shapes = {tuple(rows1[k].shape) for k in common} | {tuple(rows2[k].shape) for k in common}
        if len(shapes) > 1:
            raise AlignmentError("per-token rows of different shapes: laid out by the batch (a mask, a cache), not by tokens")
        return torch.stack([rows1[k] for k in common]), torch.stack([rows2[k] for k in common])


def _token_pairs(
    e1: _Entry, matches: dict[int, _Entry], step: int, tokens: Tokens, cache: _Cache
) -> list[tuple[TensorRecord, TensorRecord]] | None:
    """Run 1's tensor of one step against the rows of run 2's tensors from the steps that computed the same tokens;
    None when run 2 computed none of this step's tokens."""
    needed = tokens.index2.steps_for(step_tokens(tokens.info1[step], tokens.key1)) if step in tokens.info1 else []
    needed = [s2 for s2 in needed if s2 in matches and s2 in tokens.info2]
    if not needed:
        return None
    w1 = _Whole(e1)
    per_step = [(s2, _Both(w1, _Whole(matches[s2]), tokens=True, cache=cache)) for s2 in needed]
    rows = _Rows(w1, per_step, step, tokens, cache)
    w2 = per_step[0][1].sides[2]
    e2 = matches[needed[0]]
    out = []
    for v1, v2 in _pairs(w1.variants(), w2.variants()):
        name = e1.tensor_name + (v1 or v2)
        r1 = _record(e1, name, functools.partial(rows.get, v1, v2, 1), e1.rules, w1, v1, {})
        rules2 = [*e2.rules, "rows gathered by (request, position)"]
        r2 = _record(e2, name, functools.partial(rows.get, v1, v2, 2), rules2, w2, v2, {})
        out.append((r1, r2))
    return out


@dataclass
class Alignment:
    """Two virtual runs on common module names, tensor names and token layout, and what the alignment found."""

    run1: Run
    run2: Run
    notes: list[str]
    requests: RequestReport | None = None


def _virtual_call(name: str, src: ModuleCall, step: int, position: int | None = None) -> ModuleCall:
    return ModuleCall(
        step=step,
        dirname=name,
        module=name,
        cls=src.cls,
        seq_start=src.seq_start,
        seq_end=src.seq_end,
        position=src.position if position is None else position,
    )


def align_runs(run1: Run, run2: Run, spec: MappingSpec, tokens: Tokens | None = None) -> Alignment:
    """Align two runs by ``spec`` and, where both recorded request layouts, by (request, position) (``tokens``:
    :func:`token_plan` of the two runs, when the caller has it already)."""
    cache = _Cache()
    ignored: set[str] = set()
    c1 = _Side(run1, spec, cache, ignored).rows()
    c2 = _Side(run2, spec, cache, ignored).rows()
    notes: list[str] = [f"aligned with mapping {spec.name!r}"]
    if ignored:
        notes.append("no counterpart by design, not compared: " + ", ".join(sorted(ignored)))
    tokens = tokens or token_plan(run1, run2)
    if tokens is not None:
        notes.append("tensors paired by request and token position; step numbers are run 1's, for orientation only")
    index2: dict[tuple[str, str, str], dict[int, _Entry]] = {}
    for s, rows in c2.items():
        for name, _, entries in rows:
            for e in entries:
                index2.setdefault((name, e.kind, e.ident), {}).setdefault(s, e)
    steps1: dict[int, Step] = {}
    steps2: dict[int, Step] = {}
    for s, rows in c1.items():
        calls1, calls2 = [], []
        for name, src, entries in rows:
            v1, v2 = _virtual_call(name, src, s), _virtual_call(name, src, s)
            for e in entries:
                matches = index2.get((name, e.kind, e.ident), {})
                pairs = None
                if tokens is not None and matches and s in matches and tokens.same_step(s):
                    pairs = _step_pairs(e, matches[s], cache)  # the same tokens in the same order: pair the step whole
                elif tokens is not None and matches:
                    pairs = _token_pairs(e, matches, s, tokens, cache)
                    if pairs is None:
                        continue  # run 2 computed none of these tokens: counted per request, not a module missing
                elif s in matches:
                    pairs = _step_pairs(e, matches[s], cache)
                if pairs is None:
                    w = _Whole(e)
                    v1.outputs.append(_record(e, e.tensor_name, functools.partial(w.get, "", _nothing), e.rules, w, "", {}))
                    continue
                for rec1, rec2 in pairs:
                    getattr(v1, e.kind).append(rec1)
                    getattr(v2, e.kind).append(rec2)
            if v1.tensors:
                calls1.append(v1)
            if v2.tensors:
                calls2.append(v2)
        steps1[s] = Step(index=s, calls=calls1)
        steps2[s] = Step(index=s, calls=calls2)
    names1 = {name for rows in c1.values() for name, _, _ in rows}
    for s, rows in c2.items():  # modules of run 2 with no counterpart in run 1 at all
        for name, src, entries in rows:
            if name not in names1 and s in steps2:
                v = _virtual_call(name, src, s, position=10**6 + src.position)
                for e in entries:
                    w = _Whole(e)
                    getattr(v, e.kind).append(
                        _record(e, e.tensor_name, functools.partial(w.get, "", _nothing), e.rules, w, "", {})
                    )
                steps2[s].calls.append(v)
    aligned1 = Run(path=run1.path, manifest=run1.manifest, steps=steps1, layout=run1.layout, problems=run1.problems)
    aligned2 = Run(path=run2.path, manifest=run2.manifest, steps=steps2, layout=run2.layout, problems=run2.problems)
    return Alignment(aligned1, aligned2, notes, tokens.report if tokens is not None else None)
