"""One codec for a call's structure: ``flatten`` a value into leaves and a :class:`Spec`, ``unflatten`` it back.

Every side that writes or rebuilds a call uses it: the recorder names leaves
and stores the ``structure`` dict (:func:`to_structure`), compiled taps carry
the spec as one constant string (:func:`encode_call`, what Dynamo traces),
replay rebuilds a call from a stored ``structure`` (:func:`from_structure`), and
``reload_input_dir`` rebuilds the live call with other tensors. As in
``torch.utils._pytree``, the spec holds the containers; the leaves are what the
caller keeps (every leaf, or only the tensors, with the rest described in the
spec, never pickled).

The serialised spec is a prefix walk, one token per node, tokens joined by
``\\x1e`` and a token's fields by ``\\x1f`` (a ``repr`` never holds either):
``T`` a kept leaf, ``C kind literal`` a described leaf, ``L n`` / ``U n`` a
list / tuple of ``n`` nodes, ``D 'k'...`` a dict (its keys as ``repr``),
``A n 'k'...`` a call of ``n`` positional and the named keyword arguments.
A spec read from elsewhere (a string, a stored ``structure``) is checked
whole: anything malformed is a :class:`SpecError`, and nesting is bounded.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import torch

from ..errors import RunReadError

__all__ = [
    "Spec",
    "SpecError",
    "Leaf",
    "Opaque",
    "flatten",
    "flatten_call",
    "call_structure",
    "encode_call",
    "unflatten",
    "to_structure",
    "from_structure",
    "describe_constant",
    "constant_value",
    "unique_key",
    "MAX_DEPTH",
]

MAX_DEPTH = 32
"""A container whose path is longer than this is a leaf."""

_FIELD, _ENTRY = "\x1f", "\x1e"
_CONSTANTS = frozenset({"literal", "dtype", "device", "module", "object"})
_LEAF_KINDS = frozenset({"leaf", "const"})

Leaf = tuple[tuple[str, ...], Any]
"""``(path, value)``: the path's parts join into the file stem after the kind (``inputs`` + ``0_1``)."""
Kind = Literal["leaf", "const", "list", "tuple", "dict", "call"]


class SpecError(RunReadError):
    """A serialised spec or a stored ``structure`` that no flatten wrote: truncated, altered or hostile."""


@dataclass(frozen=True)
class Spec:
    """A node of a flattened value. Equal specs serialise to the same string.

    ``kind`` is ``leaf`` (kept), ``const`` (described by ``const``: ``(kind, literal)``), ``list``,
    ``tuple``, ``dict`` (``keys``: one per child, unique) or ``call`` (the root of a call:
    positional children, then one per name in ``keys``). ``cls`` and ``originals`` (a dict's own
    keys) are what a live flatten saw; they are not serialised, so a spec read back rebuilds
    plain tuples, lists and dicts with string keys.
    """

    kind: Kind
    children: tuple[Spec, ...] = ()
    keys: tuple[str, ...] = ()
    const: tuple[str, str] | None = None
    cls: type | None = field(default=None, compare=False, repr=False)
    originals: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def nargs(self) -> int:
        """A call's positional arguments."""
        return len(self.children) - len(self.keys)

    @property
    def num_leaves(self) -> int:
        """Leaves that :func:`unflatten` takes: the kept ones (described ones live in the spec)."""
        if self.kind in _LEAF_KINDS:
            return int(self.kind == "leaf")
        return sum(c.num_leaves for c in self.children)

    def dumps(self) -> str:
        """The spec as one string: what a compiled tap carries as a constant."""
        out: list[str] = []
        self._tokens(out)
        return _ENTRY.join(out)

    def _tokens(self, out: list[str]) -> None:
        if self.kind == "leaf":
            out.append("T")
        elif self.kind == "const" and self.const is not None:
            out.append(_FIELD.join(("C", *self.const)))
        elif self.kind in ("list", "tuple"):
            out.append(("L" if self.kind == "list" else "U") + _FIELD + str(len(self.children)))
        elif self.kind == "dict":
            out.append("D" + "".join(_FIELD + repr(k) for k in self.keys))
        else:
            out.append("A" + _FIELD + str(self.nargs) + "".join(_FIELD + repr(k) for k in self.keys))
        for c in self.children:
            c._tokens(out)

    @staticmethod
    def loads(text: str) -> Spec:
        """A serialised spec read back.

        Raises:
            SpecError: ``text`` is not a spec that :meth:`dumps` writes.
        """
        if not isinstance(text, str):
            raise SpecError(f"a serialised spec is a string, not {type(text).__name__}")
        return _loads(text)


_LEAF = Spec("leaf")


# -- flatten: one walk, which Dynamo traces -----------------------------------------------------


def _walk(
    value: Any, path: tuple[str, ...], everything: bool, leaves: list[Leaf], tokens: list[str], live: list[Any] | None
) -> None:
    """Append ``value``'s leaves and tokens in prefix order; ``live`` gets each container's type (and a dict's
    own keys). Only constant-foldable work, so that a compiled hook holds no graph break."""
    if isinstance(value, torch.Tensor):
        leaves.append((path, value))
        tokens.append("T")
        return
    if len(path) <= MAX_DEPTH:
        if isinstance(value, (list, tuple)):
            tokens.append(("L" if isinstance(value, list) else "U") + _FIELD + str(len(value)))
            if live is not None:
                live.append((type(value), None))
            for i, v in enumerate(value):
                _walk(v, (*path, str(i)), everything, leaves, tokens, live)
            return
        if isinstance(value, dict):
            taken: dict[str, None] = {}  # ordered, and O(1) to ask: a dict of 10^4 keys is walked in linear time
            for k in value:
                taken[unique_key(str.__str__(str(k)), taken)] = None  # a plain str: its repr is str's own
            keys = list(taken)
            tokens.append("D" + "".join(_FIELD + repr(k) for k in keys))
            if live is not None:
                live.append((type(value), tuple(value)))
            for key, v in zip(keys, value.values()):
                _walk(v, (*path, key), everything, leaves, tokens, live)
            return
    if everything:
        leaves.append((path, value))
        tokens.append("T")
    else:
        tokens.append(_FIELD.join(("C", *describe_constant(value))))


def unique_key(key: str, taken: Container[str]) -> str:
    """``key``, or ``key~<n>`` when the dict already has a key that reads the same (``0`` and ``"0"``).

    Each value keeps its own leaf, file and json entry: the reference writes both to one file, the second
    overwriting the first.
    """
    out, n = key, 0
    while out in taken:
        n += 1
        out = f"{key}~{n}"
    return out


def _call_tokens(
    args: tuple[Any, ...], kwargs: dict[str, Any], everything: bool, live: list[Any] | None
) -> tuple[list[Leaf], list[str]]:
    leaves: list[Leaf] = []
    tokens = ["A" + _FIELD + str(len(args)) + "".join(_FIELD + repr(str(k)) for k in kwargs)]
    for i, a in enumerate(args):
        _walk(a, (str(i),), everything, leaves, tokens, live)
    for k, v in kwargs.items():
        _walk(v, (str(k),), everything, leaves, tokens, live)
    return leaves, tokens


def flatten(value: Any, path: tuple[str, ...] = (), *, tensors_only: bool = False, live: bool = True) -> tuple[list[Leaf], Spec]:
    """``value``'s leaves as ``(path, value)`` in the reference's order, and the spec that rebuilds it.

    Args:
        value: any nesting of lists, tuples (named tuples too) and dicts; a container deeper than
            :data:`MAX_DEPTH` is a leaf.
        path: the path of ``value`` itself (its leaves' paths extend it).
        tensors_only (bool, default False): keep only tensors as leaves; describe the rest in the spec.
        live (bool, default True): record the containers' types (named tuples, dict types, a dict's
            own keys) for :func:`unflatten`; False gives a spec shared by every value of that shape.

    Returns:
        The leaves and a :class:`Spec` that knows the live containers' types.

    Example:
        >>> leaves, spec = flatten({"a": (t, 1)})
        >>> unflatten(spec, [v for _, v in leaves])
        {'a': (t, 1)}
    """
    leaves: list[Leaf] = []
    tokens: list[str] = []
    types: list[Any] | None = [] if live else None
    _walk(value, path, not tensors_only, leaves, tokens, types)
    return leaves, (_read(tokens, types, len(path)) if types is not None else _loads(_ENTRY.join(tokens)))


def flatten_call(
    args: tuple[Any, ...], kwargs: dict[str, Any] | None, *, tensors_only: bool = False, live: bool = True
) -> tuple[list[Leaf], Spec]:
    """A call's leaves (positional, then keyword arguments, each named after its position or keyword) and its
    ``call`` spec; ``live`` False skips the containers' types (a spec shared by every call of that shape)."""
    types: list[Any] | None = [] if live else None
    leaves, tokens = _call_tokens(args, kwargs or {}, not tensors_only, types)
    return leaves, (_read(tokens, types, 0) if types is not None else _loads(_ENTRY.join(tokens)))


def call_structure(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> tuple[list[Leaf], dict[str, Any]]:
    """A call's leaves and its stored structure (:func:`to_structure`), for the hook: the structure is built once
    per call shape and shared by every call of that shape, so it is read-only."""
    leaves, tokens = _call_tokens(args, kwargs or {}, True, None)
    text = _ENTRY.join(tokens)
    return leaves, (_structure(text) if len(text) <= _CACHED_TEXT else to_structure(_read(tokens, None, 0)))


_CACHED_TEXT = 8192
"""Longest spec text kept in a cache: call shapes repeat, but a dict keyed by ever-new ids would fill a cache of
big ones (at most 1024 entries of this size each)."""


@lru_cache(maxsize=1024)
def _structure(text: str) -> dict[str, Any]:
    return to_structure(_loads(text))


def encode_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], str]:
    """A call's tensors and its serialised spec, the rest described in it: ``flatten_call(args, kwargs,
    tensors_only=True)`` with its spec dumped, in a form that Dynamo folds into a constant."""
    leaves, tokens = _call_tokens(args, kwargs, False, None)
    return [v for _, v in leaves], _ENTRY.join(tokens)


# -- reading a spec back ------------------------------------------------------------------------


def _count(text: str, most: int) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or int(text) > most:
        raise SpecError(f"a spec's count {text[:20]!r} is not a count of the nodes that follow")
    return int(text)


def _key(text: str) -> str:
    if not text.startswith(("'", '"')):
        raise SpecError(f"a spec's key {text[:40]!r} is not a quoted string")
    key = _literal(text, None)
    if not isinstance(key, str):
        raise SpecError(f"a spec's key {text[:40]!r} is not a quoted string")
    return key


def _literal(text: str, default: Any) -> Any:
    """The Python literal ``text`` holds, else ``default``; quietly (an altered spec's bad escape is no warning
    of the caller's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return default


def _keys(fields: Sequence[str]) -> tuple[str, ...]:
    keys = tuple(_key(f) for f in fields)
    if len(set(keys)) != len(keys):
        raise SpecError(f"a spec's dict names one key twice: {sorted(keys)[:10]}")
    return keys


def _loads(text: str) -> Spec:
    return _cached_loads(text) if len(text) <= _CACHED_TEXT else _read(text.split(_ENTRY), None, 0)


@lru_cache(maxsize=1024)
def _cached_loads(text: str) -> Spec:
    return _read(text.split(_ENTRY), None, 0)


def _read(tokens: list[str], live: list[Any] | None, depth: int) -> Spec:
    """The spec of ``tokens``; ``live`` holds the containers' types in the same order, where a walk saw them."""
    pos = 0
    seen = 0

    def node(depth: int, root: bool) -> Spec:
        nonlocal pos, seen
        if pos >= len(tokens):
            raise SpecError("a serialised spec ends before its last node")
        fields = tokens[pos].split(_FIELD)
        pos += 1
        head, rest = fields[0], fields[1:]
        if head == "T" and not rest:
            return _LEAF
        if head == "C" and len(rest) == 2 and rest[0] in _CONSTANTS:
            return Spec("const", const=(rest[0], rest[1]))
        if head == "A" and root and rest:
            nargs = _count(rest[0], len(tokens) - pos)
            keys = _keys(rest[1:])
            return Spec("call", tuple(node(depth + 1, False) for _ in range(nargs + len(keys))), keys)
        if head in ("L", "U", "D") and depth > MAX_DEPTH:
            raise SpecError(f"a spec nests containers deeper than {MAX_DEPTH}, where a flatten makes them leaves")
        cls, originals = (None, None)
        if live is not None and head in ("L", "U", "D"):
            cls, originals = live[seen]
            seen += 1
        if head in ("L", "U") and len(rest) == 1:
            n = _count(rest[0], len(tokens) - pos)
            return Spec("list" if head == "L" else "tuple", tuple(node(depth + 1, False) for _ in range(n)), cls=cls)
        if head == "D":
            keys = _keys(rest)
            if len(keys) > len(tokens) - pos:
                raise SpecError("a spec's dict has more keys than nodes follow")
            return Spec("dict", tuple(node(depth + 1, False) for _ in keys), keys, cls=cls, originals=originals)
        raise SpecError(f"a serialised spec holds a token it cannot read: {tokens[pos - 1][:40]!r}")

    spec = node(depth, True)
    if pos != len(tokens):
        raise SpecError(f"a serialised spec has {len(tokens) - pos} token(s) after its last node")
    return spec


# -- unflatten ----------------------------------------------------------------------------------


class Opaque:
    """A described leaf that is not a literal, dtype or device (a module, any object): a stand-in that
    describes itself as :func:`tensorlog.schema.leaves.describe_value` would have described the value."""

    def __init__(self, kind: str, name: str) -> None:
        self.__tensorlog_value__ = {"type": "module", "class_name": name} if kind == "module" else {"type": name}


def describe_constant(v: Any) -> tuple[str, str]:
    """``(kind, literal)`` of a leaf the spec describes: its value where a literal holds it, else its type."""
    if v is None or isinstance(v, (bool, str)) or type(v) in (int, float):
        return "literal", repr(v)
    if isinstance(v, torch.dtype):
        return "dtype", repr(str(v))
    if isinstance(v, torch.device):
        return "device", repr(str(v))
    if isinstance(v, torch.nn.Module):
        return "module", repr(type(v).__name__)
    return "object", repr(f"{type(v).__module__}.{type(v).__qualname__}")


def constant_value(kind: str, literal: str, opaque: Callable[[str, str], Any] = Opaque) -> Any:
    """A described leaf again: a literal, dtype or device as itself, anything else as ``opaque(kind, name)``."""
    value = _literal(literal, _END)
    if value is _END:
        return opaque("object", "object")
    if kind == "literal":
        return value
    if kind == "dtype" and isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        return dtype if isinstance(dtype, torch.dtype) else opaque("dtype", value)
    if kind == "device" and isinstance(value, str):
        try:
            return torch.device(value)
        except (RuntimeError, ValueError):
            return opaque("device", value)
    return opaque(kind, str(value))


_END = object()


def unflatten(spec: Spec, leaves: Sequence[Any], *, const: Callable[[str, str], Any] = constant_value) -> Any:
    """The value again from its spec and its kept leaves (a call: ``(args, kwargs)``); ``const`` rebuilds
    each described leaf from ``(kind, literal)``.

    Raises:
        SpecError: there are fewer or more leaves than the spec keeps.
    """
    it = iter(leaves)
    out = _build(spec, it, const)
    if next(it, _END) is not _END:
        raise SpecError(f"{len(leaves)} leaves for a spec that keeps {spec.num_leaves}")
    return out


def _build(spec: Spec, it: Iterator[Any], const: Callable[[str, str], Any]) -> Any:
    kind = spec.kind
    if kind == "leaf":
        v = next(it, _END)
        if v is _END:
            raise SpecError(f"too few leaves for a spec that keeps {spec.num_leaves}")
        return v
    if kind == "const" and spec.const is not None:
        return const(*spec.const)
    items = [_build(c, it, const) for c in spec.children]
    cls = spec.cls
    if kind == "list":
        return items
    if kind == "tuple":
        if cls is None or cls is tuple:
            return tuple(items)
        return cls(*items) if hasattr(cls, "_fields") else cls(items)
    if kind == "dict":
        out = dict(zip(spec.originals if spec.originals is not None else spec.keys, items))
        if cls is None or cls is dict:
            return out
        try:
            return cls(out)
        except Exception:  # a dict type that cannot be made from a dict: the items as a dict
            return out
    n = spec.nargs
    return tuple(items[:n]), dict(zip(spec.keys, items[n:]))


# -- the stored ``structure`` dict ---------------------------------------------------------------


def to_structure(spec: Spec) -> dict[str, Any]:
    """A call spec as the index stores it: ``{"args": [node], "kwargs": {name: node}, "tuples": [key]}``.

    A node is a leaf's key (its path joined by ``_``), a list of nodes or a dict of nodes;
    ``tuples`` names the containers that were tuples, so a rebuilt call passes the same types.
    """
    if spec.kind != "call":
        raise SpecError(f"a call's structure comes from a call spec, not a {spec.kind}")
    tuples: list[str] = []

    def node(s: Spec, path: tuple[str, ...]) -> Any:
        if s.kind in _LEAF_KINDS:
            return "_".join(path)
        if s.kind == "dict":
            return {k: node(c, (*path, k)) for k, c in zip(s.keys, s.children)}
        if s.kind == "tuple":
            tuples.append("_".join(path))
        return [node(c, (*path, str(i))) for i, c in enumerate(s.children)]

    n = spec.nargs
    args = [node(c, (str(i),)) for i, c in enumerate(spec.children[:n])]
    kwargs = {k: node(c, (k,)) for k, c in zip(spec.keys, spec.children[n:])}
    return {"args": args, "kwargs": kwargs, "tuples": tuples}


def from_structure(structure: Any) -> tuple[Spec, list[str]]:
    """A stored ``structure`` as a call spec, and the key of each of its leaves in order.

    ``tuples`` may hold ``*`` (0.1 runs rebuilt every list as a tuple).

    Raises:
        SpecError: ``structure`` is not what :func:`to_structure` writes (hostile or damaged).
    """
    if not isinstance(structure, dict):
        raise SpecError(f"a call's structure is a dict, not {type(structure).__name__}")
    args, kwargs, tuples = structure.get("args", []), structure.get("kwargs", {}), structure.get("tuples") or []
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(tuples, list):
        raise SpecError("a call's structure has args that are not a list, kwargs not a dict or tuples not a list")
    if not all(isinstance(t, str) for t in tuples):
        raise SpecError("a call's structure names its tuples by something other than strings")
    marked = set(tuples)
    every = "*" in marked
    keys: list[str] = []

    def node(n: Any, path: str, depth: int) -> Spec:
        if isinstance(n, str):
            keys.append(n)
            return _LEAF
        if not isinstance(n, (list, dict)):
            raise SpecError(f"a call's structure names a leaf by {repr(n)[:40]}, not by a string key")
        if depth > MAX_DEPTH:
            raise SpecError(f"a call's structure nests containers deeper than {MAX_DEPTH}, where a flatten makes them leaves")
        if isinstance(n, list):
            return Spec(
                "tuple" if every or path in marked else "list", tuple(node(x, f"{path}_{i}", depth + 1) for i, x in enumerate(n))
            )
        if not all(isinstance(k, str) for k in n):
            raise SpecError("a call's structure has a dict key that is not a string")
        return Spec("dict", tuple(node(v, f"{path}_{k}", depth + 1) for k, v in n.items()), tuple(n))

    children = [node(a, str(i), 1) for i, a in enumerate(args)]
    names = tuple(str(k) for k in kwargs)
    children += [node(v, k, 1) for k, v in zip(names, kwargs.values())]
    return Spec("call", tuple(children), names), keys
