from __future__ import annotations

import dataclasses

import pytest

from refusal_directions.cli import build_parser, main
from refusal_directions.config import ConfigError, RunConfig, build_config
from tiny import save_tiny_model


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "extract", "select", "infer", "evaluate", "export", "evaluate-model"])
def test_help_documents_every_config_flag(capsys, command):
    text = _help(capsys, command)
    for f in dataclasses.fields(RunConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--config" in text


@pytest.mark.parametrize("command", ["report", "compare", "models", "datasets", "reproduce"])
def test_help_of_other_commands(capsys, command):
    assert "usage" in _help(capsys, command)


def test_flags_override_toml_and_presets(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('n-val = 8\nmethods = ["inlp"]\ntop_fraction = 0.25\npreset = "quick"\n')
    args = build_parser().parse_args(["run", "--config", str(toml), "--n-val", "4", "--no-filter-train"])
    from refusal_directions.cli import config_from_args

    config, note = config_from_args(args)
    assert config.n_val == 4 and config.methods == ["inlp"] and config.top_fraction == 0.25
    assert config.filter_train is False and config.scope_list == ["top:0.25"]
    assert config.n_train == 64 and config.max_new_tokens == 48  # from the quick preset
    assert note == ""


def test_quick_preset_is_the_cpu_default():
    config, note = build_config({}, gpu_available=False)
    assert config.preset == "quick" and "quick" in note
    config, note = build_config({}, gpu_available=True)
    assert config.preset == "reference" and config.n_train == 128 and config.max_new_tokens == 512 and note == ""


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="fraction in \\(0, 1\\]"):
        build_config({"top_fraction": 50.0}, gpu_available=False)
    with pytest.raises(ConfigError, match="either --top-fraction or --just-one"):
        build_config({"top_fraction": 0.5, "just_one": True}, gpu_available=False)
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_key = 1\n")
    with pytest.raises(ConfigError, match="unknown keys \\['no_such_key'\\]"):
        build_config({}, bad, gpu_available=False)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config({}, tmp_path / "missing.toml", gpu_available=False)


def test_stage_keys_change_only_downstream():
    a = RunConfig()
    b = dataclasses.replace(a, max_new_tokens=16)
    assert a.stage_key("select", "fp") == b.stage_key("select", "fp")
    assert a.stage_key("infer", "fp") != b.stage_key("infer", "fp")
    c = dataclasses.replace(a, n_train=8)
    assert a.stage_key("extract", "fp") != c.stage_key("extract", "fp")
    assert a.stage_key("extract", "fp") != a.stage_key("extract", "other-model")


def test_errors_are_one_clear_line(capsys, tmp_path):
    code = main(["run", "--model", str(tmp_path / "nope"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: No model at") and "Traceback" not in "\n".join(err)


def test_reproduce_of_a_folder_without_a_record_is_one_clear_line(capsys, tmp_path):
    code = main(["reproduce", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"error: {tmp_path / 'reproduce.json'} does not exist: {tmp_path} is not a run " \
        "folder, or was made before reproduce records existed (rerun it with the same settings to get one)."


def test_evaluate_model_refuses_stage_flags_that_do_not_apply(capsys, tmp_path):
    code = main(["evaluate-model", "--model", str(tmp_path / "nope"), "--device", "cpu", "--use-existing"])
    assert code == 2 and "evaluate-model runs generation and evaluation only" in capsys.readouterr().err


def test_models_show_and_datasets(capsys, tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", "qwen2")
    assert main(["models", "show", str(folder), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "n_layers" in out and "refusal_token_ids" in out and "<|im_end|>" in out
    assert main(["datasets"]) == 0
    assert "jailbreakbench" in capsys.readouterr().out


# ---------------------------------------------------------------------- every field round-trips
# The cases are generated from ``dataclasses.fields(RunConfig)``: a new field is covered
# automatically (or, if no generic value suits it, fails until it gets one in _SPECIAL_VALUES).
import typing  # noqa: E402

import torch  # noqa: E402

from refusal_directions.cli import config_from_args  # noqa: E402

_HINTS = typing.get_type_hints(RunConfig)
_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_AUTO_PRESET = "reference" if torch.cuda.is_available() else "quick"
# Fields whose constraints a generic non-default value would violate.
_SPECIAL_VALUES: dict[str, object] = {
    "preset": "quick" if _AUTO_PRESET == "reference" else "reference",  # differs from the device's automatic choice
    "positions": [-3, -1],
    "eval_datasets": ["advbench", "jailbreakbench"],
    "scopes": ["one", "all"],
}


def _is_optional(name: str) -> bool:
    return type(None) in typing.get_args(_HINTS[name])


def _base_type(name: str):
    tp = _HINTS[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if _is_optional(name) else tp


def _default(name: str):
    f = _FIELDS[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _non_default(name: str):
    """A valid value of field ``name`` that differs from its default."""
    if name in _SPECIAL_VALUES:
        return _SPECIAL_VALUES[name]
    tp, default, choices = _base_type(name), _default(name), _FIELDS[name].metadata.get("choices")
    if choices:
        return [c for c in choices if c != default][-1]
    if tp is bool:
        return not default
    if tp is int:
        return 3 if default is None else default + 1
    if tp is float:
        return 0.5 if default is None else default / 2
    if tp is str:
        return "x" if default is None else default + "-x"
    if typing.get_origin(tp) is list and default and len(default) > 1:
        return default[-1:]
    raise AssertionError(f"no generic non-default value for {name} ({tp}); add one to _SPECIAL_VALUES")


def _flag_argv(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    if value is None:
        return [flag, "none"]
    if isinstance(value, list):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _config(argv: list[str], toml: dict | None = None, tmp_path=None) -> RunConfig:
    extra = []
    if toml is not None:
        path = tmp_path / "run.toml"
        path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in toml.items()))
        extra = ["--config", str(path)]
    config, _ = config_from_args(build_parser().parse_args(["run", *extra, *argv]))
    return config


def _preset_argv(name: str) -> list[str]:
    """Pin the preset (so the device does not choose one) unless ``preset`` is the field under test."""
    return [] if name == "preset" else ["--preset", "reference"]


ALL_FIELDS = sorted(_FIELDS)
OPTIONAL_FIELDS = [n for n in ALL_FIELDS if _is_optional(n)]


def test_the_generated_cases_cover_optional_fields():
    assert {"safety_judge", "mmlu_questions", "positions", "preset", "top_fraction"} <= set(OPTIONAL_FIELDS)


@pytest.mark.parametrize("name", ALL_FIELDS)
def test_every_field_from_a_flag(name):
    value = _non_default(name)
    assert value != _default(name)
    assert getattr(_config([*_preset_argv(name), *_flag_argv(name, value)]), name) == value


@pytest.mark.parametrize("name", ALL_FIELDS)
def test_every_field_from_toml(name, tmp_path):
    value = _non_default(name)
    toml = {name: value} if name == "preset" else {"preset": "reference", name: value}
    assert getattr(_config([], toml, tmp_path), name) == value


def _expected_none(name: str):
    return _AUTO_PRESET if name == "preset" else None  # preset none: the device's automatic choice


@pytest.mark.parametrize("name", OPTIONAL_FIELDS)
def test_none_as_a_flag_gives_none(name, tmp_path):
    # Over a TOML file that sets a value, so that 'none' is not confused with 'flag not given'.
    toml = {name: _non_default(name)} if name == "preset" else {"preset": "reference", name: _non_default(name)}
    assert getattr(_config(_flag_argv(name, None), toml, tmp_path), name) == _expected_none(name)


@pytest.mark.parametrize("name", OPTIONAL_FIELDS)
def test_none_in_toml_gives_none(name, tmp_path):
    # Over the quick preset (which sets mmlu_questions, positions, ...) and the dataclass defaults.
    toml = {name: "none"} if name == "preset" else {"preset": "quick", name: "none"}
    assert getattr(_config([], toml, tmp_path), name) == _expected_none(name)


def test_flags_not_given_keep_toml_values(tmp_path):
    config = _config(["--n-val", "4"], {"preset": "reference", "mmlu_questions": 7, "filter_train": False}, tmp_path)
    assert config.mmlu_questions == 7 and config.filter_train is False and config.n_val == 4


def test_safety_judge_none_has_one_meaning(tmp_path):
    assert _config(["--preset", "reference", "--safety-judge", "none"]).safety_judge is None
    assert _config([], {"preset": "reference", "safety_judge": "none"}, tmp_path).safety_judge is None
    assert build_config({"safety_judge": "None"}, gpu_available=False)[0].safety_judge is None
    assert dataclasses.replace(RunConfig(), safety_judge="none").safety_judge is None


def test_none_list_and_choice_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--positions", "none", "-1"])
    assert "none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--scoring", "none"])  # not optional: none is no choice
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--preset", "fast"])
    assert "quick" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('n_train = "many"\n')
    with pytest.raises(ConfigError, match="n_train"):
        build_config({}, bad, gpu_available=False)
