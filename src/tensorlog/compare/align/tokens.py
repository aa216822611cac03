"""Token alignment: rows of activations keyed by (request, position), whatever the batching.

HF ``generate`` lays a step out as ``[batch, width, ...]`` (left padding before
each row's real tokens); vLLM as a flattened ``[num_tokens, ...]`` of whichever
requests the scheduler put in the step. Both integrations record each step's
request ids, tokens per request and start positions, so rows can be keyed by
(request, position) and met across runs, steps, chunked prefills and batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...errors import AlignmentError
from ...formats import Run
from ...schema.records import StepInfo

__all__ = ["steps_info", "rows_by_token", "token_rows", "step_tokens", "TokenIndex"]

Token = tuple[str, int]
MAX_ALIGNED_TOKENS = 1 << 25
"""Tokens one run may hold for a token-aligned compare (about 3 GB of index at most)."""


def steps_info(run: Run) -> dict[int, StepInfo]:
    """Step -> its request layout, for the steps that recorded one."""
    return {i: s.info for i, s in run.steps.items() if s.info is not None and s.info.req_ids}


def step_tokens(info: StepInfo, req_key: Callable[[str], str]) -> list[Token]:
    """The (request, position) of every token the step computed, in request order."""
    starts = info.start_positions or [0] * len(info.req_ids)
    return [(req_key(r), s + j) for r, n, s in zip(info.req_ids, info.num_tokens, starts) for j in range(n)]


class TokenIndex:
    """Where each (request, position) of a run was computed: the first step that holds it."""

    def __init__(self, infos: dict[int, StepInfo], req_key: Callable[[str], str]) -> None:
        self.step_of: dict[Token, int] = {}
        if sum(sum(i.num_tokens) for i in infos.values()) > MAX_ALIGNED_TOKENS:
            raise AlignmentError(
                f"the run's steps hold more than {MAX_ALIGNED_TOKENS} tokens: too many to pair one by one "
                "(compare fewer steps with --steps)"
            )
        for s in sorted(infos):
            for tok in step_tokens(infos[s], req_key):
                self.step_of.setdefault(tok, s)

    def steps_for(self, tokens: list[Token]) -> list[int]:
        return sorted({self.step_of[t] for t in tokens if t in self.step_of})


def rows_by_token(t: torch.Tensor, info: StepInfo, req_key: Callable[[str], str]) -> dict[Token, torch.Tensor] | None:
    """(request, position) -> row, or None when the tensor is not laid out by tokens."""
    found = token_rows(t, info, req_key)
    return found[0] if found is not None else None


def token_rows(t: torch.Tensor, info: StepInfo, req_key: Callable[[str], str]) -> tuple[dict[Token, torch.Tensor], bool] | None:
    """(rows by (request, position), whether every token of the step has a row), or None when the tensor is not
    laid out by tokens. A tensor of one row per request (the logits of each request's last token) has not."""
    out = _token_rows(t, info, req_key)
    if out is None:
        return None
    return out, len(out) == sum(info.num_tokens)


def _token_rows(t: torch.Tensor, info: StepInfo, req_key: Callable[[str], str]) -> dict[Token, torch.Tensor] | None:
    reqs, nums = info.req_ids, info.num_tokens
    starts = info.start_positions or [0] * len(reqs)
    out: dict[Token, Any] = {}
    if info.layout == "batch_major":
        width = info.width or max(nums, default=0)
        if t.dim() < 2 or t.shape[0] != len(reqs):
            return None
        cols = t.shape[1]
        if cols != width and not (cols == 1 and t.dim() <= 3):  # [batch, 1, vocab]: the last token's logits
            return None  # e.g. an attention mask [batch, 1, q, k]: laid out by the batch's padding, not by tokens
        for b, (r, n, s) in enumerate(zip(reqs, nums, starts)):
            key = req_key(r)
            for j in range(cols):
                pos = s + n - cols + j
                if pos >= s:  # columns before a row's real tokens are its left padding
                    out[(key, pos)] = t[b, j]
        return out
    if t.dim() < 1:
        return None
    total = sum(nums)
    if t.shape[0] == total:  # [num_tokens, ...] (a tensor with other rows, e.g. top-k expert rows, is not by tokens)
        row = 0
        for r, n, s in zip(reqs, nums, starts):
            key = req_key(r)
            for j in range(n):
                out[(key, s + j)] = t[row]
                row += 1
        return out
    if t.shape[0] == len(reqs):  # one row per request: its last scheduled token (logits)
        for i, (r, n, s) in enumerate(zip(reqs, nums, starts)):
            out[(req_key(r), s + n - 1)] = t[i]
        return out
    return None
