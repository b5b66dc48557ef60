import re

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
    ('name = "sgd"', "optimizer.name must be one of 'adamw', 'muon', got 'sgd'"),
    ('muon_dtype = "float16"', "optimizer.muon_dtype must be one of .*'float32', got 'float16'"),
    ("betas = [0.9]", r"optimizer.betas must be two numbers in \[0, 1\), got \[0.9\]")])
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


@pytest.mark.parametrize("override, message", [
    ("stages.0.batch_size=0", r"stages\[0\].batch_size must be positive, got 0"),
    ("stages.0.tread_rate=1.0", r"stages\[0\].tread_rate must be in \[0, 1\)"),
    ("ema.decay=1.0", r"ema.decay must be in \[0, 1\), got 1.0"),
    ("train.mixed_precision=fp8", "train.mixed_precision must be one of 'auto', 'no', 'bf16', 'fp16'"),
    ("dataset.kind=zip", "dataset.kind must be one of 'auto', 'folder', 'shards', got 'zip'"),
])
def test_each_section_checks_its_own_ranges(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL), [override])


def test_unset_stage_keys_inherit_once_and_set_ones_stay(tmp_path):
    text = MINIMAL + """[[stages]]
steps = 5
weight_decay = 0.0
betas = [0.8, 0.9]
text_length = 12

[optimizer]
weight_decay = 0.05
grad_clip = 2.0

[text_encoder.options]
max_length = 20
"""
    first, second = load_config(write(tmp_path, text)).stages
    assert (first.weight_decay, first.grad_clip, first.betas, first.text_length) == (0.05, 2.0, [0.9, 0.98], 20)
    assert (second.weight_decay, second.grad_clip, second.betas, second.text_length) == (0.0, 2.0, [0.8, 0.9], 12)
    again = load_config(write(tmp_path, to_toml(load_config(write(tmp_path, text)))))
    assert again.stages == [first, second]  # the saved config holds the resolved values


@pytest.mark.parametrize("override, message", [
    ("model.overrides.tread_rate=0.3", "model.overrides.tread_rate is not read in training: set each stage's"),
    ("model.overrides.gradient_checkpointing=true", "set train.gradient_checkpointing"),
    ("dataset.options.size=64", "dataset.options.size is not read in training"),
    ("train.cache_text=true", "train.cache_text needs text_encoder.options.padding"),
])
def test_keys_that_training_would_ignore_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL), [override])


def test_init_and_lora_sections_read_and_save_back(tmp_path):
    text = MINIMAL + '\n[init]\nfrom = "runs/emoji/model"\n\n[lora]\nrank = 8\ntargets = ["attention", "text"]\n'
    config = load_config(write(tmp_path, text))
    assert config.init.from_ == "runs/emoji/model" and config.lora.rank == 8 and config.lora.alpha is None
    saved = to_toml(config)
    assert 'from = "runs/emoji/model"' in saved and "from_" not in saved
    assert load_config(write(tmp_path, saved)) == config
    assert load_config(write(tmp_path, MINIMAL), ["init.from=elsewhere"]).init.from_ == "elsewhere"


@pytest.mark.parametrize("extra, message", [
    ('[lora]\nrank = 4\ntargets = ["everything"]', "lora.targets must be some of attention"),
    ('[lora]\nrank = -1', "lora.rank must be >= 0"),
    ('[lora]\nrank = 4\n[optimizer]\nname = "muon"', 'LoRA trains with optimizer.name = "adamw"'),
    ('[init]\nfrm = "x"', "unknown config key init.frm (known keys here: from, arch)"),
])
def test_bad_init_and_lora_values_are_named(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, MINIMAL + "\n" + extra + "\n"))
