"""Which request of one run is which request of the other: by prompt, never by engine-local id or order.

An engine numbers its requests from "0", so a request served alone in a fresh
engine and a different one served first elsewhere share an id. Both
integrations record each request's prompt (its token ids and a digest) when it
is first scheduled (:class:`~tensorlog.schema.records.RequestStart`); a request
is keyed by (prompt digest, sample index, occurrence), where the occurrence
tells apart the same prompt submitted twice in one run. Requests whose keys
meet are the same request; the rest are on one side only, and where both runs
have such requests, the report says where their prompts first differ.

The positions each run computed for a request (from the steps' layouts) give
the tokens only one run holds: prefix-cache hits, tokens after an early stop,
a preemption's recomputation. They are counted, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from ...formats import Run
from ...schema.records import RequestStart

__all__ = [
    "RequestTable",
    "RequestReport",
    "RequestPair",
    "PromptDifference",
    "request_table",
    "match_requests",
    "unmatched_reason",
]

_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def _norm(rid: str) -> str:
    """vLLM appends a random ``-xxxxxxxx`` to the caller's request id."""
    return _SUFFIX.sub("", str(rid))


class Spans:
    """Positions as merged half-open ranges: a request's tokens cost memory by how often it was scheduled, not by
    how long it is (an index may claim millions)."""

    def __init__(self) -> None:
        self._raw: list[tuple[int, int]] = []
        self._merged: list[tuple[int, int]] | None = []

    def add(self, lo: int, hi: int) -> None:
        if hi > lo:
            self._raw.append((lo, hi))
            self._merged = None

    @property
    def ranges(self) -> list[tuple[int, int]]:
        if self._merged is None:
            out: list[tuple[int, int]] = []
            for lo, hi in sorted(self._raw):
                if out and lo <= out[-1][1]:
                    out[-1] = (out[-1][0], max(out[-1][1], hi))
                else:
                    out.append((lo, hi))
            self._merged, self._raw = out, list(out)
        return self._merged

    def __len__(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)

    def minus(self, other: Spans) -> list[tuple[int, int]]:
        """The ranges of this set that ``other`` does not hold."""
        out: list[tuple[int, int]] = []
        theirs = other.ranges
        j = 0
        for lo, hi in self.ranges:
            cur = lo
            while j < len(theirs) and theirs[j][1] <= cur:
                j += 1
            k = j
            while k < len(theirs) and theirs[k][0] < hi:
                if theirs[k][0] > cur:
                    out.append((cur, theirs[k][0]))
                cur = max(cur, theirs[k][1])
                k += 1
            if cur < hi:
                out.append((cur, hi))
        return out


@dataclass
class _Request:
    key: str
    ids: list[str]
    start: RequestStart
    positions: Spans = field(default_factory=Spans)


@dataclass
class RequestTable:
    """One run's requests: engine-local id -> key, and per key the prompt and the positions computed."""

    key_of: dict[str, str] = field(default_factory=dict)
    requests: dict[str, _Request] = field(default_factory=dict)
    unkeyed: dict[str, None] = field(default_factory=dict)
    """Requests in the steps' layouts whose prompt was never recorded (first scheduled in a step not logged,
    a run of an older tensorlog, prompts given as embeddings)."""

    def key(self, rid: str) -> str:
        return self.key_of.get(rid, f"unkeyed:{rid}")


def request_table(run: Run) -> RequestTable | None:
    """The run's requests, or None when its steps recorded no request layout at all."""
    infos = [(i, s.info) for i, s in sorted(run.steps.items()) if s.info is not None and s.info.req_ids]
    if not infos:
        return None
    table = RequestTable()
    seen: dict[tuple[str, int], int] = {}
    for _, info in infos:
        for start in info.new_requests:
            if start.id in table.key_of:
                continue  # a request rescheduled after preemption is still the same request
            base = (start.prompt_digest, start.sample)
            occurrence = seen.get(base, 0)
            seen[base] = occurrence + 1
            key = f"{start.prompt_digest[:16]}/s{start.sample}/{occurrence}"
            table.key_of[start.id] = key
            table.requests[key] = _Request(key, [start.id], start)
    for _, info in infos:
        starts = info.start_positions or [0] * len(info.req_ids)
        for rid, n, s in zip(info.req_ids, info.num_tokens, starts):
            found = table.key_of.get(rid)
            if found is None:
                table.unkeyed.setdefault(rid, None)
                continue
            table.requests[found].positions.add(s, s + n)
    return table


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestPair(_Model):
    """A request both runs served, and the tokens of it that only one run logged."""

    id1: str
    id2: str
    prompt_len: int
    sample: int = 0
    tokens_both: int
    tokens_only_1: int = 0
    tokens_only_2: int = 0
    only_1: str | None = None
    """The positions only run 1 logged, as ranges (``"11-15"``)."""
    only_2: str | None = None


class PromptDifference(_Model):
    """Two requests, one of each run, that stand in the same place but have different prompts."""

    id1: str
    id2: str
    len1: int
    len2: int
    first_difference: int | None
    """The first token index where the prompts differ (None: unknown, a prompt was too long to record)."""
    token1: int | None = None
    token2: int | None = None

    def describe(self) -> str:
        where = (
            f"they first differ at token {self.first_difference} ({self.token1} vs {self.token2})"
            if self.first_difference is not None and self.token1 is not None and self.token2 is not None
            else f"one is a prefix of the other ({self.len1} vs {self.len2} tokens)"
            if self.first_difference is not None
            else f"prompts of {self.len1} and {self.len2} tokens with different digests"
        )
        return f"request {self.id1!r} of run 1 and {self.id2!r} of run 2 have different prompts: {where}"


class RequestReport(_Model):
    """How the two runs' requests were paired: the basis of every token-aligned pair."""

    how: str
    """``prompt``: by prompt and sample; ``id``: by request id (a run recorded no prompts); ``step``: by step number."""
    why: str | None = None
    """Why requests could not be paired by prompt, when they were not."""
    matched: list[RequestPair] = Field(default_factory=list)
    only_in_1: list[str] = Field(default_factory=list)
    only_in_2: list[str] = Field(default_factory=list)
    different_prompts: list[PromptDifference] = Field(default_factory=list)
    rebatched: bool = False
    """The runs put the paired tokens into different steps or batches (then rows were gathered by token)."""

    @property
    def tokens_only_1(self) -> int:
        return sum(p.tokens_only_1 for p in self.matched)

    @property
    def tokens_only_2(self) -> int:
        return sum(p.tokens_only_2 for p in self.matched)

    def summary(self) -> str:
        """One line: what was paired, and what is on one side only."""
        if self.how != "prompt":
            return f"requests paired by {self.how}: {self.why}"
        parts = [f"{len(self.matched)} request(s) paired by prompt"]
        if self.tokens_only_1 or self.tokens_only_2:
            parts.append(f"tokens logged by one run only: {self.tokens_only_1} in run 1, {self.tokens_only_2} in run 2")
        if self.only_in_1:
            parts.append(f"only in run 1: {_ids(self.only_in_1)}")
        if self.only_in_2:
            parts.append(f"only in run 2: {_ids(self.only_in_2)}")
        return "; ".join(parts)


def _ids(ids: list[str]) -> str:
    return ", ".join(repr(i) for i in ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")


def _ranges(spans: list[tuple[int, int]]) -> str | None:
    if not spans:
        return None
    out = [f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo) for lo, hi in spans]
    return ",".join(out[:8]) + (" ..." if len(out) > 8 else "")


def _difference(a: RequestStart, b: RequestStart) -> PromptDifference:
    first = t1 = t2 = None
    if a.prompt is not None and b.prompt is not None:
        first = next((i for i, (x, y) in enumerate(zip(a.prompt, b.prompt)) if x != y), min(len(a.prompt), len(b.prompt)))
        t1 = a.prompt[first] if first < len(a.prompt) else None
        t2 = b.prompt[first] if first < len(b.prompt) else None
    return PromptDifference(
        id1=_norm(a.id), id2=_norm(b.id), len1=a.prompt_len, len2=b.prompt_len, first_difference=first, token1=t1, token2=t2
    )


def match_requests(t1: RequestTable, t2: RequestTable) -> RequestReport:
    """Pair the two runs' requests by key; name the requests on one side only, and prompts that differ.

    Requests left over on both sides are set against each other in their order of arrival, only to say
    where their prompts differ: they are different requests, and none of their tensors are compared.
    """
    matched = []
    for key, r1 in t1.requests.items():
        r2 = t2.requests.get(key)
        if r2 is None:
            continue
        only1, only2 = r1.positions.minus(r2.positions), r2.positions.minus(r1.positions)
        n1 = sum(hi - lo for lo, hi in only1)
        matched.append(
            RequestPair(
                id1=_norm(r1.ids[0]),
                id2=_norm(r2.ids[0]),
                prompt_len=r1.start.prompt_len,
                sample=r1.start.sample,
                tokens_both=len(r1.positions) - n1,
                tokens_only_1=n1,
                tokens_only_2=sum(hi - lo for lo, hi in only2),
                only_1=_ranges(only1),
                only_2=_ranges(only2),
            )
        )
    left1 = [r for k, r in t1.requests.items() if k not in t2.requests]
    left2 = [r for k, r in t2.requests.items() if k not in t1.requests]
    # An extra sample (n=2 against n=1: sample 1 of a prompt whose sample 0 the other run served) is a request on
    # one side only; any other leftover (another prompt, the same prompt once more) stands where a request of the
    # other run may stand with a different prompt.
    firsts1 = {r.start.prompt_digest for r in t1.requests.values() if r.start.sample == 0}
    firsts2 = {r.start.prompt_digest for r in t2.requests.values() if r.start.sample == 0}
    strange1 = [r for r in left1 if not (r.start.sample > 0 and r.start.prompt_digest in firsts2)]
    strange2 = [r for r in left2 if not (r.start.sample > 0 and r.start.prompt_digest in firsts1)]
    differences = [_difference(a.start, b.start) for a, b in zip(strange1, strange2)]
    return RequestReport(
        how="prompt",
        matched=matched,
        only_in_1=[_norm(r.ids[0]) for r in left1] + [_norm(r) for r in t1.unkeyed],
        only_in_2=[_norm(r.ids[0]) for r in left2] + [_norm(r) for r in t2.unkeyed],
        different_prompts=differences,
    )


def unmatched_reason(t1: RequestTable | None, t2: RequestTable | None) -> str | None:
    """Why the runs' requests cannot be paired by prompt (None: they can)."""
    for i, t in ((1, t1), (2, t2)):
        if t is None:
            return f"run {i} recorded no request layout (a plain PyTorch run, or a foreign dump)"
    assert t1 is not None and t2 is not None
    for i, t in ((1, t1), (2, t2)):
        if not t.requests:
            return f"run {i} recorded no prompts (an older tensorlog, or the requests' first steps were not logged)"
    return None


def id_keys(run1: Run, run2: Run) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """The fallback for runs without prompts: ids as they are where they meet, else the order of arrival."""

    def ids(run: Run) -> list[str]:
        seen: dict[str, None] = {}
        for _, s in sorted(run.steps.items()):
            for r in s.info.req_ids if s.info is not None else []:
                seen.setdefault(_norm(r), None)
        return list(seen)

    a, b = ids(run1), ids(run2)
    if set(a) & set(b):
        return _norm, _norm
    order_a = {r: str(i) for i, r in enumerate(a)}
    order_b = {r: str(i) for i, r in enumerate(b)}
    return (lambda r: order_a.get(_norm(r), _norm(r))), (lambda r: order_b.get(_norm(r), _norm(r)))
