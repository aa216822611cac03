"""Module hooks: attached to the selected modules only while a selected step runs.

:class:`ModuleHooks` registers one forward pre-hook and one forward hook per
selected module and reports each call to the :class:`Recorder`. Outside
selected steps no module carries a tensorlog hook at all, so the model runs
exactly as without tensorlog.

A module whose class replaces ``nn.Module.__call__`` may call its own
``forward`` directly, so hooks would never fire: vLLM's compile decorator does
this for the decoder stack (``model``), in eager mode too. Such a module gets
the same pre/post logic through a wrapper set on the instance's ``forward``
instead, removed with the hooks.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .compiled import graph_step, tap_inputs, tap_output, traced_site
from .recorder import Recorder
from .steps import ForwardAbandoned

__all__ = ["hook_arguments", "ModuleHooks", "RootHooks"]

_ABSENT = object()

Targets = dict[str, tuple["weakref.ref[torch.nn.Module]", "frozenset[int] | None"]]


class ModuleHooks:
    def __init__(self, recorder: Recorder, targets: Targets, *, forward: bool, traced: int = 0) -> None:
        self.recorder = recorder
        self.traced = traced
        """Where a hook that a compiler traces gets its graph tap (:func:`.compiled.traced_site`); 0: nowhere."""
        self.targets = targets
        self.forward = forward
        self._handles: list[RemovableHandle] = []
        self._wrapped: list[tuple[torch.nn.Module, Any]] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles or self._wrapped)

    def attach(self) -> None:
        if self.attached or not self.forward:
            return
        for name, (ref, calls) in self.targets.items():
            module = ref()
            if module is None:
                continue
            if type(module).__call__ is not torch.nn.Module.__call__:
                self._wrap_forward(module, name, calls)
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre(name, calls), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(name), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for module, before in self._wrapped:
            if before is _ABSENT:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = before
        self._wrapped = []

    def _wrap_forward(self, module: torch.nn.Module, name: str, calls: frozenset[int] | None) -> None:
        before = module.__dict__.get("forward", _ABSENT)
        forward = module.forward
        pre, post = self._pre(name, calls), self._post(name)

        @functools.wraps(forward)
        def logged_forward(*args: Any, **kwargs: Any) -> Any:
            replacement = pre(module, args, kwargs)
            if replacement is not None:
                args, kwargs = replacement
            out = forward(*args, **kwargs)
            post(module, args, kwargs, out)
            return out

        module.__dict__["forward"] = logged_forward
        self._wrapped.append((module, before))

    def _pre(self, name: str, calls: frozenset[int] | None) -> Callable[..., Any]:
        enter = self.recorder.enter
        owner = str(self.traced) if self.traced else ""  # a string: never a symbol (compiled.ids_of)

        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], *kwargs: dict[str, Any]) -> Any:
            if owner and torch.compiler.is_compiling():
                site, native = traced_site(owner, name, "pre")
                tap_inputs(site, native, args, kwargs[0] if kwargs else {})
                return None
            # None (nothing changes) unless reload_input_dir grafts this call's inputs. Without ``kwargs``: torch
            # read the hook's kwargs flag after another thread removed it mid-call (see ``hook_arguments``).
            changed = enter(name, type(module).__name__, args, kwargs[0] if kwargs else {}, calls)[1]
            return changed if kwargs else None

        return pre_hook

    def _post(self, name: str) -> Callable[..., None]:
        leave = self.recorder.leave
        owner = str(self.traced) if self.traced else ""  # a string: never a symbol (compiled.ids_of)

        def post_hook(module: torch.nn.Module, args: tuple[Any, ...], *rest: Any) -> None:
            if owner and torch.compiler.is_compiling():
                site, native = traced_site(owner, name, "post")
                tap_output(site, native, rest[-1])
                return
            kwargs, output = hook_arguments(rest)
            leave(name, output, args=args, kwargs=kwargs)

        return post_hook


def hook_arguments(rest: tuple[Any, ...]) -> tuple[dict[str, Any], Any]:
    """(kwargs, output) of a forward hook registered ``with_kwargs``.

    torch takes a snapshot of a module's hooks, then asks for each whether it wants kwargs; a hook removed in
    between (``remove()`` from another thread) is called without them. Taking both shapes keeps that a no-op.
    """
    return (rest[0], rest[1]) if len(rest) == 2 else ({}, rest[-1])


class RootHooks:
    """The root module's hooks: a step is one outermost call of the root (nested calls of it are not steps).

    A forward that a ``BaseException`` left is found when the root is called again on the same thread and
    the outer call's frame is no longer on the stack (that step is closed as cut short), or by
    :meth:`abandoned` when the capture ends.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        begin: Callable[[tuple[Any, ...], dict[str, Any]], None],
        end: Callable[[BaseException | None], None],
        traced: int = 0,
    ) -> None:
        self.depth = 0
        self._owner = str(traced) if traced else ""
        self._outer: Any = None  # the outermost call's frame, while it runs
        self._thread = 0
        self._begin, self._end = begin, end
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._owner and torch.compiler.is_compiling():  # a compiler traces the root: the step is an op
            handle, taps = traced_site(self._owner, "", "root")
            graph_step(handle, taps, 0)
            return
        if self.depth and self._left_behind():
            self.depth, self._outer = 0, None
            self._end(ForwardAbandoned())
        if self.depth == 0:
            self._outer, self._thread = sys._getframe(1), threading.get_ident()
            self._begin(args, kwargs)
        self.depth += 1

    def _left_behind(self) -> bool:
        """The outer call is not on this thread's stack: it was left by a BaseException (another thread's call
        of the root, as in DataParallel, is nested in it and not a step)."""
        if self._thread != threading.get_ident():
            return False
        return not self._on_stack(sys._getframe(1))

    def busy_elsewhere(self) -> bool:
        """A forward of the root runs now on another thread than the caller's (one that a BaseException left, or
        whose thread ended, is not running: its frame is on no stack)."""
        if self.depth == 0 or self._thread == threading.get_ident():
            return False
        return self._on_stack(sys._current_frames().get(self._thread))

    def _on_stack(self, top: Any) -> bool:
        """The outer call's frame is on the stack that ``top`` ends (it is held, so no new frame can be it)."""
        f = top
        while f is not None:
            if f is self._outer:
                return True
            f = f.f_back
        return False

    def inside_forward(self) -> bool:
        """The caller runs inside the root's forward (``remove()`` called from the model's own code)."""
        return self.depth > 0 and self._thread == threading.get_ident() and not self._left_behind()

    def abandoned(self) -> bool:
        """A forward is open that will not return (asked when the capture ends: its step was cut short)."""
        return self.depth > 0

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._owner and torch.compiler.is_compiling():
            handle, taps = traced_site(self._owner, "", "root")
            graph_step(handle, taps, 1)
            return
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self._outer = None
            self._end(sys.exc_info()[1])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
