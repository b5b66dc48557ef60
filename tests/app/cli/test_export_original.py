"""A ``homediff export --format hdm`` file read as the original reads it: the backbone built from
the exported arch JSON by a forward pass written from the specification (``hdm_reference``), with
the weights found by the original's key names, gives homediff's outputs on the fixture's shapes."""

import json

import pytest
import torch
from hdm_reference import original_forward
from safetensors.torch import load_file
from tiny_components import OFFICIAL_SMALL, qwen_folder, tiny_vae

from homediff.app.cli import main
from homediff.encoders.autoencoders import KLAutoencoder
from homediff.encoders.text import TextEncoder
from homediff.models import XUT, XUTConfig
from homediff.pipeline import HomeDiffPipeline

pytest.importorskip("diffusers")
EPS32 = torch.finfo(torch.float32).eps


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def official():
    """The original implementation's arch, weights and recorded inputs and outputs."""
    meta = json.loads((OFFICIAL_SMALL / "meta.json").read_text())
    return meta, load_file(OFFICIAL_SMALL / "model.safetensors"), load_file(OFFICIAL_SMALL / "io.safetensors")


def test_the_reference_is_the_original(official):
    """The spec-written forward pass reproduces the original implementation's recorded outputs
    (float16 weights, float32 recording: 64·eps32, as in test_xut), so it can stand in for it."""
    meta, weights, io = official
    out = original_forward(meta["config"], weights, io["x"], io["t"], io["ctx"], io["addon_info"])
    assert rel_err(out, io["out_default"].double()) < 64 * EPS32
    out = original_forward(meta["config"], weights, io["x"], io["t"], io["ctx"], io["addon_info"],
                           pos_map=io["pos_camera"])
    assert rel_err(out, io["out_camera"].double()) < 64 * EPS32


def test_the_export_is_read_by_the_originals_key_names_and_arch(official, tmp_path):
    """A model of the fixture's shapes with weights of its own, exported in float32: the
    reference built from the written arch JSON and the file's ``unet.model.*`` tensors computes
    homediff's function. Both run in float64, but homediff takes its rotary and time-embedding
    angles in float32 whatever the dtype: those roundings, carried through the same ~64 products
    and normalisations as in test_xut, stay under 64·eps32; a misplaced tensor costs far more."""
    meta, _, io = official
    torch.manual_seed(1)
    backbone = XUT(XUTConfig.from_hdm_config(meta["config"]))
    with torch.no_grad():
        for p in backbone.parameters():  # the zero-initialised layers too, so every key matters
            p.add_(torch.randn_like(p) * 0.05)
    encoder = TextEncoder.from_pretrained(qwen_folder(tmp_path / "qwen", hidden=96), dtype="float32")
    HomeDiffPipeline(backbone, encoder, KLAutoencoder(tiny_vae()), sample_size=16).save_pretrained(
        tmp_path / "model")
    out = tmp_path / "hdm.safetensors"
    assert main(["export", str(tmp_path / "model"), str(out), "--format", "hdm", "--dtype", "float32"]) == 0

    arch = json.loads(out.with_suffix(".json").read_text())
    weights = {k.removeprefix("unet.model."): v for k, v in load_file(out).items()
               if k.startswith("unet.model.")}
    model = backbone.double().eval()
    x, t, ctx, aspect = io["x"].double(), io["t"], io["ctx"].double(), io["addon_info"].double()
    with torch.no_grad():
        for pos_map in (None, io["pos_camera"]):
            ours = model(x, t, ctx, pos_map=pos_map, aspect=aspect)
            theirs = original_forward(arch, weights, x, t, ctx, aspect, pos_map=pos_map)
            assert rel_err(theirs, ours) < 64 * EPS32
