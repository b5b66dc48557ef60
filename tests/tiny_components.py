"""Tiny random components built offline for the text, autoencoder and pipeline tests."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: The original implementation's outputs on a small random model (tests/fixtures/…/README.md).
OFFICIAL_SMALL = Path(__file__).resolve().parent / "fixtures" / "xut-official-small"
CORPUS = ["a photo of a cat on a red sofa", "a blue square next to a green circle",
          "the quick brown fox jumps over the lazy dog", "一只猫 в снегу café"]


def qwen_folder(path: Path, hidden: int = 32) -> Path:
    """A tiny Qwen3 model with a byte-level BPE tokenizer (no BOS/EOS, pad <|endoftext|>)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=128)
    torch.manual_seed(0)
    Qwen3Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bert_folder(path: Path, hidden: int = 32) -> Path:
    """A tiny BERT with a WordPiece tokenizer ([CLS] text [SEP])."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=specials, show_progress=False))
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, pad_token="[PAD]",
                                        unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                        model_max_length=64)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=2 * hidden,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_vae(latent_channels: int = 4, **config):
    """A random AutoencoderKL with spatial factor 2."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, **config)


def tiny_xut(ctx_dim: int = 32, in_channels: int = 4, seed: int = 0):
    """A tiny XUT whose zero-initialised layers are made random, so its output depends on everything."""
    from homediff.models import XUT, XUTConfig

    torch.manual_seed(seed)
    config = XUTConfig(dim=32, ctx_dim=ctx_dim, head_dim=16, mlp_dim=64, depth=1, enc_blocks=1,
                       dec_blocks=1, tread_pre_blocks=1, tread_post_blocks=1, in_channels=in_channels)
    model = XUT(config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.2)
    return model.eval()


RELEASE_MEAN, RELEASE_STD = [0.1, -0.2, 0.3, 0.4], [2.0, 3.0, 4.0, 5.0]


def hdm_release(root: Path) -> SimpleNamespace:
    """A single file laid out as HDM releases it (hdm-spec §7): the xut-official-small backbone under
    ``unet.model.``, a tiny VAE under ``vae.`` with ``vae_mean``/``vae_std``, and text-encoder weights
    under ``te.text_models.0.``; beside it the VAE's config (no weights) and a 96-d tiny Qwen3."""
    from safetensors.torch import load_file, save_file

    from homediff.encoders.text import TextEncoder

    backbone = load_file(OFFICIAL_SMALL / "model.safetensors")
    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # only the config is needed
    qwen = qwen_folder(root / "qwen", hidden=96)
    encoder = TextEncoder.from_pretrained(qwen, dtype="float32")
    te = {k: v + 0.5 for k, v in encoder.model.state_dict().items()}
    state = {"unet.model." + k: v for k, v in backbone.items()}
    state |= {"vae." + k: v.half() for k, v in vae.state_dict().items()}
    state |= {"te.text_models.0." + k: v for k, v in te.items()}
    state |= {"vae_mean": torch.tensor(RELEASE_MEAN).view(1, 4, 1, 1),
              "vae_std": torch.tensor(RELEASE_STD).view(1, 4, 1, 1)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "hdm.safetensors"))
    return SimpleNamespace(checkpoint=root / "hdm.safetensors", text_encoder=qwen,
                           vae_config=root / "vae", arch=OFFICIAL_SMALL / "meta.json",
                           backbone=backbone, vae=vae, te=te)


def tiny_pipeline_folder(root: Path) -> Path:
    """A saved pipeline folder (``root/model``) of a tiny XUT, a tiny Qwen3 in float32 and a tiny
    VAE, at sample size 16: the command-line and web-page tests generate from it."""
    from homediff.encoders.autoencoders import KLAutoencoder
    from homediff.encoders.text import TextEncoder
    from homediff.pipeline import HomeDiffPipeline

    encoder = TextEncoder.from_pretrained(qwen_folder(root / "qwen"), dtype="float32")
    HomeDiffPipeline(tiny_xut(), encoder, KLAutoencoder(tiny_vae()), sample_size=16).save_pretrained(
        root / "model")
    return root / "model"


def random_adapter(path: Path, settings, seed: int) -> Path:
    """A LoRA adapter file for ``tiny_xut`` whose B matrices are random, so that it changes the output."""
    from homediff.models import lora

    model = tiny_xut()
    lora.add_adapter(model, settings)
    with torch.no_grad():
        draw = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=draw) * 0.3)
    lora.save_adapter(path, model, settings)
    return path
