"""Step and call bookkeeping, with no torch in it: which step, which call of a module, which directory.

Call indices count every call of a hooked module within a step (logged or
not), as the reference does; the k-th call (k >= 1) goes to ``<module>_<k>``.
Directory names are unique within a step: when another module already took
the name (a module ``a`` called twice and a module named ``a_1``; two names
that become the same once made safe for a file system), ``~<n>`` is added.
Runs of the same model name their calls identically, so pairing still works.
"""

from __future__ import annotations

import functools

from ..schema import names

__all__ = ["StepState", "ForwardAbandoned", "RemovedMidForward"]

_call_dir = functools.lru_cache(maxsize=1 << 16)(names.call_dir)


class StepState:
    """The current step's counters. Owned by the model's thread; pure, so it is unit-tested on its own."""

    def __init__(self, first_step: int = 0) -> None:
        self.index = first_step
        self._counts: dict[str, int] = {}
        self._taken: set[str] = set()
        self._seq = 0
        self.order: list[str] = []

    def advance(self) -> None:
        """The next step begins: every counter starts again."""
        self.index += 1
        self.reset()

    def reset(self) -> None:
        self._counts = {}
        self._taken = set()
        self._seq = 0
        self.order = []

    def next_call(self, name: str) -> int:
        """The call index of this call of ``name`` (0 for its first call in the step)."""
        k = self._counts.get(name, 0)
        self._counts[name] = k + 1
        return k

    def tick(self) -> int:
        """A sequence number: each call takes one when it starts and one when it ends, so calls nest."""
        s = self._seq
        self._seq += 1
        return s

    def claim_dirname(self, name: str, call_index: int) -> str:
        """The directory name of this logged call, unique within the step; recorded in start order."""
        base = _call_dir(name, call_index)
        dirname, n = base, 0
        while dirname in self._taken or names.is_step_file(dirname):
            n += 1
            dirname = names.safe_name(f"{base}~{n}")
        self._taken.add(dirname)
        self.order.append(dirname)
        return dirname


class ForwardAbandoned(BaseException):
    """What a step records when its forward never returned: torch runs ``always_call`` hooks only for an
    ``Exception``, so a ``KeyboardInterrupt`` or ``SystemExit`` (SIGTERM) leaves a forward without a word."""

    def __str__(self) -> str:
        return "the forward never returned (KeyboardInterrupt, SystemExit or another BaseException left it)"


class RemovedMidForward(BaseException):
    """What a step records when the capture was removed from inside its own forward: the step is partial."""

    def __str__(self) -> str:
        return "the capture was removed inside the forward"
