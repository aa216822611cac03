"""The structure codec (``schema.tree``): one spec that capture, compiled taps, replay and graft share.

Property tests: whatever nests, flatten then unflatten gives the value back; the spec
serialises and reads back; the compiled tap's string is the spec's; the stored
``structure`` is what the walk before the codec wrote; anything altered or hostile
is a SpecError, never a traceback or unbounded recursion.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorlog
from tensorlog.capture.compiled import UNKEPT, call_leaves, rebuild
from tensorlog.schema.leaves import flatten_inputs, flatten_value
from tensorlog.schema.tree import (
    MAX_DEPTH,
    Spec,
    SpecError,
    encode_call,
    flatten,
    flatten_call,
    from_structure,
    to_structure,
    unflatten,
    unique_key,
)

Pair = collections.namedtuple("Pair", "left right")

_TENSORS = [torch.full((2,), float(i)) for i in range(4)]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),  # inf and nan are described, not literals
    st.text(max_size=8),
)
leaves = st.one_of(st.sampled_from(_TENSORS), scalars)
keys = st.one_of(st.text(max_size=4), st.integers(min_value=-3, max_value=3))
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.builds(Pair, inner, inner),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=20,
)
calls = st.tuples(st.lists(values, max_size=4).map(tuple), st.dictionaries(st.text(min_size=1, max_size=6), values, max_size=3))


def _same(a: Any, b: Any) -> bool:
    """Equal with the same container types, tensors the very same objects (a float compared by its bits)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a is b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return repr(a) == repr(b)


def _plain(v: Any) -> Any:
    """What a spec read back rebuilds: plain tuples, lists and dicts, keys as the spec names them."""
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    if isinstance(v, dict):
        out: dict[str, Any] = {}
        for k, x in v.items():
            out[unique_key(str(k), out)] = _plain(x)
        return out
    return v


@settings(max_examples=200, deadline=None)
@given(values)
def test_flatten_then_unflatten_gives_the_value_back(value):
    found, spec = flatten(value)
    assert _same(unflatten(spec, [v for _, v in found]), value)  # named tuples, int keys and all
    assert [p for p, _ in found] == [p for p, _ in flatten_value(value)]
    back = Spec.loads(spec.dumps())
    assert back == spec
    assert _same(unflatten(back, [v for _, v in found]), _plain(value))


@settings(max_examples=200, deadline=None)
@given(calls)
def test_a_call_round_trips_with_only_its_tensors_kept(call):
    args, kwargs = call
    found, spec = flatten_call(args, kwargs, tensors_only=True)
    assert all(isinstance(v, torch.Tensor) for _, v in found)
    xs, text = encode_call(args, kwargs)  # what a compiled hook traces: the same spec, as a string
    assert text == spec.dumps() and len(xs) == len(found) and all(x is v for x, (_, v) in zip(xs, found))
    assert Spec.loads(text) == spec
    got_args, got_kwargs = rebuild(xs, text)
    assert _same(got_args, _plain(args)) and _same(got_kwargs, _plain(kwargs))
    assert call_leaves(args, kwargs)[1] == text


@settings(max_examples=200, deadline=None)
@given(calls)
def test_the_stored_structure_is_what_the_walk_before_the_codec_wrote(call):
    args, kwargs = call
    found, structure = flatten_inputs(args, kwargs)
    old_found, old_structure = _before_the_codec(args, kwargs)
    assert [p for p, _ in found] == [p for p, _ in old_found]
    assert json.dumps(structure) == json.dumps(old_structure)  # byte for byte, order included
    spec, names = from_structure(json.loads(json.dumps(structure)))
    assert names == ["_".join(p) for p, _ in found]
    paths = _container_paths(structure)
    # a kwarg "0" beside argument 0, a key "a_b" beside a["b"]: one path; a tuple kwarg named "*" reads as 0.1's mark
    if len(set(paths)) == len(paths) and "*" not in structure["tuples"]:
        assert spec == flatten_call(args, kwargs)[1]
        assert to_structure(spec) == structure


def test_containers_deeper_than_max_depth_are_leaves_and_equal_keys_are_told_apart():
    t = _TENSORS[0]
    deep: Any = t
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    found, spec = flatten(deep)
    assert len(found) == 1 and len(found[0][0]) == MAX_DEPTH + 1 and isinstance(found[0][1], list)
    assert _same(unflatten(Spec.loads(spec.dumps()), [v for _, v in found]), deep)
    found, spec = flatten({0: t, "0": 1, "0~1": 2})
    assert [p for p, _ in found] == [("0",), ("0~1",), ("0~1~1",)]
    assert unflatten(spec, [v for _, v in found]) == {0: t, "0": 1, "0~1": 2}


def test_described_leaves_are_never_pickled():
    args = (torch.float16, torch.device("cpu"), torch.nn.Linear(1, 1), object(), float("nan"))
    xs, text = call_leaves(args, {})
    assert xs == [] and "Linear" in text and "builtins.object" in text
    (dtype, device, module, obj, nan), _ = rebuild(xs, text)
    assert dtype is torch.float16 and device == torch.device("cpu")
    assert module.__tensorlog_value__ == {"type": "module", "class_name": "Linear"} and repr(module) == UNKEPT
    assert obj.__tensorlog_value__ == {"type": "builtins.object"}
    assert nan.__tensorlog_value__ == {"type": "object"}  # 'nan' is no literal: described, as before the codec


# -- altered and hostile specs -----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(calls, st.data())
def test_an_altered_serialised_spec_is_refused_cleanly(call, data):
    text = flatten_call(*call, tensors_only=True)[1].dumps()
    tokens = text.split("\x1e")
    cut = data.draw(st.integers(min_value=1, max_value=len(tokens) - 1)) if len(tokens) > 1 else None
    if cut is not None:  # a spec is a prefix code: no part of it is a whole spec
        with pytest.raises(SpecError):
            Spec.loads("\x1e".join(tokens[:cut]))
    with pytest.raises(SpecError):
        Spec.loads(text + "\x1eT")
    i = data.draw(st.integers(min_value=0, max_value=len(text)))
    junk = data.draw(st.text(alphabet=st.sampled_from("\x1e\x1fTCLUDA0129'\"x"), max_size=6))
    mutated = text[:i] + junk + text[i + data.draw(st.integers(min_value=0, max_value=3)) :]
    try:
        spec = Spec.loads(mutated)
    except SpecError:
        return
    assert Spec.loads(spec.dumps()) == spec  # what is read is a spec in every part


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("\x1e\x1fTCLUDA0159'\"xliteral"), max_size=40))
def test_any_string_is_a_spec_or_a_spec_error(text):
    try:
        Spec.loads(text)
    except SpecError:
        pass


def test_hostile_specs_are_bounded():
    with pytest.raises(SpecError, match="deeper"):
        Spec.loads("A\x1f1" + "\x1eU\x1f1" * 10_000 + "\x1eT")
    with pytest.raises(SpecError, match="count"):
        Spec.loads("L\x1f999999999\x1eT")  # no loop over a count that no nodes follow
    with pytest.raises(SpecError, match="key"):
        Spec.loads("D\x1f__import__('os')\x1eT")
    with pytest.raises(SpecError, match="twice"):
        Spec.loads("D\x1f'a'\x1f'a'\x1eT\x1eT")
    with pytest.raises(SpecError):
        Spec.loads(b"T")  # type: ignore[arg-type]
    spec = Spec.loads("U\x1f2\x1eT\x1eT")
    with pytest.raises(SpecError, match="leaves"):
        unflatten(spec, [1])
    with pytest.raises(SpecError, match="leaves"):
        unflatten(spec, [1, 2, 3])
    with pytest.raises(SpecError):
        rebuild([], "U\x1f0")  # a tap's spec is a call's


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({"args": json_values, "kwargs": json_values, "tuples": json_values})))
def test_any_stored_structure_is_a_call_or_a_spec_error(structure):
    try:
        spec, names = from_structure(structure)
    except SpecError:
        return
    assert spec.kind == "call" and spec.num_leaves == len(names)
    assert unflatten(spec, names) is not None


def test_a_deep_stored_structure_is_refused_without_recursing():
    node: Any = "0"
    for _ in range(100_000):
        node = [node]
    with pytest.raises(SpecError, match="deeper"):
        from_structure({"args": [node]})


@pytest.mark.parametrize(
    "structure, note",
    [
        ({"args": [5]}, "names a leaf by 5, not"),
        ({"args": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["0"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}, "deeper than 32"),
        ({"args": [{"a": None}]}, "names a leaf by None, not"),
        ({"args": ["nope"]}, "its input 'nope' was not recorded"),
    ],
)
def test_replay_of_a_damaged_structure_is_not_replayable_with_the_reason(tmp_path, structure, note):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "a"}), torch.no_grad():
        model(torch.randn(3, 4))
    f = tmp_path / "a" / "step_0" / "tensorlog_index.json"
    doc = json.loads(f.read_text())
    for c in doc["calls"]:
        if c.get("structure") is not None:
            c["structure"] = structure
    f.write_text(json.dumps(doc))
    result = tensorlog.replay(model, tmp_path / "a")
    assert result.modules and all(m.status == "not_replayable" for m in result.modules)
    assert all(note in (m.note or "") for m in result.modules), [m.note for m in result.modules]


def _container_paths(structure: dict[str, Any]) -> list[str]:
    out: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, (list, dict)):
            out.append(path)
            for k, v in enumerate(node) if isinstance(node, list) else node.items():
                walk(v, f"{path}_{k}")

    for i, a in enumerate(structure["args"]):
        walk(a, str(i))
    for k, v in structure["kwargs"].items():
        walk(v, k)
    return out


# -- the walk before the codec, kept as the oracle of the stored structure ---------------------


def _before_the_codec(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    out: list[Any] = []
    tuples: list[str] = []

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, torch.Tensor) or len(path) > MAX_DEPTH:
            out.append((path, value))
            return "_".join(path)
        if isinstance(value, (list, tuple)):
            if isinstance(value, tuple):
                tuples.append("_".join(path))
            return [walk(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, dict):
            node: dict[str, Any] = {}
            for k, v in value.items():
                key = unique_key(str(k), node)
                node[key] = walk(v, (*path, key))
            return node
        out.append((path, value))
        return "_".join(path)

    structure = {
        "args": [walk(a, (str(i),)) for i, a in enumerate(args)],
        "kwargs": {str(k): walk(v, (str(k),)) for k, v in kwargs.items()},
        "tuples": tuples,
    }
    return out, structure


class _EvilStr(str):
    def __repr__(self) -> str:
        return "'\x1f\x1e'"  # the spec's own separators


class _EvilKey:
    def __str__(self) -> str:
        return _EvilStr("evil")


def test_a_key_whose_str_lies_about_its_repr_cannot_inject_into_the_spec():
    t = torch.ones(1)
    leaves, spec = flatten({_EvilKey(): t, 0: 1, "0": 2})
    assert [p for p, _ in leaves] == [("evil",), ("0",), ("0~1",)]
    assert Spec.loads(spec.dumps()) == spec
    _, structure = flatten_inputs(({_EvilKey(): t},), {})
    assert structure == {"args": [{"evil": "0_evil"}], "kwargs": {}, "tuples": []}
