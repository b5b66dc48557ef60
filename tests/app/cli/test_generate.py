import json
import re

import numpy as np
import pytest
import torch
from tiny_components import hdm_release, tiny_pipeline_folder

from homediff.app.cli import main
from homediff.errors import CheckpointError
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
        "Model: model, Camera: \"zoom 1.5, x 0, y 0\", Routing gamma: 0/0.25, Schedule shift: 1")
    record = json.loads(image.text["homediff"])
    assert record["seed"] == 7 and record["negative_prompt"] == "blurry"
    assert record["camera"]["zoom"] == 1.5 and record["tread_gamma"] == [0.0, 0.25]
    assert record["sampler"] == "heun" and record["size"] == [24, 16]
    assert "seed 7" in capsys.readouterr().out


#: A1111's reader of the ``parameters`` text, in its documented form (modules/infotext_utils.py:
#: ``re_param``, ``unquote`` and ``parse_generation_parameters``): the last line holds the
#: settings as ``Key: value`` pairs split by commas, a value in double quotes being a JSON string;
#: the lines before it are the prompt, then from ``Negative prompt:`` on the negative prompt.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in A1111_PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        fields[key] = value
    return fields


def test_the_parameters_text_reads_back_with_a1111s_parser():
    """Every key homediff writes comes back whole, commas, colons and quotes included."""
    from homediff.generation import parameters_text

    record = {"prompt": 'a cat, "sitting": on a mat', "negative_prompt": "blurry, dark",
              "num_inference_steps": 24, "sampler": "euler", "guidance_scale": 3.5, "seed": 7,
              "size": [64, 32], "model": "/models/my model, v2: final", "shift": 1.5,
              "camera": {"zoom": 1.5, "x_shift": 0.2, "y_shift": -0.5}, "tread_gamma": [0.0, 0.25],
              "lora": [["/a/style, soft.safetensors", 0.5], ["/a/ink.safetensors", -1.0]]}
    assert a1111_parse(parameters_text(record)) == {
        "Prompt": 'a cat, "sitting": on a mat', "Negative prompt": "blurry, dark",
        "Steps": "24", "Sampler": "euler", "CFG scale": "3.5", "Seed": "7", "Size": "64x32",
        "Model": "my model, v2: final", "Camera": "zoom 1.5, x 0.2, y -0.5",
        "Routing gamma": "0/0.25", "Schedule shift": "1.5", "Lora": "style, soft:0.5, ink:-1"}
    plain = a1111_parse(parameters_text(record | {"negative_prompt": "", "lora": [],
                                                  "model": 'say "hi"'}))
    assert plain["Negative prompt"] == "" and "Lora" not in plain and plain["Model"] == 'say "hi"'


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


def test_a_runs_single_file_draws_with_the_encoders_of_the_folder_beside_it(tmp_path, capsys):
    """``--model RUN/model.safetensors`` is the file's backbone with ``RUN/model``'s text encoder and
    autoencoder: the same pixels as a pipeline folder of that backbone and those encoders."""
    from tiny_components import tiny_xut

    from homediff.models.backbone_file import save_backbone_file

    run = tiny_pipeline_folder(tmp_path / "run").parent
    backbone = tiny_xut(seed=5)  # other weights than the folder's, so that the file must be read
    save_backbone_file(run / "model.safetensors", backbone)
    beside = HomeDiffPipeline.from_pretrained(run / "model")
    HomeDiffPipeline(backbone, beside.text_encoder, beside.vae,
                     sample_size=beside.sample_size).save_pretrained(tmp_path / "same")
    assert generate(run / "model.safetensors", tmp_path / "file.png") == 0
    assert generate(tmp_path / "same", tmp_path / "folder.png") == 0
    assert generate(run / "model", tmp_path / "run.png") == 0
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("file", "folder", "run")}
    assert np.array_equal(pixels["file"], pixels["folder"])
    assert not np.array_equal(pixels["file"], pixels["run"])

    alone = tmp_path / "alone"
    alone.mkdir()
    save_backbone_file(alone / "model.safetensors", backbone)
    assert generate(alone / "model.safetensors", tmp_path / "x.png") == 2
    assert "single file holds the backbone alone" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a released HDM file"):
        HomeDiffPipeline.from_hdm_release(run / "model.safetensors")


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
    (["--num", "100000000"], "100,000,000 images (1 prompt × --num 100000000) is over the limit of 256"),
    (["--width", "65536", "--height", "65536"], "pixels per image is over the limit"),
    (["--steps", "2000000000"], "sampling steps is over the limit of 1,000"),
])
def test_oversized_requests_are_refused_before_the_model_loads(tmp_path, capsys, extra, message):
    """The model path does not exist: the limits are checked before anything is loaded."""
    assert generate(tmp_path / "no-model", tmp_path / "x.png", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "--force" in err


def test_the_images_of_all_prompts_together_are_limited(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    assert generate(tmp_path / "no-model", tmp_path / "x.png", "--prompts", str(tmp_path / "prompts.txt"),
                    "--num", "100") == 2
    err = capsys.readouterr().err
    assert "400 images (4 prompts × --num 100) is over the limit of 256" in err and "--force" in err


def test_images_are_written_as_they_are_made(model_dir, tmp_path, monkeypatch):
    """A run stopped after its first image has written that image."""
    from homediff.errors import HomediffError

    drawn, call = [], HomeDiffPipeline.__call__

    def stop_at_the_second(pipe, *args, **kwargs):
        if drawn:
            raise HomediffError("stopped")
        drawn.append(1)
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(HomeDiffPipeline, "__call__", stop_at_the_second)
    assert generate(model_dir, tmp_path / "out", "--num", "3") == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000.png"]
    assert json.loads(Image.open(tmp_path / "out" / "000.png").text["homediff"])["seed"] == 7


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


@pytest.mark.parametrize("dtype, speedup, expected", [
    ("float32", 4.0, torch.float32), ("bfloat16", 0.05, torch.bfloat16),  # a name wins
    ("auto", 0.05, torch.float32), ("auto", 4.0, torch.bfloat16)])  # bfloat16 emulated; native
def test_dtype_is_the_transformers_precision_while_it_draws(model_dir, tmp_path, monkeypatch, dtype,
                                                            speedup, expected):
    """--dtype names the transformer's dtype, or "auto" takes bfloat16 where it is measured clearly
    faster (the measurement injected: bfloat16 20× slower, as on an AVX2 CPU, or 4× faster)."""
    from homediff.precision import measured_with

    drawn_in, call = [], HomeDiffPipeline.__call__

    def watched(self, *args, **kwargs):
        drawn_in.append(next(self.transformer.parameters()).dtype)
        return call(self, *args, **kwargs)
    monkeypatch.setattr(HomeDiffPipeline, "__call__", watched)
    with measured_with(lambda shape, device: speedup):
        assert main(["generate", "a red cat", "--model", str(model_dir), "--out", str(tmp_path / "x.png"),
                     "--steps", "1", "--seed", "7", "--dtype", dtype]) == 0
    assert drawn_in == [expected]
    assert Image.open(tmp_path / "x.png").size == (16, 16)
