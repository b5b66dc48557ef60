"""Every mistake a user can make ends in one line that says what and what to do (exit code 2), and
``--debug`` shows the traceback instead."""

import json
import shutil

import pytest
import torch
from tiny_components import tiny_pipeline_folder

from homediff.app.cli import main
from homediff.app.demo import recipe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_pipeline_folder(tmp_path_factory.mktemp("errors"))


def one_line_error(err: str) -> str:
    """The error line, after checking there is exactly one and no traceback (a loading bar of
    transformers may come before it)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("homediff: error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def damaged_copy(model_dir, tmp_path, damage):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    damage(copy)
    return copy


def rewrite_json(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


MODEL_DAMAGE = {
    "index": (lambda m: (m / "model_index.json").write_text("{not json"), "model_index.json: cannot read"),
    "weights": (lambda m: (m / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 40),
                "transformer: cannot read"),
    "text key": (lambda m: rewrite_json(m / "text_encoder" / "homediff_text_encoder.json",
                                        lambda r: r["config"].update(colour="red")),
                 "unknown key 'colour' (known:"),
    "vae key": (lambda m: rewrite_json(m / "vae" / "autoencoder.json",
                                       lambda r: r.update(colour="red")),
                "unknown key 'colour' (known:"),
}


@pytest.mark.parametrize("case", MODEL_DAMAGE)
def test_a_damaged_model_folder_is_one_line(model_dir, tmp_path, capsys, case):
    damage, message = MODEL_DAMAGE[case]
    broken = damaged_copy(model_dir, tmp_path, damage)
    code = main(["generate", "a cat", "--model", str(broken), "--out", str(tmp_path / "x.png")])
    assert code == 2 and message in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("device, message", [
    ("bogus", "unknown device 'bogus': use cpu, cuda, cuda:N or mps"),
    ("cuda:7", "CUDA device(s); use cpu"),
])
def test_a_wrong_device_is_one_line_before_the_model_loads(tmp_path, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    code = main(["generate", "a cat", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.png"),
                 "--device", device])
    assert code == 2 and message in one_line_error(capsys.readouterr().err)


CONFIGS = {
    "preset is a value": (["--set", "model.preset.x=1"], "model.preset is a value ('xut-tiny'), not a section"),
    "negative lr": (["--set", "stages.0.lr=-1"], "lr must be >= 0, got -1"),
    "ema decay": (["--set", "ema.decay=5"], "decay must be in [0, 1), got 5"),
    "checkpoint_every": (["--set", "train.checkpoint_every=0"], "checkpoint_every must be at least 1"),
    "log_every": (["--set", "train.log_every=0"], "log_every must be at least 1"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_config_mistakes_are_one_line_when_the_config_loads(tmp_path, capsys, case):
    extra, message = CONFIGS[case]
    code = main(["train", str(recipe("tiny-emoji")), "--out", str(tmp_path / "run"), *extra])
    assert code == 2 and message in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "latin.toml"
    config.write_bytes("[train]\n# caf\xe9\n".encode("latin-1"))
    assert main(["train", str(config)]) == 2
    assert "latin.toml: not UTF-8 text (byte 13); save the config as UTF-8" in one_line_error(
        capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path):
    from homediff.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown device"):
        main(["--debug", "generate", "a cat", "--model", str(tmp_path), "--out", str(tmp_path / "x.png"),
              "--device", "bogus"])
