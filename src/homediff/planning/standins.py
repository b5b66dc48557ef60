"""Stand-ins for what a training config needs but a rehearsal should not download or read: the
encoders at their real shapes with random weights, built from their configs alone, and a stream
of random images and captions at a stage's shapes.

An encoder whose config ships with homediff (HDM's Qwen3-0.6B and EQ-SDXL VAE) is built from it;
any other is the real one where it is installed offline (the default all-MiniLM, a local folder,
the hub's cache), else built from its config.json found the same way (``plan.encoder_config``).
The stand-in text encoder tokenises bytes: every UTF-8 byte of a caption is one token, captions
are padded or cut to the stage's text length as the config says.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from homediff.data.crop import crop_offset, resized_size
from homediff.encoders.text import TextEncoder
from homediff.errors import CheckpointError, ConfigError
from homediff.geometry import crop_window
from homediff.planning.plan import SHIPPED_CONFIGS, encoder_config
from homediff.training.components import build_autoencoder, build_text_encoder
from homediff.training.config import TrainConfig

logger = logging.getLogger(__name__)

PAD = "<|endoftext|>"
WORDS = ("cat", "girl", "city", "forest", "night", "red", "blue", "smile", "river", "mountain",
         "solo", "hat", "rain", "window", "flower", "sky", "masterpiece", "dress", "lamp", "snow")


def text_model(config: dict, dtype: torch.dtype | None = None):
    """A transformers model of this ``config.json`` (its ``model_type``) with random weights."""
    from transformers import AutoConfig, AutoModel

    values = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    architecture = AutoConfig.for_model(**values)
    return AutoModel.from_config(architecture, **({"dtype": dtype} if dtype else {}))


def vae_model(config: dict):
    """A diffusers AutoencoderKL of this config with random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def byte_tokenizer():
    """A byte-level tokenizer without merges or special tokens but its pad token (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)} | {PAD: len(alphabet)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([PAD])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD)


def _shipped(name: str) -> bool:
    return name.lower() in SHIPPED_CONFIGS


def text_encoder(config: TrainConfig, device: torch.device) -> TextEncoder:
    """The config's text encoder, or its stand-in (see the module's docstring)."""
    name, options = config.text_encoder.name, config.text_encoder.options
    if not _shipped(name):
        try:
            return build_text_encoder(config, device)
        except CheckpointError as err:
            logger.info("text encoder %s is not installed (%s): a stand-in from its config", name, err)
    architecture = encoder_config(name, "text encoder")
    tokenizer = byte_tokenizer()
    if architecture["vocab_size"] < len(tokenizer):
        raise ConfigError(f"text encoder {name}: its vocabulary ({architecture['vocab_size']}) is "
                          f"smaller than the stand-in tokenizer's {len(tokenizer)} byte tokens")
    dtype = None if options.dtype == "auto" else getattr(torch, options.dtype)
    with torch.device(device):
        model = text_model(architecture, dtype)
    encoder = TextEncoder(tokenizer, model, dataclasses.replace(options), source=f"{name} (random weights)")
    return encoder.to(device)


def autoencoder(config: TrainConfig, device: torch.device):
    """The config's autoencoder, or its stand-in (see the module's docstring)."""
    from homediff.encoders.autoencoders import KLAutoencoder

    name = config.autoencoder.name
    if name == "pixel" or not _shipped(name):
        try:
            return build_autoencoder(config, device)
        except CheckpointError as err:
            logger.info("autoencoder %s is not installed (%s): a stand-in from its config", name, err)
    with torch.device(device):
        return KLAutoencoder(vae_model(encoder_config(name, "autoencoder")))


class RandomStream:
    """The trainer's batch stream (``training.batches.BatchStream``) over random data: images in
    [−1, 1] at the stage's resolution, square crops of random aspect ratios with their position
    maps (``data.crop``), captions of random words that fit the stage's text length. Endless: an
    epoch never ends."""

    kind = "random"

    def __init__(self, resolution: int, batch_size: int, text_length: int, seed: int):
        self.resolution, self.batch_size, self.text_length, self.seed = (resolution, batch_size,
                                                                         text_length, seed)

    def __len__(self) -> int:
        return 10 ** 9  # batches per epoch, for stages given in epochs: the rehearsal stops first

    def close(self) -> None:
        """No loader processes to stop."""

    def epoch(self, epoch: int, start_batch: int):
        draw = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        index = start_batch
        while True:
            yield self.batch(draw, index)
            index += 1

    def batch(self, draw: torch.Generator, index: int) -> dict:
        size, crops = self.resolution, []
        for _ in range(self.batch_size):
            aspect = math.exp((torch.rand(1, generator=draw).item() - 0.5) * math.log(4))  # 1:2 to 2:1
            full_h, full_w = resized_size(size, max(1, round(size * aspect)), size)
            top = crop_offset(full_h, size, "random", draw) if full_h > size else 0
            left = crop_offset(full_w, size, "random", draw) if full_w > size else 0
            crops.append((crop_window(full_h, full_w, top, left, size, size), math.log(full_w / full_h)))
        return {"image": torch.rand(self.batch_size, 3, size, size, generator=draw) * 2 - 1,
                "pos": torch.stack([pos for pos, _ in crops]),
                "aspect": torch.tensor([aspect for _, aspect in crops], dtype=torch.float32),
                "caption": [self.caption(draw) for _ in range(self.batch_size)],
                "key": [f"random-{index}-{i}" for i in range(self.batch_size)],
                "problems": {}}

    def caption(self, draw: torch.Generator) -> str:
        """Random words, as many as fit the text length in bytes (so in tokens of the byte
        tokenizer, with room for two special tokens), so that none is cut."""
        words: list[str] = []
        for i in torch.randint(len(WORDS), (self.text_length,), generator=draw).tolist():
            if len(", ".join([*words, WORDS[i]])) > self.text_length - 2:
                break
            words.append(WORDS[i])
        return ", ".join(words)

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


def random_stream(config: TrainConfig, index: int, device: torch.device) -> RandomStream:
    """Stage ``index``'s random stream (the ``Builders.stream`` signature)."""
    stage = config.stages[index]
    return RandomStream(stage.resolution, stage.batch_size, stage.text_length, config.train.seed + index)

