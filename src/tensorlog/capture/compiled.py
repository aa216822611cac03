"""Capture inside ``torch.compile`` / Inductor graphs: hooks whose only work is a graph op.

Ordinary capture hooks run Python that Dynamo cannot put in a graph, so a
compiled model either breaks its graph at every hook or (as vLLM does, tracing
once and skipping guards) never runs them. Here each selected module gets
permanent pre and post hooks whose whole body is one call of the custom op
``tensorlog::tap(tensors, site, leaves)``; Dynamo inlines the hooks and the op
lands in the graph. The op is registered as *effectful* (ordered), so Inductor
keeps it, in program order, and does not fuse it away; its kernel is a call
back into tensorlog that records the call exactly as an eager hook would.
``leaves`` is the call's serialised spec (:mod:`tensorlog.schema.tree`, the
codec every side shares), a constant string built while the call is traced
that tells where each tensor sat and what the non-tensor arguments were. The
step boundary is an op too (``tensorlog::step``), so a root module that Dynamo
traces (capture before compile) still opens and closes steps.

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
from ..schema.tree import Opaque, Spec, SpecError, constant_value, encode_call, unflatten
from .graphtap import GraphTaps, emit, ordered_effect, step_tensors
from .recorder import Recorder

__all__ = [
    "TapHooks",
    "StepOps",
    "tap_inputs",
    "tap_output",
    "call_leaves",
    "output_leaves",
    "rebuild",
    "ids_of",
    "eager_only",
    "traced_site",
    "traced_owner",
    "forget_owner",
    "graph_step",
    "is_compiled",
    "unwrap_compiled",
    "compiled_mode",
    "compiled_facts",
    "NOT_SEEN",
    "OWN_CALL",
]

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


_graph_steps: dict[int, Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None]] = {}


@custom_op("tensorlog::graph_step", mutates_args=("table",))
def _graph_step(table: torch.Tensor, staged: list[torch.Tensor], names: str, handle: int, phase: int) -> None:
    """A step boundary inside a graph whose calls are native taps: it writes the table (the step's start), or
    reads it and the staged copies (the step's end), so the graph orders it after the taps."""
    fn = _graph_steps.get(handle)
    if fn is not None:
        fn(phase, table, dict(zip(names.split(","), staged)) if names else {})


@_graph_step.register_fake
def _graph_step_fake(table: torch.Tensor, staged: list[torch.Tensor], names: str, handle: int, phase: int) -> None:
    return None


ordered_effect(_tap)
ordered_effect(_step)
ordered_effect(_graph_step)


NOT_SEEN = (
    "selected, but no logged step of the compiled model called it as a module: not called in those steps, "
    "or compiled where the graph keeps no call of it"
)


OWN_CALL = (
    "its class replaces nn.Module.__call__ and compiles its own forward (vLLM's decorator does): the graph "
    "has no call of it to tap; its first submodule's inputs and its last one's outputs are logged"
)


def eager_only(config: LogConfig) -> list[str]:
    """The options asked for that only eager capture has (their hooks run Python that a graph cannot hold)."""
    found = [
        f"level: {config.level}" if config.level != "module" else "",
        "data_mode: backward" if "backward" in config.passes else "",
        "reload_input_dir" if config.reload_input_dir else "",
        "stack: true" if config.stack else "",
        "compiled: eager" if config.compiled == "eager" else "",
    ]
    return [x for x in found if x]


def compiled_mode(config: LogConfig, model: torch.nn.Module, engine: bool | None) -> bool:
    """Whether to capture with taps; ``engine`` is an integration's word that the model will be compiled.

    Raises:
        ConfigError: an option that only eager capture has was asked for a compiled capture.
    """
    if config.compiled == "eager":
        return False
    compiled = config.compiled == "compiled" or (engine if engine is not None else is_compiled(model))
    if compiled and config.enabled:
        found = eager_only(config)
        if found:
            raise ConfigError(
                f"{', '.join(found)} needs eager capture, and this model is compiled: "
                "set compiled: 'eager' (a compiled model then breaks its graph at each hook), or drop the option"
            )
    return compiled


_owners: dict[int, Callable[[str, str], tuple[int, int]]] = {}


def traced_owner(fn: Callable[[str, str], tuple[int, int]]) -> int:
    """Register what answers :func:`traced_site` for one capture; returns its key."""
    with _lock:
        key = next(_ids)
        _owners[key] = fn
    return key


def forget_owner(key: int) -> None:
    with _lock:
        _owners.pop(key, None)


@torch._dynamo.assume_constant_result
def traced_site(owner: str, name: str, kind: str) -> tuple[int, int]:
    """At trace time, for an eager hook being traced: ``(site, native taps)`` of ``name``'s ``pre``/``post``
    tap, or of the root's step op (``kind`` ``root``). Run once and baked in: no guard, no graph break.
    ``owner`` is :func:`traced_owner`'s key as a string, which Dynamo never makes a symbol (see :func:`ids_of`)."""
    fn = _owners.get(int(owner))
    return (0, 0) if fn is None else fn(name, kind)


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


UNKEPT = "<not kept by the compiled graph>"


class _Unkept(Opaque):
    """A module or object argument of a compiled call (``schema`` asks for these descriptions)."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.__tensorlog_reference__ = {"type": name.rsplit(".", 1)[-1], "string_repr": UNKEPT}

    def __repr__(self) -> str:
        return UNKEPT


@functools.lru_cache(maxsize=4096)
def _constant_value(kind: str, literal: str) -> Any:
    """The argument again: a literal, dtype or device as itself; anything else as a stand-in that
    describes itself as the eager capture would, less what the graph did not keep."""
    return constant_value(kind, literal, _Unkept)


def rebuild(xs: list[Any], leaves: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's ``(args, kwargs)`` again, from the tensors and the traced spec (:func:`call_leaves`)."""
    spec = Spec.loads(leaves)
    if spec.kind != "call":
        raise SpecError(f"a tap's spec is a {spec.kind}, not a call")
    args, kwargs = unflatten(spec, xs, const=_constant_value)
    return args, kwargs


# -- the hooks ----------------------------------------------------------------------------------


class TapHooks:
    """Permanent tap hooks on the selected modules, reporting to the recorder; the interface of ModuleHooks.

    At run time each call is rebuilt from the op's arguments and handed to the
    recorder in graph order, as an eager hook would hand it; outside a step the
    op returns at once.
    """

    def __init__(
        self,
        recorder: Recorder,
        targets: dict[str, tuple[weakref.ref[torch.nn.Module], frozenset[int] | None]],
        native: GraphTaps | None = None,
    ) -> None:
        self.recorder = recorder
        self.native = native
        """Graph-native taps (:mod:`.graphtap`), or None for callback taps only."""
        self.kinds: dict[str, str] = {}
        """How each module seen was tapped: ``graph`` (native) or ``callback``."""
        self._kind = "callback"
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
        self._kinds_said: dict[str, str] = {}
        self._warned_over = False
        self._named: dict[tuple[str, str], int] = {}

    def observed(self, facts: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """``run.json``'s ``compiled``: ``facts``, how each module was tapped and what no logged step has seen
        yet; and whether that changed (news, written at once)."""
        unseen = sorted(set(self.targets) - self.seen)
        kinds = dict(sorted(self.kinds.items()))
        doc = {"compiled": {**facts, "taps": kinds, "not_observable": {m: self.reasons.get(m, NOT_SEEN) for m in unseen}}}
        if unseen == self._unseen and kinds == self._kinds_said:
            return False, doc
        self._unseen, self._kinds_said = unseen, kinds
        if unseen and not self.seen:
            warnings.warn(
                "tensorlog: no selected module of the compiled model was seen in a logged step: its graph was "
                "probably compiled before capture started (torch.compile keeps graphs compiled without the taps); "
                "call torch.compiler.reset() first, or start capture before the model's first call",
                RuntimeWarning,
                stacklevel=4,
            )
        return True, doc

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
            native = self.native.id if self.native is not None else 0
            self._handles.append(module.register_forward_pre_hook(_pre_hook(pre, native), with_kwargs=True))
            self._handles.append(module.register_forward_hook(_post_hook(post, native)))

    def _wrap_forward(self, module: torch.nn.Module, pre: int, post: int) -> None:
        """Taps around the instance's ``forward``: what a compiler traces when it compiles that forward."""
        forward = module.forward
        native = self.native.id if self.native is not None else 0
        pre_hook, post_hook = _pre_hook(pre, native), _post_hook(post, native)

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
        if self.native is not None:
            self.native.close()

    def replay(self, table: torch.Tensor | None = None, staged: dict[str, torch.Tensor] | None = None) -> None:
        """The step's native tap calls, from the graph's table, to the recorder in the order they ran."""
        if self.native is None:
            return

        def each(site: int, values: list[Any], leaves: str, late: bool) -> None:
            self._kind = "callback" if late else "graph"  # a site traced after the table filled up calls back
            _call_site(site, values, leaves)

        try:
            self.native.replay(each, table, staged)
        finally:
            self._kind = "callback"
        if self.native.over and not self._warned_over:
            self._warned_over = True
            why, n = next(iter(self.native.over.items()))
            warnings.warn(
                f"tensorlog: {n} tensor(s) of step {self.recorder.state.index} not kept: {why}", RuntimeWarning, stacklevel=2
            )

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
                args, kwargs = rebuild(xs, leaves)
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
                self.kinds[name] = self._kind
                args, _ = rebuild(xs, leaves)
                output = args[0] if args else None
                if rec.open_calls(name):
                    rec.leave(name, output)
                else:
                    self._early.setdefault(name, []).append(output)

        return leave

    def begin_step(self) -> None:
        self._early = {}

    def site_of(self, name: str, kind: str) -> int:
        """The ``pre``/``post`` site of a target module, made on first use (eager hooks that a compiler traces)."""
        key = (name, kind)
        site = self._named.get(key)
        if site is None:
            ref, calls = self.targets[name]
            module = ref()
            fn = self._pre_fn(name, type(module).__name__, calls) if kind == "pre" else self._post_fn(name)
            site = self._named[key] = self._site(fn)
        return site


def _call_site(site: int, xs: list[Any], leaves: str) -> None:
    fn = _sites.get(site)
    if fn is not None:
        fn(xs, leaves)


def call_leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], str]:
    """A call's tensors and its serialised spec, one constant string (what :func:`rebuild` takes back)."""
    return encode_call(args, kwargs)


def output_leaves(output: Any) -> tuple[list[torch.Tensor], str]:
    """A call's output as :func:`call_leaves` describes its arguments (one positional argument)."""
    return call_leaves((output,), {})


def tap_inputs(site: int, native: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A call's inputs into the graph: a native tap while traced (``native`` names its :class:`GraphTaps`),
    else the callback op."""
    _send(site, native, *call_leaves(args, kwargs))


@torch._dynamo.assume_constant_result
def ids_of(ids: str) -> tuple[int, int]:
    """Two ids that a hook's closure holds as one string. Dynamo may compile a hook as a frame of its own (it
    does after the model raised) and then treats the ints of closures it has seen differ as symbols, which no
    traced tap can take; a string stays a constant."""
    a, b = ids.split(":")
    return int(a), int(b)


def tap_output(site: int, native: int, output: Any) -> None:
    _send(site, native, *output_leaves(output))


def _send(site: int, native: int, xs: list[torch.Tensor], desc: str) -> None:
    if native and torch.compiler.is_compiling():
        emit(native, site, desc, xs)
    else:
        _tap(xs, site, desc)


def _pre_hook(site: int, native: int = 0) -> Callable[..., None]:
    ids = f"{site}:{native}"

    def pre(module: torch.nn.Module, args: tuple[Any, ...], *rest: dict[str, Any]) -> None:
        s, n = ids_of(ids)
        tap_inputs(s, n, args, rest[0] if rest else {})  # none: torch saw the hook removed mid-call

    return pre


def _post_hook(site: int, native: int = 0) -> Callable[..., None]:
    ids = f"{site}:{native}"

    def post(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        s, n = ids_of(ids)
        tap_output(s, n, output)

    return post


def graph_step(handle: int, native: int, phase: int) -> None:
    """The step op; in a graph with native taps, ordered around them through their table (see :class:`StepOps`)."""
    if native and torch.compiler.is_compiling():
        table, staged, names = step_tensors(native, phase == 1)
        _graph_step(table, staged, names, handle, phase)
    else:
        _step(handle, phase)


class StepOps:
    """Root hooks that open and close a step through an op, so a traced root still delimits steps.

    With native taps the op reads and writes their table, so a graph orders it around them; its callback
    gets the graph's own values (``table``, ``staged``), or None when the root runs outside any graph.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        on_begin: Callable[[torch.Tensor | None], None],
        on_end: Callable[[torch.Tensor | None, dict[str, torch.Tensor] | None], None],
        native: GraphTaps | None = None,
    ) -> None:
        self._begin, self._end = on_begin, on_end
        self.native = native
        with _lock:
            self.id = next(_ids)
            _steps[self.id] = self._phase
            _graph_steps[self.id] = self._graph_phase
        ids = f"{self.id}:{native.id if native is not None else 0}"

        def pre(module: torch.nn.Module, args: Any) -> None:
            handle, taps = ids_of(ids)
            graph_step(handle, taps, 0)

        def post(module: torch.nn.Module, args: Any, output: Any) -> None:
            handle, taps = ids_of(ids)
            graph_step(handle, taps, 1)

        self._handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)] if model is not None else []

    def _phase(self, phase: int) -> None:
        if phase == 0:
            self._begin(None)
        else:
            self._end(None, None)

    def _graph_phase(self, phase: int, table: torch.Tensor, staged: dict[str, torch.Tensor]) -> None:
        if phase == 0:
            self._begin(table)
        else:
            self._end(table, staged)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        with _lock:
            _steps.pop(self.id, None)
            _graph_steps.pop(self.id, None)
