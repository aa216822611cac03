"""Capture inside ``torch.compile`` / Inductor graphs: hooks whose only work is a graph op.

Ordinary capture hooks run Python that Dynamo cannot put in a graph, so a
compiled model either breaks its graph at every hook or (as vLLM does, tracing
once and skipping guards) never runs them. Here each selected module gets
permanent pre and post hooks whose whole body is one call of the custom op
``tensorlog::tap(tensors, site, leaves)``; Dynamo inlines the hooks and the op
lands in the graph. The op is registered as *effectful* (ordered), so Inductor
keeps it, in program order, and does not fuse it away; its kernel is a call
back into tensorlog that records the call exactly as an eager hook would.
``leaves`` is a constant string, built from the call's structure while it is
traced, that tells where each tensor sat and what the non-tensor arguments
were. The step boundary is an op too (``tensorlog::step``), so a root module
that Dynamo traces (capture before compile) still opens and closes steps.

Why hooks and not an FX pass: Dynamo already inlines module hooks at the module
boundary, where the reference defines a call; a pass over ``nn_module_stack``
would have to guess which node is a module's output after functionalisation
and decomposition. This works unchanged inside vLLM's compile pipeline, whose
custom passes run after the taps are in the graph.

What observing changes: a tapped value must exist, so Inductor cannot fuse it
away; fusion choices around it may differ. ``run.json`` records the mode and
backend, and the tests check the tapped model's outputs against the untapped
one's. Under CUDA graphs a host callback does not replay: the vLLM plugin turns
graph capture off while it taps (see ``CompiledInfo.cudagraphs``).
"""

from __future__ import annotations

import ast
import functools
import itertools
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.library import custom_op
from torch.utils.hooks import RemovableHandle

from ..config import LogConfig
from ..errors import ConfigError
from .recorder import Recorder

__all__ = ["TapHooks", "StepOps", "is_compiled", "unwrap_compiled", "compiled_mode", "compiled_facts", "NOT_SEEN", "OWN_CALL"]

_FIELD, _ENTRY, _PART = "\x1f", "\x1e", "\x1d"

_lock = threading.Lock()
_sites: dict[int, Callable[[list[torch.Tensor], str], None]] = {}
_steps: dict[int, Callable[[int], None]] = {}
_ids = itertools.count(1)


@custom_op("tensorlog::tap", mutates_args=())
def _tap(xs: list[torch.Tensor], site: int, leaves: str) -> None:
    fn = _sites.get(site)
    if fn is not None:
        fn(xs, leaves)


@_tap.register_fake
def _tap_fake(xs: list[torch.Tensor], site: int, leaves: str) -> None:
    return None


@custom_op("tensorlog::step", mutates_args=())
def _step(handle: int, phase: int) -> None:
    fn = _steps.get(handle)
    if fn is not None:
        fn(phase)


@_step.register_fake
def _step_fake(handle: int, phase: int) -> None:
    return None


def _ordered(op: Any) -> None:
    from torch._library.effects import EffectType

    op.register_effect(EffectType.ORDERED)


_ordered(_tap)
_ordered(_step)


NOT_SEEN = (
    "selected, but no logged step of the compiled model called it as a module: not called in those steps, "
    "or compiled where the graph keeps no call of it"
)


OWN_CALL = (
    "its class replaces nn.Module.__call__ and compiles its own forward (vLLM's decorator does): the graph "
    "has no call of it to tap; its first submodule's inputs and its last one's outputs are logged"
)


def compiled_mode(config: LogConfig, model: torch.nn.Module, engine: bool | None) -> bool:
    """Whether to capture with taps; ``engine`` is an integration's word that the model will be compiled.

    Raises:
        ConfigError: an option that only eager capture has was asked for a compiled capture.
    """
    if config.compiled == "eager":
        return False
    compiled = config.compiled == "compiled" or (engine if engine is not None else is_compiled(model))
    if compiled and config.enabled:
        eager_only = [
            f"level: {config.level}" if config.level != "module" else "",
            "data_mode: backward" if "backward" in config.passes else "",
            "reload_input_dir" if config.reload_input_dir else "",
            "stack: true" if config.stack else "",
        ]
        if any(eager_only):
            raise ConfigError(
                f"{', '.join(x for x in eager_only if x)} needs eager capture, and this model is compiled: "
                "set compiled: 'eager' (a compiled model then breaks its graph at each hook), or drop the option"
            )
    return compiled


def compiled_facts(model: torch.nn.Module) -> dict[str, Any]:
    """``run.json``'s ``compiled`` for a model compiled by ``torch.compile``."""
    backend = None
    wrapper = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    for _ in range(8):  # Dynamo wraps the backend a few times; the innermost one knows its name
        if wrapper is None or backend is not None:
            break
        backend = getattr(wrapper, "compiler_name", None)
        wrapper = next((getattr(wrapper, a) for a in ("_torchdynamo_orig_backend", "_compiler_fn") if hasattr(wrapper, a)), None)
    return {"mode": "compiled", "backend": str(backend or "torch.compile"), "cudagraphs": False}


def is_compiled(model: torch.nn.Module) -> bool:
    """``torch.compile(model)``'s wrapper, or a module compiled in place with ``model.compile()``."""
    return hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose names the run uses: ``torch.compile`` adds an ``_orig_mod.`` in front of every one."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else model


# -- the structure of a call, as a constant string ----------------------------------------------


def _tensor_leaves(value: Any, path: tuple[str, ...], out_t: list[torch.Tensor], out_s: list[str]) -> None:
    """Walk ``value`` as the reference does (what Dynamo can trace): tensors out, the rest described."""
    if isinstance(value, torch.Tensor):
        out_t.append(value)
        out_s.append(_FIELD.join(("T", _PART.join(path))))
    elif isinstance(value, (list, tuple)) and len(path) <= 32:
        if isinstance(value, list):
            out_s.append(_FIELD.join(("L", _PART.join(path))))
        for i, v in enumerate(value):
            _tensor_leaves(v, (*path, str(i)), out_t, out_s)
    elif isinstance(value, dict) and len(path) <= 32:
        out_s.append(_FIELD.join(("D", _PART.join(path))))
        for k, v in value.items():
            _tensor_leaves(v, (*path, str(k)), out_t, out_s)
    else:
        out_s.append(_FIELD.join(("C", _PART.join(path), *_constant(value))))


def _constant(v: Any) -> tuple[str, str]:
    """``(kind, literal)`` of a non-tensor argument: its value where a literal holds it, else its type."""
    if v is None or isinstance(v, (bool, str)) or type(v) in (int, float):
        return "literal", repr(v)
    if isinstance(v, torch.dtype):
        return "dtype", repr(str(v))
    if isinstance(v, torch.device):
        return "device", repr(str(v))
    if isinstance(v, torch.nn.Module):
        return "module", repr(type(v).__name__)
    return "object", repr(f"{type(v).__module__}.{type(v).__qualname__}")


@functools.lru_cache(maxsize=4096)
def _parse(leaves: str) -> tuple[tuple[str, tuple[str, ...], Any], ...]:
    """``(kind, path, constant)``: ``T`` a tensor, ``C`` a constant, ``L`` / ``D`` a list / dict container."""
    out: list[tuple[str, tuple[str, ...], Any]] = []
    for entry in leaves.split(_ENTRY) if leaves else []:
        f = entry.split(_FIELD)
        path = tuple(f[1].split(_PART)) if f[1] else ()
        out.append((f[0], path, _constant_value(f[2], f[3]) if f[0] == "C" else None))
    return tuple(out)


UNKEPT = "<not kept by the compiled graph>"


def _constant_value(kind: str, literal: str) -> Any:
    """The argument again: a literal, dtype or device as itself; anything else as a stand-in that
    describes itself as the eager capture would, less what the graph did not keep."""
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        return _Unkept("object", "object")
    if kind == "literal":
        return value
    if kind == "dtype" and isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        return dtype if isinstance(dtype, torch.dtype) else _Unkept("dtype", value)
    if kind == "device" and isinstance(value, str):
        return torch.device(value)
    return _Unkept(kind, str(value))


class _Unkept:
    """A module or object argument of a compiled call (``schema`` asks for these descriptions)."""

    def __init__(self, kind: str, name: str) -> None:
        short = name.rsplit(".", 1)[-1]
        self.__tensorlog_value__ = {"type": "module", "class_name": name} if kind == "module" else {"type": name}
        self.__tensorlog_reference__ = {"type": short, "string_repr": UNKEPT}

    def __repr__(self) -> str:
        return UNKEPT


def _rebuild(xs: list[torch.Tensor], leaves: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's ``(args, kwargs)`` again, from the tensors and the traced structure."""
    it = iter(xs)
    root: dict[str, Any] = {}
    kinds: dict[tuple[str, ...], str] = {}
    for kind, path, constant in _parse(leaves):
        if kind in ("L", "D"):
            kinds[path] = kind
            node = root
            for part in path:
                node = node.setdefault(part, {})
            continue
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = next(it) if kind == "T" else constant

    def build(node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return node
        items = {k: build(v, (*path, k)) for k, v in node.items()}
        if kinds.get(path) == "D":
            return items
        seq = [items[str(i)] for i in range(len(items))] if set(items) == {str(i) for i in range(len(items))} else None
        if seq is None:
            return items
        return seq if kinds.get(path) == "L" else tuple(seq)

    args = tuple(build(root[k], (k,)) for k in sorted((k for k in root if k.isdigit()), key=int))
    kwargs = {k: build(v, (k,)) for k, v in root.items() if not k.isdigit()}
    return args, kwargs


# -- the hooks ----------------------------------------------------------------------------------


class TapHooks:
    """Permanent tap hooks on the selected modules, reporting to the recorder; the interface of ModuleHooks.

    At run time each call is rebuilt from the op's arguments and handed to the
    recorder in graph order, as an eager hook would hand it; outside a step the
    op returns at once.
    """

    def __init__(
        self, recorder: Recorder, targets: dict[str, tuple[weakref.ref[torch.nn.Module], frozenset[int] | None]]
    ) -> None:
        self.recorder = recorder
        self.targets = {n: t for n, t in targets.items() if not isinstance(t[0](), (torch.nn.ModuleList, torch.nn.ModuleDict))}
        """Containers are never called, so they are left out of what a compiled graph should show."""
        self.seen: set[str] = set()
        """Modules whose calls reached the op in a logged step."""
        self.reasons: dict[str, str] = {}
        """Why a module may not be seen, where more is known than NOT_SEEN."""
        self._handles: list[RemovableHandle] = []
        self._wrapped: list[torch.nn.Module] = []
        self._sites: list[int] = []
        self._early: dict[str, list[Any]] = {}
        """Outputs whose tap ran before the call's inputs' tap: Inductor's peak-memory reordering of
        torch 2.13 can move an effectful op past another; the call is recorded when its inputs arrive."""
        self._unseen: list[str] | None = None

    def observed(self, facts: dict[str, Any]) -> dict[str, Any] | None:
        """``run.json``'s ``compiled`` (``facts`` plus what no logged step has seen yet), when that list changed."""
        unseen = sorted(set(self.targets) - self.seen)
        if unseen == self._unseen:
            return None
        self._unseen = unseen
        if unseen and not self.seen:
            warnings.warn(
                "tensorlog: no selected module of the compiled model was seen in a logged step: its graph was "
                "probably compiled before capture started (torch.compile keeps graphs compiled without the taps); "
                "call torch.compiler.reset() first, or start capture before the model's first call",
                RuntimeWarning,
                stacklevel=4,
            )
        return {"compiled": {**facts, "not_observable": {m: self.reasons.get(m, NOT_SEEN) for m in unseen}}}

    @property
    def attached(self) -> bool:
        return bool(self._handles or self._wrapped)

    def attach(self) -> None:
        if self.attached:
            return
        for name, (ref, calls) in self.targets.items():
            module = ref()
            if module is None:
                continue
            pre, post = self._site(self._pre_fn(name, type(module).__name__, calls)), self._site(self._post_fn(name))
            if type(module).__call__ is not torch.nn.Module.__call__:  # hooks would never run (vLLM's compiled `model`)
                self._wrap_forward(module, pre, post)
                self.reasons[name] = OWN_CALL
                continue
            self._handles.append(module.register_forward_pre_hook(_pre_hook(pre), with_kwargs=True))
            self._handles.append(module.register_forward_hook(_post_hook(post)))

    def _wrap_forward(self, module: torch.nn.Module, pre: int, post: int) -> None:
        """Taps around the instance's ``forward``: what a compiler traces when it compiles that forward."""
        forward = module.forward
        pre_hook, post_hook = _pre_hook(pre), _post_hook(post)

        @functools.wraps(forward)
        def tapped_forward(*args: Any, **kwargs: Any) -> Any:
            pre_hook(module, args, kwargs)
            out = forward(*args, **kwargs)
            post_hook(module, args, out)
            return out

        module.__dict__["forward"] = tapped_forward
        self._wrapped.append(module)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for module in self._wrapped:
            module.__dict__.pop("forward", None)
        self._wrapped = []
        with _lock:
            for s in self._sites:
                _sites.pop(s, None)
        self._sites = []

    def _site(self, fn: Callable[[list[torch.Tensor], str], None]) -> int:
        with _lock:
            site = next(_ids)
            _sites[site] = fn
        self._sites.append(site)
        return site

    def _pre_fn(self, name: str, cls: str, calls: frozenset[int] | None) -> Callable[[list[torch.Tensor], str], None]:
        rec = self.recorder

        def enter(xs: list[torch.Tensor], leaves: str) -> None:
            if rec.in_step:
                args, kwargs = _rebuild(xs, leaves)
                rec.enter(name, cls, args, kwargs, calls)
                early = self._early.get(name)
                if early:  # its outputs' tap ran first: the call is whole now
                    rec.leave(name, early.pop(0))

        return enter

    def _post_fn(self, name: str) -> Callable[[list[torch.Tensor], str], None]:
        rec = self.recorder

        def leave(xs: list[torch.Tensor], leaves: str) -> None:
            if rec.in_step:
                self.seen.add(name)
                args, _ = _rebuild(xs, leaves)
                output = args[0] if args else None
                if rec.open_calls(name):
                    rec.leave(name, output)
                else:
                    self._early.setdefault(name, []).append(output)

        return leave

    def begin_step(self) -> None:
        self._early = {}


def _pre_hook(site: int) -> Callable[..., None]:
    def pre(module: torch.nn.Module, args: tuple[Any, ...], *rest: dict[str, Any]) -> None:
        kwargs = rest[0] if rest else {}  # none: torch saw the hook removed mid-call (see hooks.hook_arguments)
        xs: list[torch.Tensor] = []
        desc: list[str] = []
        for i, a in enumerate(args):
            _tensor_leaves(a, (str(i),), xs, desc)
        for k, v in kwargs.items():
            _tensor_leaves(v, (str(k),), xs, desc)
        _tap(xs, site, _ENTRY.join(desc))

    return pre


def _post_hook(site: int) -> Callable[..., None]:
    def post(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        xs: list[torch.Tensor] = []
        desc: list[str] = []
        _tensor_leaves(output, ("0",), xs, desc)
        _tap(xs, site, _ENTRY.join(desc))

    return post


class StepOps:
    """Root hooks that open and close a step through an op, so a traced root still delimits steps."""

    def __init__(self, model: torch.nn.Module, on_begin: Callable[[], None], on_end: Callable[[], None]) -> None:
        self._on = {0: on_begin, 1: on_end}
        with _lock:
            self.id = next(_ids)
            _steps[self.id] = self._phase
        handle = self.id

        def pre(module: torch.nn.Module, args: Any) -> None:
            _step(handle, 0)

        def post(module: torch.nn.Module, args: Any, output: Any) -> None:
            _step(handle, 1)

        self._handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]

    def _phase(self, phase: int) -> None:
        self._on[phase]()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        with _lock:
            _steps.pop(self.id, None)
