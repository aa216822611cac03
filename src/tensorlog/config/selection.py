"""Which modules, calls, steps, devices and ranks a config selects.

Selection is resolved once per model into a plain ``{name: calls}`` table so
that hooks never run a regex.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .patterns import compile_pattern, split_call_index, step_ranges

if TYPE_CHECKING:
    from . import LogConfig  # the config package never imports this module: no cycle

__all__ = ["Selector"]


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    call_index: int | None


class Selector:
    """Answers "log this?" for module names, call indices, steps, devices, ranks."""

    def __init__(self, config: LogConfig) -> None:
        patterns = config.module_call_match
        self._patterns: list[_Pattern] | None = None
        if patterns:  # an empty list selects every module, as the reference's does (and as empty steps or devices do)
            self._patterns = []
            for p in patterns:
                regex, index = split_call_index(p)
                self._patterns.append(_Pattern(compile_pattern(regex), index))
        self._steps, self._step_ranges = step_ranges(config.log_step_ids)
        self._devices = [torch.device(d) for d in config.device_names]
        self._ranks = frozenset(config.ranks)

    def calls_for(self, name: str) -> frozenset[int] | bool | None:
        """Which calls of module ``name`` to log within a step.

        Returns ``False`` (never), ``None`` (every call), or the set of call indices.
        """
        if self._patterns is None:
            return None
        calls: set[int] = set()
        for p in self._patterns:
            if p.regex.search(name):
                if p.call_index is None:
                    return None
                calls.add(p.call_index)
        return frozenset(calls) if calls else False

    def select_modules(self, names: Iterable[str]) -> dict[str, frozenset[int] | None]:
        table: dict[str, frozenset[int] | None] = {}
        for name in names:
            calls = self.calls_for(name)
            if calls is not False:
                table[name] = calls  # type: ignore[assignment]
        return table

    def step(self, step: int) -> bool:
        if not self._steps and not self._step_ranges:
            return True
        return step in self._steps or any(lo <= step <= hi for lo, hi in self._step_ranges)

    @property
    def last_step(self) -> int | None:
        """The last step that can be logged, or ``None`` when every step is."""
        if not self._steps and not self._step_ranges:
            return None
        return max([*self._steps, *(hi for _, hi in self._step_ranges)])

    def device(self, device: torch.device) -> bool:
        """``cuda`` in the config matches every CUDA device; ``cuda:1`` only that one."""
        if not self._devices:
            return True
        return any(want.type == device.type and want.index in (None, device.index) for want in self._devices)

    def rank(self, rank: int | None) -> bool:
        return not self._ranks or rank is None or rank in self._ranks
