"""Module-name patterns: the reference's ``regex`` and ``regex:i`` forms, refused when they could backtrack for ever."""

from __future__ import annotations

import re
from re import _constants as c  # type: ignore[attr-defined]
from re import _parser as _sre  # type: ignore[attr-defined]
from typing import Any

__all__ = ["compile_pattern", "split_call_index", "step_range", "step_ranges"]

MAX_WIDE_REPEATS = 3
"""``k`` repeats like ``.*`` in a row can try ``len(name) ** k`` splits of a name that does not match."""

_CALL_INDEX = re.compile(r"^(?P<regex>.*):(?P<index>\d+)$", re.DOTALL)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A module-name regex, refused when it could take exponential time.

    Python's ``re`` backtracks: a quantified group that itself contains a
    quantifier, or an alternation whose branches can start alike (``(a+)+$``,
    ``(a|ab)*c``), can take minutes on one long name. Such patterns are refused
    with a ``ValueError`` that says how to write them; lookarounds (the
    reference's ``(?!.*rotary_emb)``) and everything else ``re`` takes are fine.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"regex {pattern!r} does not compile: {e}") from None
    except RecursionError:
        raise ValueError(f"regex {pattern[:40]!r}... nests too deeply") from None
    problem = _backtracking_risk(pattern)
    if problem:
        raise ValueError(
            f"regex {pattern!r} {problem}: it can take exponential (or high polynomial) time on long module names; "
            "write it without a repeated group that repeats inside (e.g. 'a+' instead of '(a+)+'), and with few '.*'"
        )
    return compiled


def _backtracking_risk(pattern: str) -> str | None:
    try:
        tree = _sre.parse(pattern)
    except Exception:
        return None

    if _wide_repeats(tree) > MAX_WIDE_REPEATS:
        return f"has more than {MAX_WIDE_REPEATS} unbounded repeats like '.*' (each multiplies the work by the name's length)"
    return _risky(tree)


def _repeats(items: Any) -> bool:
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT) and av[1] > 1:
            return True
        if op is c.SUBPATTERN and _repeats(av[-1]):
            return True
        if op is c.BRANCH and any(_repeats(b) for b in av[1]):
            return True
    return False


def _first(items: Any) -> Any:
    for op, av in items:
        if op is c.LITERAL:
            return av
        if op is c.SUBPATTERN:
            return _first(av[-1])
        return None  # anything else may start with many characters
    return "empty"


def _ambiguous(items: Any) -> bool:
    """An alternation (anywhere inside) whose branches can start alike, or match nothing."""
    for op, av in items:
        if op is c.BRANCH:
            starts = [_first(b) for b in av[1]]
            if None in starts or "empty" in starts or len(set(starts)) < len(starts):
                return True
            if any(_ambiguous(b) for b in av[1]):
                return True
        elif op is c.SUBPATTERN and _ambiguous(av[-1]):
            return True
    return False


def _nullable(items: Any) -> bool:
    """Can match the empty string (a repeat of it can split a name in exponentially many ways)."""
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            if av[0] > 0 and not _nullable(av[2]):
                return False
        elif op is c.SUBPATTERN:
            if not _nullable(av[-1]):
                return False
        elif op is c.BRANCH:
            if not any(_nullable(b) for b in av[1]):
                return False
        elif op not in (c.AT, c.ASSERT, c.ASSERT_NOT):
            return False
    return True


def _risky(items: Any) -> str | None:
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT) and av[1] > 1:
            if _repeats(av[2]):
                return "repeats a group that itself repeats"
            if len(av[2]) and _nullable(av[2]) and any(o is not c.AT for o, _ in av[2]):
                return "repeats a group that can match nothing"
            if _ambiguous(av[2]):
                return "repeats an alternation whose branches can match alike"
        elif op is c.SUBPATTERN:
            inner = _risky(av[-1])
            if inner:
                return inner
        elif op is c.BRANCH:
            for b in av[1]:
                inner = _risky(b)
                if inner:
                    return inner
        elif op in (c.ASSERT, c.ASSERT_NOT):
            inner = _risky(av[1])
            if inner:
                return inner
    return None


def _wide_repeats(items: Any) -> int:
    """Unbounded repeats of something wider than one character (``.*``, ``\\w+``, ``[^.]+``)."""
    n = 0
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):
            wide = not (len(av[2]) == 1 and av[2][0][0] is c.LITERAL)
            n += int(av[1] == c.MAXREPEAT and wide) + _wide_repeats(av[2])
        elif op is c.SUBPATTERN:
            n += _wide_repeats(av[-1])
        elif op is c.BRANCH:
            n += max((_wide_repeats(b) for b in av[1]), default=0)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            n += _wide_repeats(av[1])
    return n


def split_call_index(pattern: str) -> tuple[str, int | None]:
    """Split ``"rotary_emb:0"`` into ``("rotary_emb", 0)``; no suffix gives ``None``."""
    m = _CALL_INDEX.match(pattern)
    if m is None:
        return pattern, None
    return m.group("regex"), int(m.group("index"))


def step_range(text: str) -> tuple[int, int] | None:
    """``"a-b"`` as (a, b), or None when it is not a range of steps."""
    m = re.fullmatch(r"\s*(\d{1,18})\s*-\s*(\d{1,18})\s*", text)
    if not m:
        return None
    lo, hi = int(m.group(1)), int(m.group(2))
    return (lo, hi) if lo <= hi else None


def step_ranges(ids: list[int | str]) -> tuple[frozenset[int], list[tuple[int, int]]]:
    """``log_step_ids`` as (single steps, ranges)."""
    single = frozenset(s for s in ids if isinstance(s, int))
    ranges = [r for s in ids if isinstance(s, str) and (r := step_range(s)) is not None]
    return single, ranges
