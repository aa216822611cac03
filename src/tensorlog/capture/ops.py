"""Op-level capture (``level: op`` or ``mix``): torch operations inside the model, as calls of their own.

A ``TorchFunctionMode`` sees each torch function called while a module of the
model runs; the selected ones (linear, matmul, softmax, attention, norms,
activations, elementwise arithmetic, and every custom ``torch.ops`` operator)
are logged as ``<enclosing module>.<op>_<k>``, k counting that op's calls in
that module within the step. Light hooks on every module keep the stack of
enclosing modules; the mode is active only while one of them runs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..config.selection import Selector
from .recorder import Recorder

__all__ = ["OpCapture"]

_UNSEEN = object()


def _op_table() -> dict[Any, str]:
    F = torch.nn.functional
    T = torch.Tensor
    groups = {
        "linear": [F.linear],
        "matmul": [torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__],
        "bmm": [torch.bmm, T.bmm],
        "softmax": [F.softmax, torch.softmax, T.softmax],
        "log_softmax": [F.log_softmax, T.log_softmax],
        "scaled_dot_product_attention": [F.scaled_dot_product_attention],
        "embedding": [F.embedding],
        "layer_norm": [F.layer_norm],
        "rms_norm": [getattr(F, "rms_norm", None)],
        "group_norm": [F.group_norm],
        "silu": [F.silu],
        "gelu": [F.gelu],
        "relu": [F.relu, torch.relu, T.relu],
        "tanh": [torch.tanh, T.tanh, F.tanh],
        "sigmoid": [torch.sigmoid, T.sigmoid, F.sigmoid],
        "rsqrt": [torch.rsqrt, T.rsqrt],
        "add": [torch.add, T.add, T.__add__, T.__radd__, T.__iadd__],
        "sub": [torch.sub, T.sub, T.__sub__, T.__rsub__],
        "mul": [torch.mul, T.mul, T.__mul__, T.__rmul__, T.__imul__],
        "div": [torch.div, T.div, T.__truediv__, T.__rtruediv__],
        "pow": [torch.pow, T.pow, T.__pow__],
    }
    return {f: name for name, funcs in groups.items() for f in funcs if f is not None}  # type: ignore[attr-defined]


class _Mode(torch.overrides.TorchFunctionMode):
    def __init__(self, owner: OpCapture) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        return self.owner.on_op(func, args, kwargs or {})


class OpCapture:
    """Owns the op mode, the enclosing-module stack and the per-step op call counts."""

    def __init__(self, recorder: Recorder, selector: Selector, modules: dict[str, weakref.ref[torch.nn.Module]]) -> None:
        self.recorder = recorder
        self.selector = selector
        self.modules = modules
        self._ops = _op_table()
        self._handles: list[RemovableHandle] = []
        self._stack: list[str] = []
        self._mode: _Mode | None = None
        self._counts: dict[str, int] = {}
        self._selected: dict[str, Any] = {}

    def attach(self) -> None:
        if self._handles:
            return
        for name, ref in self.modules.items():
            module = ref()
            if module is not None:
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._leave(name), always_call=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stack = []
        self._exit_mode()

    def begin_step(self) -> None:
        self._counts = {}
        self._stack = []

    def _enter(self, name: str) -> Callable[..., None]:
        def enter(module: torch.nn.Module, args: Any) -> None:
            if not self._stack and self._mode is None and self.recorder.logging:
                self._mode = _Mode(self)
                self._mode.__enter__()
            self._stack.append(name)

        return enter

    def _leave(self, name: str) -> Callable[..., None]:
        def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self._stack:
                self._stack.pop()
            if not self._stack:
                self._exit_mode()

        return leave

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            try:
                mode.__exit__(None, None, None)
            except Exception:  # the model left a mode of its own on top of ours; torch pops both
                pass

    def _name(self, func: Any) -> str | None:
        try:
            name = self._ops.get(func)
        except TypeError:  # unhashable callables
            return None
        if name is None and isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            ns = getattr(func, "namespace", None) or str(func).split(".")[0]
            if ns not in ("aten", "prim", "prims"):
                name = str(func).replace("::", ".").replace(".default", "")
        return name

    def on_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        rec = self.recorder
        op = None if rec.busy or not self._stack else self._name(func)
        if op is None:
            return func(*args, **kwargs)
        base = f"{self._stack[-1]}.{op}"
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        calls = self._selected.get(base, _UNSEEN)
        if calls is _UNSEEN:
            calls = False
            with rec.guard(f"op hook on {base!r}"):
                calls = self._selected[base] = self.selector.calls_for(base)
        logged = False
        if calls is not False and (calls is None or k in calls):  # type: ignore[operator]
            logged = rec.enter(f"{base}_{k}", op, args, kwargs, None)[0] is not None
        out = func(*args, **kwargs)
        if logged:
            rec.leave(f"{base}_{k}", out)
        return out
