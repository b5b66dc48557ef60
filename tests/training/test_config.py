import pytest

from homediff.errors import ConfigError
from homediff.training.config import apply_override, config_from_dict, load_config, to_toml

MINIMAL = """
[dataset]
path = "data/emoji"

[[stages]]
resolution = 32
batch_size = 4
steps = 10
"""


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_minimal_config_and_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.stages[0].steps == 10 and config.stages[0].lr == 0.5
    assert config.optimizer.betas == [0.9, 0.98] and config.optimizer.weight_decay == 0.02
    assert config.dataset.options.captions.caption_dropout == 0.1


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"run.toml: unknown config key optimizer.learning_rate"):
        load_config(write(tmp_path, MINIMAL + "[optimizer]\nlearning_rate = 1\n"))
    with pytest.raises(ConfigError, match=r"unknown config key stages\[0\].reso"):
        load_config(write(tmp_path, MINIMAL.replace("resolution", "reso")))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\].batch_size must be int, got 'four'"):
        load_config(write(tmp_path, MINIMAL.replace("batch_size = 4", 'batch_size = "four"')))
    with pytest.raises(ConfigError, match=r"train.seed must be int, got True"):
        load_config(write(tmp_path, MINIMAL + "[train]\nseed = true\n"))


def test_nested_dataclass_validation_reaches_data_options(tmp_path):
    with pytest.raises(ConfigError, match="caption_dropout"):
        load_config(write(tmp_path, MINIMAL + "[dataset.options.captions]\ncaption_dropout = 2.0\n"))


@pytest.mark.parametrize("line, message", [("time_std = -0.5", "train.time_std must be >= 0"),
                                            ("contrastive_weight = 1.0",
                                             r"train.contrastive_weight must be in \[0, 1\)")])
def test_training_objective_values_are_checked_on_load(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + f"[train]\n{line}\n"))


@pytest.mark.parametrize("line, message", [
    ('name = "sgd"', "optimizer.name must be 'adamw' or 'muon', got 'sgd'"),
    ('muon_dtype = "float16"', "optimizer.muon_dtype must be .*'bfloat16' or 'float32', got 'float16'")])
def test_unknown_optimizer_settings_are_named(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + f"[optimizer]\n{line}\n"))


def test_stage_must_have_a_length(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\] must set exactly one of steps or epochs"):
        load_config(write(tmp_path, MINIMAL.replace("steps = 10", "")))
    with pytest.raises(ConfigError, match="no \\[\\[stages\\]\\]"):
        config_from_dict({})


def test_overrides(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["stages.0.lr=0.1", "train.sample_prompts=['a', 'b']",
                                                    "text_encoder.name=my-encoder"])
    assert config.stages[0].lr == 0.1
    assert config.train.sample_prompts == ["a", "b"]
    assert config.text_encoder.name == "my-encoder"
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "stages.0.lr")
    with pytest.raises(ConfigError, match="not an index"):
        apply_override({"stages": [{}]}, "stages.3.lr=1")


def test_round_trip_through_toml(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["model.overrides.dim=96"])
    again = load_config(write(tmp_path, to_toml(config)))
    assert again == config


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[[stages]\n"))
