"""FID and CLIP score from user-supplied weights, tested with randomly initialised networks of the
real architectures (the real weight files cannot be had here): the loaders, the plumbing into
``homediff eval`` and its report, and the Fréchet formula against scipy's."""

import json

import numpy as np
import pytest
import torch
from test_evaluation import FAST, Oracle, shapes_data  # noqa: F401 (shapes_data: a fixture)

from homediff.app.cli import main
from homediff.errors import CheckpointError
from homediff.evaluation import EvalSettings, evaluate_fidelity, frechet_distance, markdown
from homediff.evaluation import inception
from homediff.evaluation.clip_score import load_clip

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = torch.finfo(torch.float64).eps
SMALL = FAST | dict(seen=4, heldout=2, size=16)  # a Fréchet distance in 2048-d takes seconds


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """FID's Inception at its real architecture with seeded random weights (He-normal
    convolutions, so activations keep their scale through the depth), saved as a state dict."""
    generator = torch.Generator().manual_seed(0)
    model = inception.FIDInceptionV3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, generator=generator)
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(model.state_dict(), path)
    return path


def _images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_inception_network_has_the_layout_of_pytorch_fids_file(inception_file):
    model = inception.load_inception(inception_file)
    # torchvision's Inception-v3 has 27,161,264 parameters; without its auxiliary head (3,326,696)
    # and with the 1008 classes of TensorFlow's graph (8 more rows of 2049) it is FID's network
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    state = model.state_dict()
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["fc.weight"].shape == (1008, 2048)
    assert sum(k.endswith("conv.weight") for k in state) == 94
    assert torch.equal(state["Conv2d_1a_3x3.conv.weight"],
                       torch.load(inception_file)["Conv2d_1a_3x3.conv.weight"])
    features = inception.features(_images(2), model)
    assert features.shape == (2, 2048) and features.std() > 0


def test_fid_of_a_set_is_zero_against_itself_and_grows_with_noise(inception_file):
    model = inception.load_inception(inception_file)
    images = _images(6)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    clean = inception.features(images, model)
    noisy = [inception.features((images + s * noise).clamp(-1, 1), model) for s in (0.1, 0.4)]
    # With fewer images than the 2048 dimensions the covariance Σ is singular: the eigenvalues of
    # Σ^½ Σ Σ^½ that are exactly 0 come out of the float64 eigensolver as ±D·eps·λmax², and their
    # square roots, up to √(D·eps)·λmax each, add up over the D dimensions. (λmax of Σ = X̃ᵀX̃/(n−1)
    # is that of the small X̃X̃ᵀ/(n−1).)
    centred = clean.double() - clean.double().mean(0)
    largest = float(torch.linalg.eigvalsh(centred @ centred.T / (len(clean) - 1)).max())
    tolerance = 2048 * (2048 * EPS) ** 0.5 * largest
    assert frechet_distance(clean, clean) == pytest.approx(0, abs=tolerance)
    distances = [frechet_distance(clean, f) for f in noisy]
    assert tolerance < distances[0] < distances[1]


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance as pytorch-fid computes it: scipy's matrix square root of Σa·Σb."""
    from scipy import linalg

    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.trace(linalg.sqrtm(sa @ sb).real))


def test_frechet_distance_agrees_with_scipy():
    pytest.importorskip("scipy")
    generator = torch.Generator().manual_seed(0)
    dim = 16
    a = torch.randn(500, dim, generator=generator, dtype=torch.float64) @ torch.randn(
        dim, dim, generator=generator, dtype=torch.float64)
    b = torch.randn(500, dim, generator=generator, dtype=torch.float64) * 2 + 0.5
    ours, theirs = frechet_distance(a, b), _scipy_frechet(a.numpy(), b.numpy())
    # Both take the square roots of the eigenvalues μ of Σa^½ Σb Σa^½ (each within D·eps·μmax),
    # which magnifies an error by 1/(2√μmin); D of them, in each implementation
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(sa)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    mu = torch.linalg.eigvalsh(root @ sb @ root)
    tolerance = 2 * dim * dim * EPS * float(mu.max() / (2 * mu.min().sqrt()))
    assert ours == pytest.approx(theirs, abs=tolerance)
    assert ours > 100 * tolerance


def test_a_torchscript_inception_is_called_as_stylegan_calls_it(tmp_path):
    class Fake(torch.nn.Module):
        """Returns the first 2048 pixel values it is given, as floats."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert img.dtype == torch.uint8 and return_features
            return img.float().flatten(1)[:, :2048] * self.scale

    torch.jit.save(torch.jit.script(Fake()), tmp_path / "inception-2015-12-05.pt")
    model = inception.load_inception(tmp_path / "inception-2015-12-05.pt")
    images = _images(3)
    expected = ((images + 1) * 127.5).round().flatten(1)[:, :2048]
    assert torch.equal(inception.features(images, model), expected)


def test_wrong_inception_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pth: no such file.*pt_inception-2015-12-05"):
        inception.load_inception(tmp_path / "nowhere.pth")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for name in ("linear.pth", "junk.pth"):
        with pytest.raises(CheckpointError, match=f"{name}: not the FID Inception network"):
            inception.load_inception(tmp_path / name)


# CLIP: a small random model in transformers' layout, and the same weights in open_clip's layout

def _tokenizer_files(folder):
    """A CLIP tokenizer's files with a byte-level vocabulary (every byte alone and word-final, then
    the start and end tokens, the end token last as in CLIP's) and no merges."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def _open_clip_state(hf: dict) -> dict:
    """transformers' CLIPModel weights under open_clip's names (OpenAI's layout)."""
    out = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": hf["text_model.final_layer_norm.weight"],
           "ln_final.bias": hf["text_model.final_layer_norm.bias"],
           "text_projection": hf["text_projection.weight"].T, "logit_scale": hf["logit_scale"],
           "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
           "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
           "visual.proj": hf["visual_projection.weight"].T}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"visual.{ours}.{kind}"] = hf[f"vision_model.{theirs}.{kind}"]
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        for i in range(2):
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                    [hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                for theirs, ours in (("self_attn.out_proj", "attn.out_proj"),
                                     ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[f"{dst}{ours}.{kind}"] = hf[f"{src}{theirs}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


OPEN_CLIP_CONFIG = {"model_cfg": {"quick_gelu": True, "text_cfg": {"heads": 4},
                                  "vision_cfg": {"head_width": 32}}}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A random 2-layer CLIP (128 wide, 4 heads of 32, QuickGELU, 32 px images) saved in
    transformers' layout, and as open_clip .bin and .safetensors files with and without
    open_clip_config.json beside them."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer.from_pretrained(str(_tokenizer_files(root / "tokenizer")))
    tower = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="quick_gelu")
    config = CLIPConfig(
        text_config=tower | dict(vocab_size=len(tokenizer), max_position_embeddings=16,
                                 bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id),
        vision_config=tower | dict(image_size=32, patch_size=8), projection_dim=64)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    state = _open_clip_state(model.state_dict())
    for name in ("bin", "safetensors", "bare"):
        _tokenizer_files(root / name)
        if name != "bare":
            (root / name / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    torch.save(state, root / "bin" / "open_clip_pytorch_model.bin")
    torch.save(state, root / "bare" / "open_clip_pytorch_model.bin")
    save_file(state, root / "safetensors" / "open_clip_model.safetensors")
    return root, model


CAPTIONS = ["a red circle", "two blue squares above a green triangle", "a cat", "x" * 40]


def _embeddings(scorer, images, captions):
    tokens = scorer.tokenizer(captions, padding=True, truncation=True, max_length=16,
                              return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           pixel_values=scorer.prepare(images))
    return out.image_embeds, out.text_embeds


@pytest.mark.parametrize("where", ["hf", "bin/open_clip_pytorch_model.bin",
                                   "safetensors/open_clip_model.safetensors", "safetensors"])
def test_every_clip_layout_gives_the_models_own_embeddings(clip_files, where):
    root, model = clip_files
    scorer = load_clip(root / where)
    images = _images(4)
    pixels = ((images + 1) / 2 - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)) \
        / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    tokens = scorer.tokenizer(CAPTIONS, padding=True, truncation=True, max_length=16,
                              return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    got_image, got_text = _embeddings(scorer, images, CAPTIONS)
    torch.testing.assert_close(got_image, torch.nn.functional.normalize(image, dim=-1))
    torch.testing.assert_close(got_text, torch.nn.functional.normalize(text, dim=-1))
    cosine = torch.nn.functional.cosine_similarity(image.double(), text.double())
    scores = scorer(images, CAPTIONS, batch_size=3)
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0), rtol=0, atol=1e-4)
    assert tokens["input_ids"].shape[1] == 16  # the long caption fills the context: it was cut


def test_an_open_clip_file_without_its_config_assumes_64_wide_heads_and_gelu(clip_files, caplog):
    root, model = clip_files
    scorer = load_clip(root / "bare/open_clip_pytorch_model.bin")
    assert "no open_clip_config.json" in caplog.text
    config = scorer.model.config
    assert config.text_config.num_attention_heads == config.vision_config.num_attention_heads == 2
    assert config.vision_config.hidden_act == "gelu" and config.vision_config.image_size == 32
    reference = _embeddings(load_clip(root / "hf"), _images(2), CAPTIONS[:2])
    assert not torch.allclose(_embeddings(scorer, _images(2), CAPTIONS[:2])[0], reference[0])


def test_clip_preparation_cuts_the_centre_of_the_short_side(clip_files):
    scorer = load_clip(clip_files[0] / "hf")
    ramp = torch.linspace(-1, 1, 60).expand(1, 3, 40, 60)  # brightness grows left to right
    pixels = scorer.prepare(ramp) * scorer.std + scorer.mean
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels.mean() == pytest.approx(0.5, abs=0.01)  # symmetric about the centre
    assert 0.15 < float(pixels[..., 0].mean()) < 0.25  # the crop's first column, 8 of 48
    assert 0.75 < float(pixels[..., -1].mean()) < 0.85


def test_wrong_clip_files_are_named(clip_files, inception_file, tmp_path):
    root, _ = clip_files
    with pytest.raises(CheckpointError, match="nowhere: no such file or folder; --clip takes"):
        load_clip(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds neither config.json nor"):
        load_clip(tmp_path)
    lonely = tmp_path / "lonely" / "open_clip_pytorch_model.bin"
    lonely.parent.mkdir()
    lonely.write_bytes((root / "bin/open_clip_pytorch_model.bin").read_bytes())
    with pytest.raises(CheckpointError, match="no CLIP tokenizer.*vocab.json and merges.txt"):
        load_clip(lonely)
    with pytest.raises(CheckpointError, match="inception.pth: not the weights of an open_clip ViT"):
        load_clip(inception_file)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "siglip"}')
    with pytest.raises(CheckpointError, match="model_type 'siglip', not a CLIP model"):
        load_clip(tmp_path / "other")


def test_fid_and_clip_score_join_the_fidelity_report(shapes_data, inception_file, clip_files,
                                                      tmp_path):
    """The oracle returns the references at the model's resolution (16 px, the data's 32), so FID
    and the CLIP score of its images equal their round-trip ceilings."""
    settings = EvalSettings(**SMALL, inception_weights=str(inception_file),
                            clip=str(clip_files[0] / "hf"))
    report = evaluate_fidelity(Oracle(shapes_data), shapes_data, settings, out=tmp_path)
    fid, clip = report["fid"], report["clip_score"]
    assert fid["samples"] == report["fd"]["samples"] == [6, 6]
    assert fid["generated"] == pytest.approx(fid["round_trip"], rel=1e-9) and fid["generated"] > 0
    for split in ("seen", "heldout"):
        assert clip[split]["generated"] == pytest.approx(clip[split]["ceiling"], abs=1e-4)
        assert 0 <= clip[split]["generated"] <= 100
    table = (tmp_path / "eval.md").read_text()
    assert f"| FID (Inception-v3 pool3 features, inception.pth) | {fid['generated']:.2f} |" in table
    assert "| CLIP score (hf) | seen | ceiling | held-out | ceiling |" in table
    assert "not comparable with published FIDs" not in table and "No CLIP score" not in table
    plain = markdown(report | {"fid": None, "clip_score": None})
    assert "FD-EffNetLite0 is not FID" in plain and "`--inception-weights`" in plain
    assert "No CLIP score: give a local CLIP model (`--clip`)" in plain


@pytest.fixture
def oracle_command(shapes_data, monkeypatch):
    """``homediff eval`` with the noise-making oracle in place of the loaded pipeline."""
    from homediff.pipeline import HomeDiffPipeline

    class Loaded(Oracle):
        def to(self, device):
            return self

    monkeypatch.setattr(HomeDiffPipeline, "from_pretrained",
                        staticmethod(lambda folder: Loaded(shapes_data, noise=True)))
    return ["eval", "model", "--data", str(shapes_data), "--per-caption", "1", "--seen", "4",
            "--heldout", "2", "--distractors", "2", "--feature-size", "64", "--size", "16",
            "--no-cache"]


def test_the_command_line_flags_reach_the_report(oracle_command, inception_file, clip_files,
                                                 tmp_path, capsys):
    clip = clip_files[0] / "bin/open_clip_pytorch_model.bin"
    assert main([*oracle_command, "--out", str(tmp_path), "--inception-weights",
                 str(inception_file), "--clip", str(clip)]) == 0
    assert "| FID (Inception-v3 pool3 features, inception.pth) |" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["settings"]["inception_weights"] == str(inception_file)
    assert report["fid"]["weights"] == str(inception_file)
    assert report["clip_score"]["weights"] == str(clip)
    assert report["fid"]["generated"] > 2 * report["fid"]["round_trip"] > 0  # noise is far
    assert report["fid"]["samples"] == [6, 6] and report["clip_score"]["heldout"]["ceiling"] >= 0


def test_the_command_names_a_missing_or_misplaced_file(oracle_command, tmp_path, capsys):
    assert main([*oracle_command, "--inception-weights", str(tmp_path / "gone.pth")]) == 2
    assert "gone.pth: no such file; --inception-weights takes" in capsys.readouterr().err
    assert main([*oracle_command[:1], "shapes", *oracle_command[1:], "--clip", str(tmp_path)]) == 2
    assert "`homediff eval shapes` takes neither" in capsys.readouterr().err
