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


@pytest.mark.parametrize("command", ["run", "extract", "select", "infer", "evaluate", "export"])
def test_help_documents_every_config_flag(capsys, command):
    text = _help(capsys, command)
    for f in dataclasses.fields(RunConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--config" in text


@pytest.mark.parametrize("command", ["report", "compare", "models", "datasets"])
def test_help_of_other_commands(capsys, command):
    assert "usage" in _help(capsys, command)


def test_flags_override_toml_and_presets(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('n-val = 8\nmethods = ["inlp"]\ntop_fraction = 0.25\npreset = "quick"\n')
    args = build_parser().parse_args(["run", "--config", str(toml), "--n-val", "4", "--no-filter-train"])
    from refusal_directions.cli import config_from_args

    config, note = config_from_args(args)
    assert config.n_val == 4 and config.methods == ["inlp"] and config.top_fraction == 0.25
    assert config.filter_train is False and config.scope == "top"
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


def test_models_show_and_datasets(capsys, tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", "qwen2")
    assert main(["models", "show", str(folder), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "n_layers" in out and "refusal_token_ids" in out and "<|im_end|>" in out
    assert main(["datasets"]) == 0
    assert "jailbreakbench" in capsys.readouterr().out
