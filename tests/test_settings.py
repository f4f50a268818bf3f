"""Property tests of the settings schema (issue 22 item 3): a value of the wrong type for any setting, through any
route (config file, flag, `--set`, Python), is refused with one line naming the setting, the value and where it came
from; never a traceback, never a silent coercion; and values of the right type are taken exactly."""
import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jigsaw_ref.cli import parse_args
from jigsaw_ref.config import ConfigError, MixerConfig
from jigsaw_ref.settings import TrainConfig, check_types

FIELDS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {f.name: f.type for f in dataclasses.fields(MixerConfig) if f.type in ("int", "float", "bool")}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8)
fractional = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))


def wrong_value(kind: str):
    "Values that do not have the type `kind` in a TOML/JSON file (and that no rule may coerce)."
    return {"int": st.one_of(fractional, st.booleans(), text, st.lists(st.integers(), max_size=2)),
            "float": st.one_of(st.booleans(), text, st.lists(st.floats(allow_nan=False), max_size=2)),
            "bool": st.one_of(st.integers(), st.floats(allow_nan=False), text),
            "str": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(text, max_size=2)),
            "tuple": st.one_of(st.integers(), st.booleans(), text.filter(bool))}[kind]


def usage_error(argv, capsys) -> str:
    "The one-line usage error `parse_args(argv)` must end in (exit status 2), as printed."
    with pytest.raises(SystemExit) as e: parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@SETTINGS
@given(data=st.data())
def test_a_config_file_value_of_the_wrong_type_is_a_usage_error_naming_it(tmp_path, capsys, data):
    name = data.draw(st.sampled_from(sorted(FIELDS)))
    value = data.draw(wrong_value(FIELDS[name]))
    f = tmp_path / "run.json"
    f.write_text(json.dumps({name: value}))
    err = usage_error(["--config", str(f)], capsys)
    assert f"{name} = " in err and f"from config file {f}" in err and f"expected {FIELDS[name]}" in err, err


@SETTINGS
@given(data=st.data())
def test_a_flag_value_that_is_not_of_the_flags_type_is_a_usage_error(capsys, data):
    name = data.draw(st.sampled_from(sorted(n for n, k in FIELDS.items() if k in ("int", "float", "bool"))))
    kind = FIELDS[name]
    bad = {"int": st.one_of(st.sampled_from(["2.5", "1e3", "true", "three", ""]), fractional.map(repr)),
           "float": st.sampled_from(["3e-4x", "true", "", "one"]),
           "bool": st.sampled_from(["yes", "no", "1", "0", "on", "off", "tru", ""])}[kind]
    err = usage_error(["--" + name.replace("_", "-"), data.draw(bad)], capsys)
    assert "--" + name.replace("_", "-") in err, err


@SETTINGS
@given(data=st.data())
def test_a_set_override_of_the_wrong_type_is_a_usage_error_naming_it(capsys, data):
    name = data.draw(st.sampled_from(sorted(MODEL_FIELDS)))
    kind = MODEL_FIELDS[name]
    bad = {"int": st.sampled_from(["true", "false", "2.5", "\"8\"", "[1]", "eight"]),
           "float": st.sampled_from(["true", "\"0.5\"", "[1]", "half"]),
           "bool": st.sampled_from(["1", "0", "\"true\"", "yes"])}[kind]
    v = data.draw(bad)
    err = usage_error(["--model", "tiny", "--set", f"{name}={v}"], capsys)
    assert f"{name} = " in err and f"--set {name}={v}" in err and f"expected {kind}" in err, err


@SETTINGS
@given(data=st.data())
def test_a_python_value_of_the_wrong_type_is_a_config_error(data):
    name = data.draw(st.sampled_from(sorted(FIELDS)))
    value = data.draw(wrong_value(FIELDS[name]))
    with pytest.raises(ConfigError, match=f"{name} = .* expected {FIELDS[name]}"):
        check_types(TrainConfig(**{name: value}))


@SETTINGS
@given(steps=st.integers(0, 10**6), lr=st.one_of(st.integers(1, 9), st.floats(1e-8, 1.0)), over=st.booleans())
def test_values_of_the_right_type_are_taken_exactly(tmp_path, steps, lr, over):
    f = tmp_path / "run.toml"
    f.write_text(f"max_steps = {steps}\nlr = {lr!r}\noverwrite = {str(over).lower()}\n")
    tc = parse_args(["--config", str(f)])
    assert (tc.max_steps, tc.lr, tc.overwrite) == (steps, float(lr), over)


@pytest.mark.parametrize("toml,msg", [
    ('overwrite = "false"', "overwrite = 'false' (from config file"),
    ('reschedule = "no"', "reschedule = 'no' (from config file"),
    ("max_steps = 2.5", "max_steps = 2.5 (from config file"),
    ('lr = "3e-4"', "lr = '3e-4' (from config file"),
])
def test_the_coercions_once_seen_are_refused(tmp_path, capsys, toml, msg):
    "Issue 22 item 3, each case as reported: once deleted another run's checkpoints, accepted changes, ran 3 steps, a traceback."
    f = tmp_path / "run.toml"
    f.write_text(toml + "\n")
    assert msg in usage_error(["--config", str(f)], capsys)


def test_set_hidden_true_is_refused(capsys):
    assert "hidden = True (from --set hidden=true): expected int" in usage_error(["--model", "tiny", "--set", "hidden=true"], capsys)
