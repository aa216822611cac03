"""Config validation: every problem named, up front, in one message."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorlog
from tensorlog import ConfigError, LogConfig, load_config


def test_reference_defaults():
    cfg = LogConfig()
    assert cfg.enabled is True
    assert cfg.output_dir == "/tmp/tensorlog"
    assert cfg.module_call_match is None
    assert cfg.log_step_ids == [0]
    assert cfg.max_tensor_size is None
    assert cfg.device_names == []
    assert len(cfg.run_name) == 36  # a uuid4, as in the reference
    assert LogConfig().run_name != cfg.run_name


def test_single_pattern_becomes_a_list_and_sources_agree(tmp_path):
    d = {"enabled": True, "module_call_match": "layers\\.0\\."}
    f = tmp_path / "c.json"
    f.write_text(json.dumps(d))
    for src in (d, json.dumps(d), f, str(f)):
        assert load_config(src).module_call_match == ["layers\\.0\\."]


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'log_step_id' \(did you mean 'log_step_ids'\?\)"):
        load_config({"log_step_id": [0]})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config({"log_step_ids": "zero", "module_call_match": ["ok", "bad("], "outptu_dir": "/x"})
    msg = str(e.value)
    assert "log_step_ids" in msg and "'bad('" in msg and "did you mean 'output_dir'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"max_tensor_size": -1}, "max_tensor_size"),
        ({"log_step_ids": [-2]}, "log_step_ids"),
        ({"device_names": ["gpu0"]}, "device_names"),
        ({"run_name": "../escape"}, "run_name"),
        ({"enabled": "sometimes"}, "enabled"),
        ({"module_call_match": "x[:1"}, "does not compile"),
    ],
)
def test_bad_values_name_the_key(bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(bad)


def test_call_index_suffix_is_not_part_of_the_regex():
    assert load_config({"module_call_match": "rotary_emb:0"}).module_call_match == ["rotary_emb:0"]
    # a regex with a colon of its own still compiles
    load_config({"module_call_match": "(?:a|b)\\.c:2"})


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config('{"enabled": tru}')
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(tmp_path / "list.json")


def test_rank_ranges_expand():
    assert load_config({"ranks": [0, "2-4"]}).ranks == [0, 2, 3, 4]


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_an_unusable_output_dir_is_one_warning_and_the_model_runs(tmp_path, where):
    import torch

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = str(blocker / "sub") if where == "under_a_file" else str(tmp_path)
    cfg = {"output_dir": out, "run_name": "a_file"} if where == "is_a_file" else {"output_dir": out}
    model = torch.nn.Linear(2, 2)
    x = torch.randn(1, 2)
    with pytest.warns(RuntimeWarning, match="not logging this run") as seen:
        with tensorlog.capture(model, cfg) as run:
            assert torch.equal(model(x), torch.nn.functional.linear(x, model.weight, model.bias))
    assert len(seen) == 1 and not run.enabled and run.stopped_reason
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"output_dir": ""}, "is empty"),
        ({"output_dir": "/"}, "root directory"),
        ({"output_dir": "/tmp/a\x00b"}, "NUL"),
        ({"module_call_match": "(a+)+$"}, "exponential"),
        ({"module_call_match": ["ok", "(x|xy)*z"]}, "alternation"),
    ],
)
def test_unsafe_paths_and_patterns_are_refused_in_one_line(bad, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(bad)
    assert "\n" not in str(e.value)


def test_the_reference_patterns_with_lookaheads_are_accepted():
    cfg = load_config({"module_call_match": ["layers\\.0\\.(?!.*rotary_emb).*", "rotary_emb:0", "(foo|bar)+", "(\\w+\\.)?x"]})
    assert len(cfg.module_call_match) == 4


def test_a_config_nested_100k_deep_is_one_line_error():
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config("{" + '"a":' * 1 + "[" * 100_000 + "]" * 100_000 + "}")


def test_with_overrides_keeps_the_run_name():
    cfg = load_config({})
    assert cfg.with_overrides(log_step_ids=[3]).run_name == cfg.run_name
    assert cfg.with_overrides(run_name="x").run_name == "x"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(LogConfig.model_fields) + ["junk"]), _json, max_size=5))
def test_fuzzed_configs_either_validate_or_raise_config_error(data):
    try:
        cfg = load_config(data)
    except ConfigError as e:
        assert str(e).startswith("invalid tensorlog config")
    else:
        assert isinstance(cfg, LogConfig)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_fuzzed_text_never_escapes_as_another_exception(text):
    try:
        load_config("{" + text)
    except ConfigError:
        pass


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"log_step_ids": [1], "log_step_ids": [2]}', "key 'log_step_ids' is given twice"),
        ('{"max_tensor_size": ' + "9" * 5001 + "}", "an integer of 5001 digits"),
        ('{"log_step_ids": [' + ",".join(["1"] * 3_000_000) + "]}", "lists 3000000 steps; at most 10000"),
        ('{"log_step_ids": ["5-2"]}', 'ranges "a-b" with a <= b'),
    ],
)
def test_configs_tensorlog_could_not_read_back_are_one_config_error(text, expected):
    with pytest.raises(tensorlog.ConfigError) as e:
        tensorlog.load_config(text)
    assert expected in str(e.value) and len(str(e.value)) < 1000


def test_step_ranges_select_steps_and_stay_small_in_run_json(tmp_path):
    from tensorlog.config.selection import Selector

    cfg = tensorlog.load_config({"log_step_ids": [1, "3-999999"], "output_dir": str(tmp_path)})
    sel = Selector(cfg)
    assert [sel.step(i) for i in (0, 1, 2, 3, 999999, 1000000)] == [False, True, False, True, True, False]
    assert sel.last_step == 999999
    with pytest.raises(tensorlog.ConfigError, match="an integer past 2\\^62"):
        tensorlog.load_config({"max_tensor_size": 10**40})
