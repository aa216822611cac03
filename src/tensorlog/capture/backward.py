"""Gradients (``data_mode`` with ``backward``), taken with tensor hooks rather than module backward hooks.

``register_full_backward_hook`` wraps a module's outputs in a view made by a
custom autograd function, and a later in-place change of such an output (which
real models do) fails with a RuntimeError inside the user's code. A hook on a
tensor stays with the value it was registered on, in-place changes or not, so
tensorlog hooks the tensors instead:

* each selected module call becomes a ``<module>.backward`` call of the step;
* its *inputs* are the gradients arriving at the module's outputs;
* its *outputs* are the gradients of the module's (floating-point) inputs, as
  autograd accumulates them (all uses of that input, not only this module's).

The step ends when the next forward starts (or at ``step()`` / ``remove()``),
after the backward pass has run.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..schema.leaves import flatten_inputs, flatten_value
from .hooks import hook_arguments
from .recorder import GradientCall, Recorder

__all__ = ["GradientHooks"]


class GradientHooks:
    """Forward hooks that hang gradient hooks on each selected call's tensors; what the gradients log is the
    recorder's (:meth:`Recorder.add_gradient`, under its lock)."""

    def __init__(
        self, recorder: Recorder, targets: dict[str, tuple[weakref.ref[torch.nn.Module], frozenset[int] | None]]
    ) -> None:
        self.recorder = recorder
        self.targets = targets
        self._handles: list[RemovableHandle] = []
        self._calls: dict[str, int] = {}
        """Forward calls per module in this step (the model's thread only)."""

    def attach(self) -> None:
        if self._handles:
            return
        for name, (ref, calls) in self.targets.items():
            module = ref()
            if module is None:
                continue
            self._handles.append(module.register_forward_hook(self._post(name, calls), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def begin_step(self) -> None:
        self._calls = {}

    def _post(self, name: str, calls: frozenset[int] | None) -> Callable[..., None]:
        rec = self.recorder

        def post_hook(module: torch.nn.Module, args: tuple[Any, ...], *rest: Any) -> None:
            kwargs, output = hook_arguments(rest)
            if not torch.is_grad_enabled() or not rec.logging:
                return
            with rec.guard(f"backward hook on {name!r}"):
                k = self._calls.get(name, 0)
                self._calls[name] = k + 1
                if calls is not None and k not in calls:
                    return
                call = GradientCall(f"{name}.backward", type(module).__name__, k)
                inputs, _ = flatten_inputs(args, kwargs)
                grads_out = flatten_value(output if isinstance(output, (tuple, list)) else (output,))
                for kind, leaves in (("inputs", grads_out), ("outputs", inputs)):
                    for path, t in leaves:
                        if isinstance(t, torch.Tensor) and t.requires_grad:
                            t.register_hook(functools.partial(rec.add_gradient, call, kind, path))

        return post_hook
