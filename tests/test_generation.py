"""One ``GenerationRequest``, three ways in: ``homediff generate``, the web page's ``Studio.request``
and the Python API (``generation.sample`` + ``save_png``) write the same PNG bytes, pixels and
metadata; image k is the pipeline's image for seed + k; and ``to_command`` reads back as the same
request."""

import shlex
import types
from pathlib import Path

import pytest
import torch
from tiny_components import tiny_pipeline_folder

from homediff import generation
from homediff.app.cli import build_parser, main
from homediff.app.cli.generate import request_of
from homediff.errors import ConfigError
from homediff.generation import GenerationRequest, sample
from homediff.pipeline import HomeDiffPipeline

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_pipeline_folder(tmp_path_factory.mktemp("generation"))


def test_the_cli_the_page_and_python_write_the_same_pngs(model_dir, tmp_path):
    from homediff.app.ui import Limits, Studio

    model = str(model_dir)  # the same model string everywhere: the records name it
    request = GenerationRequest(["a red cat"], seed=7, negative="blurry", steps=2, cfg=3.0, width=16,
                                height=16, num=2, sampler="heun", tread_gamma=(0.0, 0.25), zoom=1.5,
                                x_shift=0.25, y_shift=-0.5, dtype="float32", model=model)
    pipe = HomeDiffPipeline.from_pretrained(model_dir)

    images, records = generation.sample(pipe, request)  # Python
    (tmp_path / "api").mkdir()
    for k, (image, record) in enumerate(zip(images, records, strict=True)):
        generation.save_png(image, tmp_path / "api" / f"{k}.png", record)
    api = [(tmp_path / "api" / f"{k}.png").read_bytes() for k in range(2)]

    assert main(["generate", "a red cat", "--model", model, "--out", str(tmp_path / "cli.png"), "--seed", "7",
                 "--negative", "blurry", "--steps", "2", "--cfg", "3", "--width", "16", "--height", "16",
                 "--num", "2", "--sampler", "heun", "--tread-gamma", "0", "0.25", "--zoom", "1.5",
                 "--x-shift", "0.25", "--y-shift", "-0.5", "--dtype", "float32"]) == 0
    cli = [(tmp_path / f"cli-{k}.png").read_bytes() for k in range(2)]

    loading = dict(model=model, lora=[], dtype="float32", device=None, text_encoder=None, vae=None, arch=None)
    (tmp_path / "page").mkdir()
    studio = Studio(pipe, loading, Limits(), tmp_path / "page")
    paths, command, message = studio.request("a red cat", "blurry", 2, 3.0, 7, 16, 16, 2, "heun", 0.0, 0.25,
                                             1.5, 0.25, -0.5)
    assert message == "seed 7, 2 image(s)"
    page = [Path(p).read_bytes() for p in paths]
    assert cli == page == api

    # the page's command box makes them again
    words = shlex.split(command)
    words[words.index("--out") + 1] = str(tmp_path / "again.png")
    assert main(words[1:]) == 0
    assert [(tmp_path / f"again-{k}.png").read_bytes() for k in range(2)] == api

    # image k is the pipeline's own image for seed + k
    assert [r["seed"] for r in records] == [7, 8] and records[1]["model"] == model
    alone = pipe("a red cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=3.0, height=16,
                 width=16, sampler="heun", tread_gamma=(0.0, 0.25),
                 camera={"zoom": 1.5, "x_shift": 0.25, "y_shift": -0.5},
                 generator=torch.Generator().manual_seed(8)).images[0]
    assert Image.open(tmp_path / "cli-1.png").convert("RGB").tobytes() == alone.convert("RGB").tobytes()


@pytest.mark.parametrize("request_", [
    GenerationRequest(["a cat"], seed=0),
    GenerationRequest(["a cat, \"quoted\"", "-a dog", "a bird"], seed=12345, negative="-blurry, dark",
                      steps=7, cfg=3.1234567, height=24, width=None, num=3, batch_size=2, sampler="heun",
                      shift=1.5, tread_gamma=(0.1, 0.25), zoom=0.8, x_shift=-0.3, y_shift=0.15000000000000002,
                      lora=[(Path("a b/style.safetensors"), 0.5), (Path("ink.safetensors"), -1.0)],
                      dtype="bfloat16", model="owner/repo"),
], ids=["defaults", "everything"])
def test_the_command_reads_back_as_the_same_request(request_):
    loading = {"text_encoder": "qwen", "vae": "my vae", "arch": None, "device": "cpu"}
    args = build_parser().parse_args(shlex.split(request_.to_command(loading=loading))[1:])
    assert request_of(args, args.seed) == request_
    assert (args.text_encoder, args.vae, args.arch, args.device) == ("qwen", "my vae", None, "cpu")


def test_the_command_is_written_as_the_page_wrote_it():
    request = GenerationRequest(['a cat, "quoted"'], seed=1, negative="blurry", steps=2, cfg=3.5, width=24,
                                height=16, num=2, sampler="heun", tread_gamma=(0.0, 0.25), zoom=1.5,
                                y_shift=-0.5, lora=[(Path("a/style.safetensors"), 0.5)], dtype="float32",
                                model="runs/my model")
    assert request.to_command(loading={"vae": "vae-dir", "device": "cpu", "model": "ignored"}) == (
        "homediff generate 'a cat, \"quoted\"' --model 'runs/my model' --out out.png --seed 1 --steps 2 "
        "--cfg 3.5 --width 24 --height 16 --num 2 --sampler heun --dtype float32 --negative blurry "
        "--tread-gamma 0 0.25 --zoom 1.5 --y-shift -0.5 --vae vae-dir --device cpu "
        "--lora a/style.safetensors:0.5")


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "--steps must be at least 1, got 0"), ({"num": -1}, "--num must be at least 1, got -1"),
    ({"width": 0}, "--width must be at least 1, got 0"), ({"height": 0}, "--height must be at least 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"), ({"prompts": []}, "no prompt")])
def test_check_refuses_counts_and_sizes_below_one(change, message):
    with pytest.raises(ConfigError, match=message):
        GenerationRequest(**{"prompts": ["a cat"], "seed": 1, **change}).check()
    GenerationRequest(["a cat"], seed=1, width=16).check()


class RecordingPipe:
    """Records each call's prompts, images per prompt and the first draw of each generator; its
    "images" are those first draws, so that every image shows which generator made it."""

    sample_size = 8

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, num_images_per_prompt, generator, output_type, **settings):
        draws = [torch.rand(1, generator=g).item() for g in generator]
        self.calls.append((list(prompts), num_images_per_prompt))
        return types.SimpleNamespace(images=draws)


@pytest.mark.parametrize("num, batch_size, calls", [
    (2, 4, [(["a", "b"], 2), (["c"], 2)]),         # whole prompts per call
    (3, 2, [(["a"], 2), (["a"], 1), (["b"], 2), (["b"], 1), (["c"], 2), (["c"], 1)]),
    (1, 1, [(["a"], 1), (["b"], 1), (["c"], 1)]),
])
def test_image_k_comes_from_seed_plus_k_however_the_calls_are_cut(num, batch_size, calls):
    pipe = RecordingPipe()
    request = GenerationRequest(["a", "b", "c"], seed=40, num=num, batch_size=batch_size)
    images, records = sample(pipe, request)
    assert pipe.calls == calls
    assert [r["seed"] for r in records] == [40 + k for k in range(3 * num)]
    assert [r["index"] for r in records] == list(range(3 * num))
    assert [r["prompt"] for r in records] == [p for p in "abc" for _ in range(num)]
    assert images == [torch.rand(1, generator=torch.Generator().manual_seed(40 + k)).item()
                      for k in range(3 * num)]


def test_seed_requests_draw_each_seed_as_it_draws_alone():
    """The sample sheets' rule: a prompt's listed seeds, consecutive runs batched, each image the
    one a request of that seed alone draws."""
    requests = generation.seed_requests("a", [3, 4, 9], steps=5)
    assert [(r.seed, r.num, r.batch_size, r.steps) for r in requests] == [(3, 2, 2, 5), (9, 1, 1, 5)]
    batched = [image for r in requests for image in sample(RecordingPipe(), r)[0]]
    alone = [sample(RecordingPipe(), GenerationRequest(["a"], seed=s))[0][0] for s in (3, 4, 9)]
    assert batched == alone
