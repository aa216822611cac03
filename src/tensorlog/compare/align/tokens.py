"""Token alignment: rows of activations keyed by (request, position), whatever the batching.

HF ``generate`` lays a step out as ``[batch, new_tokens, ...]``; vLLM as a
flattened ``[num_tokens, ...]`` of whichever requests the scheduler put in the
step. Both integrations record each step's request ids, tokens per request and
start positions, so rows can be keyed by (request, position) and met across
runs, steps and chunked prefills.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from ...formats import Run

__all__ = ["steps_info", "request_keys", "rows_by_token"]


def steps_info(run: Run) -> dict[int, dict[str, Any]]:
    """Step -> its request layout, for the steps that recorded one."""
    return {i: s.info.model_dump() for i, s in run.steps.items() if s.info is not None and s.info.req_ids}


def request_keys(run1: Run, run2: Run) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """Request id -> a key shared by both runs (vLLM adds a random suffix; HF rows are 0, 1, ...)."""

    def norm(r: str) -> str:
        return re.sub(r"-[0-9a-f]{8}$", "", str(r))

    def ids(run: Run) -> list[str]:
        seen: dict[str, None] = {}
        for _, info in sorted(steps_info(run).items()):
            for r in info.get("req_ids", []):
                seen.setdefault(norm(r), None)
        return list(seen)

    a, b = ids(run1), ids(run2)
    if set(a) & set(b):
        return norm, norm
    order_a = {r: str(i) for i, r in enumerate(a)}
    order_b = {r: str(i) for i, r in enumerate(b)}
    return (lambda r: order_a.get(norm(r), norm(r))), (lambda r: order_b.get(norm(r), norm(r)))


def rows_by_token(
    t: torch.Tensor, info: dict[str, Any], req_key: Callable[[str], str]
) -> dict[tuple[str, int], torch.Tensor] | None:
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
