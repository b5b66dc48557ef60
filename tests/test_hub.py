"""Hub ids work wherever a path does, read offline from a cache laid out as huggingface_hub lays
it out (models--OWNER--REPO/refs/main → snapshots/COMMIT/…)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_components import OFFICIAL_SMALL, hdm_release, tiny_pipeline_folder, tiny_vae, tiny_xut
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff import hub
from homediff.encoders.text import TextEncoder
from homediff.errors import CheckpointError
from homediff.pipeline import HomeDiffPipeline, is_pipeline_folder
from homediff.training.init import init_source, load_backbone


@pytest.fixture
def publish(tmp_path, monkeypatch):
    """``publish("owner/repo", folder)`` puts a copy of ``folder`` in an offline hub cache."""
    constants = pytest.importorskip("huggingface_hub").constants
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo_id: str, folder):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = f"{len(list(cache.glob('models--*'))) if cache.exists() else 0:040x}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit
    return put


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pipeline_folder(tmp_path_factory.mktemp("hub"))


def image(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


def test_ids_resolve_to_the_cached_snapshot_and_its_files(publish, folder):
    snapshot = publish("me/tiny", folder)
    assert hub.resolve("me/tiny") == snapshot
    assert hub.resolve("me/tiny/transformer") == snapshot / "transformer"
    assert hub.resolve("me/tiny/model_index.json") == snapshot / "model_index.json"
    assert hub.resolve(str(folder)) == folder  # a local path stays
    with pytest.raises(CheckpointError, match=r"model me/absent: .*offline: HF_HUB_OFFLINE.*me/absent"):
        hub.resolve("me/absent")
    with pytest.raises(CheckpointError, match="me/tiny has no 'nothing.bin'"):
        hub.resolve("me/tiny/nothing.bin")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        hub.resolve("not-a-path-nor-an-id")
    assert not hub.is_hub_id("../x/y") and not hub.is_hub_id("/abs/path") and hub.is_hub_id("a/b/c.safetensors")


def test_from_pretrained_and_generate_take_a_hub_id(publish, folder, tmp_path):
    publish("me/tiny", folder)
    assert is_pipeline_folder(folder)
    assert torch.equal(image(HomeDiffPipeline.from_pretrained("me/tiny")),
                       image(HomeDiffPipeline.from_pretrained(folder)))
    from homediff.app.cli import main

    for model, out in (("me/tiny", "hub.png"), (str(folder), "local.png")):
        assert main(["generate", "a cat", "--model", model, "--out", str(tmp_path / out), "--seed", "4",
                     "--steps", "2"]) == 0
    from PIL import Image

    hub_png, local_png = Image.open(tmp_path / "hub.png"), Image.open(tmp_path / "local.png")
    assert list(hub_png.getdata()) == list(local_png.getdata())
    assert json.loads(hub_png.text["homediff"])["model"] == "me/tiny"


def test_text_encoder_and_vae_by_hub_id(publish, tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    publish("me/vae", tmp_path / "vae")
    publish("me/text", text_encoder_folder(tmp_path / "text"))
    from homediff.encoders.autoencoders import load_autoencoder

    loaded = load_autoencoder("me/vae")
    assert all(torch.equal(a, b) for a, b in zip(loaded.vae.state_dict().values(), vae.state_dict().values()))
    options = {"dtype": "float32", "max_length": 16}
    assert torch.equal(TextEncoder.from_pretrained("me/text", **options).encode(["a red square"]),
                       TextEncoder.from_pretrained(tmp_path / "text", **options).encode(["a red square"]))


def test_a_released_file_by_repo_by_file_and_in_the_original_folder_layout(publish, tmp_path):
    release = hdm_release(tmp_path / "release")
    (tmp_path / "single").mkdir()
    shutil.copy(release.checkpoint, tmp_path / "single" / "hdm.safetensors")
    publish("me/release", tmp_path / "single")
    publish("me/vae-config", release.vae_config)
    options = dict(text_encoder=str(release.text_encoder), arch=release.arch, sample_size=16)
    expected = HomeDiffPipeline.from_hdm_release(release.checkpoint, vae=release.vae_config, **options)
    for spec in ("me/release", "me/release/hdm.safetensors"):
        pipe = HomeDiffPipeline.from_hdm_release(spec, vae="me/vae-config", **options)
        assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.state_dict().values(),
                                                     expected.transformer.state_dict().values()))

    # the original's diffusers layout: transformer/ with its arch as config.json and weights under
    # model., vae/ with weights
    layout = tmp_path / "layout"
    (layout / "transformer").mkdir(parents=True)
    arch = json.loads(release.arch.read_text())["config"]
    (layout / "transformer" / "config.json").write_text(json.dumps({"_class_name": "XUDiT", **arch}))
    save_file({"model." + k: v.contiguous() for k, v in release.backbone.items()},
              str(layout / "transformer" / "diffusion_pytorch_model.safetensors"))
    release.vae.save_pretrained(layout / "vae")
    (layout / "model_index.json").write_text(json.dumps({"_class_name": "HDMXUTPipeline"}))
    publish("me/layout", layout)
    assert not is_pipeline_folder(layout)  # its model_index.json names the original's class
    with pytest.raises(CheckpointError, match="does not name HomeDiffPipeline"):
        HomeDiffPipeline.from_pretrained(layout)
    pipe = HomeDiffPipeline.from_hdm_release("me/layout", text_encoder=str(release.text_encoder), sample_size=16)
    official = load_file(OFFICIAL_SMALL / "model.safetensors")
    state = pipe.transformer.state_dict()
    assert torch.equal(state["ctx_proj.weight"], official["ctx_proj.weight"].float())
    assert torch.equal(pipe.vae.vae.decoder.conv_out.weight, release.vae.decoder.conv_out.weight)


def test_init_from_a_hub_id(publish, folder, tmp_path):
    publish("me/tiny", folder)
    config = tiny_config(square_folder(tmp_path / "data"), text_encoder_folder(tmp_path / "text"),
                         init={"from": "me/tiny"})
    kind, path = init_source(config)
    assert kind == "folder" and path == hub.resolve("me/tiny")
    model = load_backbone(tiny_xut(seed=1), config)
    saved = HomeDiffPipeline.from_pretrained(folder).transformer.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
