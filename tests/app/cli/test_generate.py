import json

import numpy as np
import pytest
import torch
from tiny_components import hdm_release, tiny_pipeline_folder

from homediff.app.cli import main
from homediff.pipeline import HomeDiffPipeline

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_pipeline_folder(tmp_path_factory.mktemp("cli"))


def generate(model_dir, out, *extra):
    """``homediff generate`` in float32, so that runs compared do not depend on a measured choice."""
    return main(["generate", "a red cat", "--model", str(model_dir), "--out", str(out),
                 "--steps", "2", "--seed", "7", "--dtype", "float32", *extra])


def test_one_image_with_settings_in_the_metadata(model_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert generate(model_dir, out, "--width", "24", "--negative", "blurry", "--zoom", "1.5",
                    "--tread-gamma", "0", "0.25", "--sampler", "heun") == 0
    image = Image.open(out)
    assert image.size == (24, 16)
    assert "prompt" not in image.text  # ComfyUI's key for its workflow graph
    assert image.text["parameters"] == (
        "a red cat\nNegative prompt: blurry\nSteps: 2, Sampler: heun, CFG scale: 3, Seed: 7, Size: 24x16, "
        "Model: model, Camera: zoom 1.5, x 0, y 0, Routing gamma: 0/0.25, Schedule shift: 1")
    record = json.loads(image.text["homediff"])
    assert record["seed"] == 7 and record["negative_prompt"] == "blurry"
    assert record["camera"]["zoom"] == 1.5 and record["tread_gamma"] == [0.0, 0.25]
    assert record["sampler"] == "heun" and record["size"] == [24, 16]
    assert "seed 7" in capsys.readouterr().out


def test_several_images_and_a_grid_repeat_with_the_seed(model_dir, tmp_path):
    assert generate(model_dir, tmp_path / "a", "--num", "3") == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000.png", "001.png", "002.png", "grid-000.png"]
    assert Image.open(tmp_path / "a" / "grid-000.png").size == (32, 32)
    assert generate(model_dir, tmp_path / "b.png", "--num", "3") == 0
    names = sorted(p.name for p in tmp_path.glob("b-*.png"))
    assert names == ["b-0.png", "b-1.png", "b-2.png", "b-grid.png"]
    assert Image.open(tmp_path / "a" / "001.png").tobytes() == Image.open(tmp_path / "b-1.png").tobytes()
    grid = json.loads(Image.open(tmp_path / "b-grid.png").text["homediff"])["grid"]
    assert [r["seed"] for r in grid] == [7, 8, 9]


def test_image_k_of_a_batch_is_made_again_alone_with_seed_plus_k(model_dir, tmp_path):
    assert generate(model_dir, tmp_path / "batch", "--num", "3") == 0
    assert generate(model_dir, tmp_path / "alone.png", "--seed", "9") == 0  # after --seed 7 given first
    third = Image.open(tmp_path / "batch" / "002.png")
    assert json.loads(third.text["homediff"])["seed"] == 9
    assert third.tobytes() == Image.open(tmp_path / "alone.png").tobytes()
    # drawn three at once, each image is its seed's up to the rounding of batched products: 8-bit
    # pixels then differ by at most one level
    assert generate(model_dir, tmp_path / "together", "--num", "3", "--batch-size", "3") == 0
    for k in range(3):
        batched = np.asarray(Image.open(tmp_path / "together" / f"00{k}.png"), dtype=int)
        assert np.abs(batched - np.asarray(Image.open(tmp_path / "batch" / f"00{k}.png"), dtype=int)).max() <= 1
    assert json.loads(Image.open(tmp_path / "together" / "002.png").text["homediff"])["height"] == 16


def test_several_prompts_from_flags_and_a_file(model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a blue dog\n\na green bird\n")
    assert generate(model_dir, tmp_path / "many", "--prompt", "a cat on a sofa", "--prompts",
                    str(tmp_path / "prompts.txt"), "--num", "2") == 0
    records = [json.loads(Image.open(p).text["homediff"]) for p in sorted((tmp_path / "many").glob("0*.png"))]
    assert [(r["prompt"], r["seed"]) for r in records] == [
        ("a red cat", 7), ("a red cat", 8), ("a cat on a sofa", 9), ("a cat on a sofa", 10),
        ("a blue dog", 11), ("a blue dog", 12), ("a green bird", 13), ("a green bird", 14)]
    assert main(["generate", "--model", str(model_dir), "--out", str(tmp_path / "x.png")]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--width", "30"], "width 30 is not a positive multiple of 4"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--cfg", "-2"], "guidance scale must be a number >= 0"),
    (["--sampler", "ddim"], "unknown sampler 'ddim'"),
])
def test_mistakes_are_reported(model_dir, tmp_path, capsys, extra, message):
    assert generate(model_dir, tmp_path / "x.png", *extra) == 2
    assert message in capsys.readouterr().err


def test_argument_mistakes_are_reported_before_the_model_loads(tmp_path, capsys):
    for extra, message in ((["--sampler", "ddim"], "unknown sampler 'ddim'"),
                           (["--prompts", str(tmp_path / "missing.txt")], "cannot read the prompts")):
        assert generate(tmp_path / "no-model", tmp_path / "x.png", *extra) == 2
        assert message in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    assert generate(tmp_path / "nothing", tmp_path / "x.png") == 2
    assert "nothing: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert generate(tmp_path / "empty", tmp_path / "x.png") == 2
    assert "neither a homediff pipeline folder" in capsys.readouterr().err


def test_released_checkpoint_file(tmp_path, capsys):
    files = hdm_release(tmp_path)
    out = tmp_path / "hdm.png"
    assert main(["generate", "a cat", "--model", str(files.checkpoint), "--out", str(out),
                 "--text-encoder", str(files.text_encoder), "--vae", str(files.vae_config),
                 "--arch", str(files.arch), "--width", "32", "--height", "24", "--steps", "1"]) == 0
    assert Image.open(out).size == (32, 24)


def test_nothing_is_overwritten_without_asking(model_dir, tmp_path, capsys):
    folder = tmp_path / "out"
    assert generate(model_dir, folder, "--num", "2") == 0
    first = (folder / "000.png").read_bytes()
    assert generate(model_dir, folder, "--num", "2", "--seed", "8") == 0  # numbered after them
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png", "002.png", "003.png",
                                                         "grid-000.png", "grid-002.png"]
    assert (folder / "000.png").read_bytes() == first
    single = tmp_path / "one.png"
    assert generate(model_dir, single) == 0
    before = single.read_bytes()
    assert generate(model_dir, single, "--seed", "9") == 2
    assert "one.png exists: pass --overwrite" in capsys.readouterr().err
    assert single.read_bytes() == before
    assert generate(model_dir, single, "--seed", "9", "--overwrite") == 0
    assert single.read_bytes() != before


@pytest.mark.parametrize("extra, message", [
    (["--num", "100000000"], "100,000,000 images (--num) is over the limit of 256"),
    (["--width", "65536", "--height", "65536"], "pixels per image is over the limit"),
    (["--steps", "2000000000"], "sampling steps is over the limit of 1,000"),
])
def test_oversized_requests_are_refused_before_the_model_loads(tmp_path, capsys, extra, message):
    """The model path does not exist: the limits are checked before anything is loaded."""
    assert generate(tmp_path / "no-model", tmp_path / "x.png", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "--force" in err


def test_a_request_beyond_free_memory_is_refused_unless_forced(model_dir, tmp_path, capsys, monkeypatch):
    from homediff import precision

    pipe = HomeDiffPipeline.from_pretrained(model_dir)
    one = pipe.memory_estimate(16, 16, 1)
    assert pipe.memory_estimate(16, 16, 2) == 2 * one  # linear in the images
    assert pipe.memory_estimate(32, 32, 1) > one  # grows with the pixels
    assert pipe.memory_estimate(16, 16, 1, guidance_scale=1) <= one  # one branch
    monkeypatch.setattr(precision, "available_memory", lambda device: one - 1)
    assert generate(model_dir, tmp_path / "x.png", "--width", "16", "--height", "16") == 2
    err = capsys.readouterr().err
    assert "1 image(s) of 16x16 at once need about" in err and "GiB is free on cpu" in err and "--force" in err
    assert not (tmp_path / "x.png").exists()
    assert generate(model_dir, tmp_path / "x.png", "--width", "16", "--height", "16", "--force") == 0


def test_lora_adapters_from_the_command_line(model_dir, tmp_path):
    """--lora PATH:SCALE: at scale 0 the image is the base model's, byte for byte; at 1 it differs;
    the PNG records the adapters."""
    from homediff.models import lora

    settings = lora.LoraSettings(rank=2, alpha=2.0)
    model = HomeDiffPipeline.from_pretrained(model_dir).transformer
    lora.add_adapter(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    lora.save_adapter(tmp_path / "style.safetensors", model, settings)
    assert generate(model_dir, tmp_path / "base.png") == 0
    assert generate(model_dir, tmp_path / "zero.png", "--lora", f"{tmp_path / 'style.safetensors'}:0") == 0
    assert generate(model_dir, tmp_path / "one.png", "--lora", str(tmp_path / "style.safetensors")) == 0
    pixels = {name: Image.open(tmp_path / f"{name}.png").tobytes() for name in ("base", "zero", "one")}
    assert pixels["zero"] == pixels["base"] != pixels["one"]
    record = json.loads(Image.open(tmp_path / "one.png").text["homediff"])
    assert record["lora"] == [[str(tmp_path / "style.safetensors"), 1.0]]
