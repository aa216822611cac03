"""Tensor-parallel shards: per-rank tensors made whole, by the layout the model recorded, never guessed first.

vLLM's parallel layers say how their outputs lie across ranks, and the vLLM
plugin records it in ``run.json`` (``shard_layouts``):

* ``QKVParallelLinear``, ``MergedColumnParallelLinear``: each rank holds its
  slice of every fused part (q / k / v; gate / up): ``concat_parts``;
* ``ColumnParallelLinear``: its slice (``concat``), or the whole (``gather_output``);
* ``RowParallelLinear``: the whole after the all-reduce (``replicated``), or a
  partial sum (``reduce_results=False``);
* ``VocabParallelEmbedding``: the whole; the logits: gathered, padding cut (``vocab``).

A replicated tensor is *checked*: every rank's copy is compared with the other
run on its own, so a rank that disagrees is named. Layers with no record (norms,
decoder layers, attention) fall back to shapes, and the pair says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import AlignmentError
from ...schema.records import ShardLayout
from .spec import ShardRule

__all__ = ["ShardPlan", "plan_for", "merge", "disagreement", "DISAGREE"]

DISAGREE = "RANKS DISAGREE"
"""Marks a merge whose ranks hold different copies of what should be one tensor: a mismatch in itself."""

How = Literal["concat", "concat_parts", "replicated", "partial_sum", "vocab", "infer"]


@dataclass(frozen=True)
class ShardPlan:
    how: How
    dim: int = -1
    parts: tuple[int, ...] | None = None
    replicas: tuple[int, ...] | None = None
    vocab: int | None = None
    source: str = "inferred from shapes (no recorded layout)"

    @property
    def recorded(self) -> bool:
        return self.how != "infer"

    def describe(self, ranks: int) -> str:
        what = {
            "concat": f"shards concatenated along dim {self.dim}",
            "concat_parts": f"each rank's parts {list(self.parts) if self.parts else '(two halves)'} concatenated part by part "
            f"along dim {self.dim}",
            "replicated": "replicated (each rank's copy compared)",
            "partial_sum": "partial sums added",
            "vocab": "logits gathered" + (f", vocabulary cut to {self.vocab}" if self.vocab else ""),
            "infer": "",
        }[self.how]
        return f"{ranks} ranks: {what} [{self.source}]"


def plan_for(layout: ShardLayout | None, rule: ShardRule | None, kind: str) -> ShardPlan:
    """The plan for one module's tensors of ``kind``: a mapping's rule, else the recorded layout, else shapes."""
    if rule is not None:
        how: How = {"concat": "concat", "sum": "partial_sum", "replicated": "replicated"}[rule.how]  # type: ignore[assignment]
        return ShardPlan(how, rule.dim, source=f"mapping rule {rule.pattern!r}")
    if layout is None:
        return ShardPlan("infer")
    source = f"recorded: {layout.layer}" if layout.layer else "recorded"
    if kind != "outputs":
        if layout.inputs is None:
            return ShardPlan("infer")
        if layout.inputs == "concat_halves":
            return ShardPlan("concat_parts", -1, None, source=source)  # two equal halves per rank
        return ShardPlan("replicated" if layout.inputs == "replicated" else "concat", -1, source=source)
    if layout.rule == "concat_parts":
        return ShardPlan(
            "concat_parts", layout.dim, tuple(layout.parts or ()), tuple(layout.replicas or ()) or None, source=source
        )
    recorded: How = layout.rule
    return ShardPlan(recorded, layout.dim, vocab=layout.vocab, source=source)


def merge(
    parts: list[torch.Tensor | None], plan: ShardPlan, other: torch.Tensor | None, *, tokens: bool = False
) -> tuple[torch.Tensor, str]:
    """The whole tensor from per-rank ``parts`` (``None`` where a rank holds none), and what was done.

    ``other`` is the other run's tensor, for layers with no record; with ``tokens`` its rows are other
    tokens than these (another step, another batch), so only the feature dimension can be compared.
    """
    present = [p for p in parts if p is not None]
    if not present:
        raise AlignmentError("no rank holds this tensor")
    if len(parts) == 1:
        return present[0], ""
    n = len(parts)
    if plan.how == "vocab":
        t = present[0]
        if len(present) > 1 and any(p.shape != t.shape or not torch.equal(p, t) for p in present[1:]):
            raise AlignmentError("the ranks that hold the gathered logits disagree")
        return (t[..., : plan.vocab] if plan.vocab else t), plan.describe(n)
    if len(present) != n:
        raise AlignmentError(f"{n - len(present)} of {n} ranks hold no tensor, but the layout is {plan.how}")
    if plan.how == "concat":
        return torch.cat(present, dim=plan.dim), plan.describe(n)
    if plan.how == "concat_parts":
        return _concat_parts(present, plan), plan.describe(n)
    if plan.how == "partial_sum":
        return _sum(present), plan.describe(n)
    if plan.how == "replicated":
        return present[0], plan.describe(n)
    return _infer(present, other, n, tokens)


def _concat_parts(parts: list[torch.Tensor], plan: ShardPlan) -> torch.Tensor:
    width = parts[0].shape[plan.dim]
    sizes = list(plan.parts) if plan.parts else [width // 2, width - width // 2]
    if any(p.shape[plan.dim] != sum(sizes) for p in parts):
        raise AlignmentError(f"recorded parts {sizes} do not fill the shards' width {parts[0].shape[plan.dim]}")
    split = [torch.split(p, sizes, dim=plan.dim) for p in parts]
    replicas = list(plan.replicas or [1] * len(sizes))
    pieces = [
        torch.cat([split[r][i] for r in range(0, len(parts), max(1, replicas[i]))], dim=plan.dim) for i in range(len(sizes))
    ]
    return torch.cat(pieces, dim=plan.dim)


def _sum(parts: list[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(torch.add, [p.double() for p in parts]).to(parts[0].dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    den = float(torch.linalg.vector_norm(b64)) or 1.0
    return float(torch.linalg.vector_norm(a64 - b64)) / den


def _infer(parts: list[torch.Tensor], other: torch.Tensor | None, n: int, tokens: bool) -> tuple[torch.Tensor, str]:
    """No record: decide from shapes, and from the data where shapes cannot tell (replicated or partial sums)."""
    tag = "[inferred from shapes: no recorded layout]"
    first = parts[0]
    if not all(p.shape == first.shape for p in parts):
        diff = [d for d in range(first.dim()) if any(p.shape[d] != first.shape[d] for p in parts)]
        if len(diff) == 1 and all(p.dim() == first.dim() for p in parts):
            return torch.cat(parts, dim=diff[0]), f"{n} ranks: shards concatenated along dim {diff[0]} {tag}"
        raise AlignmentError(f"the ranks' shapes {[list(p.shape) for p in parts]} fit no layout")
    if all(torch.equal(p, first) for p in parts[1:]):
        return first, f"{n} ranks: replicated, all equal {tag}"
    ref = other if other is not None and other.dim() > 0 and first.dim() > 0 else None
    whole = ref is not None and (ref.shape[-1] == first.shape[-1] if tokens else ref.shape == first.shape)
    if ref is not None and whole:
        if not tokens and _rel(_sum(parts), ref) < 0.5 * _rel(first, ref):
            return _sum(parts), f"{n} ranks: partial sums added (their sum matches the other run; the copies differ) {tag}"
        rank, worst = disagreement(parts)
        return first, (
            f"{n} ranks: {DISAGREE}: rank {rank}'s copy differs from rank 0's by max abs {worst:.3g}; "
            f"rank 0's copy compared {tag}"
        )
    if ref is not None and not tokens and ref.dim() == first.dim():
        for d in range(first.dim()):
            others_equal = all(ref.shape[k] == first.shape[k] for k in range(first.dim()) if k != d)
            if ref.shape[d] == n * first.shape[d] and others_equal:
                return torch.cat(parts, dim=d), f"{n} ranks: shards concatenated along dim {d} {tag}"
    if ref is not None and ref.shape[-1] == n * first.shape[-1]:
        return torch.cat(parts, dim=-1), f"{n} ranks: shards concatenated along dim -1 {tag}"
    return torch.cat(parts, dim=-1), f"{n} ranks: shards concatenated along dim -1 (a guess: nothing to check it against) {tag}"


def disagreement(parts: list[torch.Tensor]) -> tuple[int, float]:
    """The rank whose copy differs most from rank 0's, and by how much (max abs)."""
    worst_rank, worst = 0, 0.0
    for r, p in enumerate(parts[1:], start=1):
        d = float((p.double() - parts[0].double()).abs().max()) if p.shape == parts[0].shape else float("inf")
        if d > worst:
            worst_rank, worst = r, d
    return worst_rank, worst
