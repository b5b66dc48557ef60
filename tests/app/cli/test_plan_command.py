import json

import pytest

from homediff.app.cli import main

HDM = ["plan", "configs/hdm-xut-base.toml", "--gpu", "rtx5090", "--gpus", "4"]


@pytest.fixture
def epochs_config(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4}))
    path = tmp_path / "run.toml"
    path.write_text(f'[text_encoder]\nname = "{text}"\n[dataset]\npath = "{tmp_path / "none"}"\n'
                    '[[stages]]\nname = "only"\nresolution = 32\nbatch_size = 8\nepochs = 2\n')
    return path


def test_the_hdm_recipe_beside_hdm_s_hours(capsys):
    assert main([*HDM, "--price-per-hour", "0.38"]) == 0
    out = capsys.readouterr().out
    assert "HDM h" in out and "HDM MFU" in out and "$0.38 per GPU-hour" in out
    for name in ("256px", "512px", "768px", "1024px"):
        assert name in out
    assert "MFU 0.368" in out and "Peak memory per process" in out and "Checkpoint:" in out
    assert "FSDP2 + ckpt" in out


def test_json_for_scripts(capsys):
    assert main([*HDM, "--price-per-hour", "0.35", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpu"]["name"] == "rtx5090" and plan["gpus"] == 4
    assert plan["total"]["hours"] == pytest.approx(385, rel=0.01)
    assert plan["hdm"]["total"]["hours"] == 385 and len(plan["hdm"]["stages"]) == 4
    assert [len(stage["memory"]) for stage in plan["stages"]] == [4, 4, 4, 4]
    assert plan["total"]["cost"] == pytest.approx(plan["total"]["gpu_hours"] * 0.35)


def test_an_mfu_given_replaces_the_default(capsys):
    assert main([*HDM, "--mfu", "0.5", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mfu"] == 0.5 and plan["mfu_reason"] == "given"
    assert plan["total"]["hours"] < 385


def test_stages_in_epochs_need_the_data_set_size(epochs_config, capsys):
    assert main(["plan", str(epochs_config), "--gpu", "h100"]) == 2
    assert "--images" in capsys.readouterr().err
    assert main(["plan", str(epochs_config), "--gpu", "h100", "--gpus", "2", "--images", "100",
                 "--json"]) == 0
    stage = json.loads(capsys.readouterr().out)["stages"][0]
    assert stage["steps"] == 2 * (100 // 8 // 2) and stage["samples"] == stage["steps"] * 16


def test_overrides_and_unknown_gpus(epochs_config, capsys):
    assert main(["plan", str(epochs_config), "--gpu", "tpu", "--images", "10"]) == 2
    assert "rtx5090" in capsys.readouterr().err
    assert main(["plan", str(epochs_config), "--gpu", "l40s", "--images", "10", "--json",
                 "--set", "stages.0.resolution=64"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["resolution"] == 64
