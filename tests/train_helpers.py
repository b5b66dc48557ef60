"""A tiny training set-up for the trainer's tests: coloured-square images, a tiny BERT, a tiny XUT."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from homediff.training.config import TrainConfig, config_from_dict
from homediff.training.loop import Trainer

EPS32 = torch.finfo(torch.float32).eps
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "black": (10, 10, 10), "purple": (140, 40, 160), "orange": (240, 140, 20), "cyan": (30, 200, 210)}


def square_folder(root: Path, size: int = 24) -> Path:
    """Eight images, each a coloured square on white with the colour as its caption."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (size + 8 * (i % 3), size), "white")  # some are wider than tall
        image.paste(rgb, (4, 4, size - 4, size - 4))
        image.save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {name} square")
    return root


def text_encoder_folder(path: Path, hidden: int = 32) -> Path:
    """A tiny BERT with a fixed word-level vocabulary (trained tokenizers differ between processes,
    which would make loss curves differ too)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "square", *COLOURS]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=32)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=hidden, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=2 * hidden,
                         max_position_embeddings=32)).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def tiny_config(data: Path, text_dir: Path, **sections) -> TrainConfig:
    """A config that trains in well under a second per step on a CPU."""
    raw = {
        "model": {"preset": "xut-tiny", "overrides": {"dim": 32, "head_dim": 16, "mlp_dim": 64,
                                                      "depth": 1, "dec_blocks": 1}},
        "text_encoder": {"name": str(text_dir), "options": {"padding": "max_length",
                                                             "max_length": 6, "dtype": "float32"}},
        "dataset": {"path": str(data), "workers": 0},
        "optimizer": {"warmup_steps": 2},
        "ema": {"decay": 0.9},
        "train": {"seed": 0, "checkpoint_every": 1000, "log_every": 2, "sample_prompts": [],
                  "mixed_precision": "no"},  # not "auto": a measured choice may differ between runs
        "stages": [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 10, "tread_rate": 0.5}],
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw[name] = {**raw.get(name, {}), **values}
        else:
            raw[name] = values
    return config_from_dict(raw)


@contextlib.contextmanager
def draws_per_image(trainer: Trainer):
    """Give each image its own random numbers, whatever batch it is in.

    The trainer draws flow times, noise and token routing for a whole batch from one generator, so
    a batch of 4 and two micro-batches of 2 draw different numbers for the same images. Inside this
    block every ``torch.rand``/``torch.randn`` call on the trainer's generator instead draws each
    image's row from a generator seeded by (optimiser step, image file name, kind of draw): the
    same numbers for the same image at the same step, in any batch layout or process.
    """
    current = {}
    real_loss, real = trainer._loss, {"rand": torch.rand, "randn": torch.randn}

    def loss(batch, stage):
        current.update(step=trainer.progress.step, keys=list(batch["key"]))
        return real_loss(batch, stage)

    def per_image(name):
        def draw(*size, generator=None, **options):
            if generator is None or generator is not trainer.generator:
                return real[name](*size, generator=generator, **options)
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
            assert shape[0] == len(current["keys"]), (shape, current["keys"])
            rows = []
            for key in current["keys"]:  # a file's name: the same wherever the data folder is
                tag = repr((current["step"], Path(key).name, name, shape[1:])).encode()
                seed = int.from_bytes(hashlib.blake2b(tag, digest_size=8).digest(), "little") >> 1
                own = torch.Generator(generator.device).manual_seed(seed)
                rows.append(real[name](shape[1:], generator=own, **options))
            return torch.stack(rows)
        return draw

    trainer._loss = loss
    torch.rand, torch.randn = per_image("rand"), per_image("randn")
    try:
        yield
    finally:
        torch.rand, torch.randn = real["rand"], real["randn"]
        del trainer._loss


@dataclass
class Recording:
    """A training run with random draws made per image: the trainer, its weights before training,
    the images of each optimiser step and each step's gradient norm (before clipping)."""

    trainer: Trainer
    initial: dict[str, torch.Tensor]
    images: dict[int, list[str]]
    norms: list[float]

    @property
    def losses(self) -> list[float]:
        return [loss for _, loss in self.trainer.progress.losses]


def train_recording(config: TrainConfig, run_dir: Path) -> Recording:
    trainer = Trainer(config, run_dir)
    initial = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    images: dict[int, list[str]] = {}
    norms: list[float] = []
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda *args: (norms.append(float(clip(*args))), norms[-1])[1]
    with draws_per_image(trainer):
        trainer.run(callback=lambda progress, batch: images.setdefault(progress.step, []).extend(
            Path(key).name for key in batch["key"]))
    return Recording(trainer, initial, images, norms)


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """All tensors of a state dict as one vector, by name (a file may store them in another order)."""
    return torch.cat([state[name].flatten().double() for name in sorted(state)])


def assert_trained_alike(reference: Recording, losses: list[float], norms: list[float],
                         weights: dict[str, torch.Tensor]) -> None:
    """Another run over the same images with the same draws (batch split into micro-batches or
    between processes) matches ``reference`` but for float32 rounding, which enters where a sum
    over the batch is split in two: the loss's mean over the batch's values against a mean of two
    means, and each weight gradient's sum over the images' tokens against two sums added.

    A float32 sum of n terms is within about log2(n) ulps either way (pairwise summation; n is at
    most 4·3·8·8 = 768 here: 10 ulps), so each step's loss and gradient norm, from weights that
    differ as little as below, agree within 64 ulps. Adam divides each gradient by its running RMS:
    a gradient a few ulps off makes a step a few ulps off, one that is mostly cancellation can be
    off by more; over all weights the steps add up to the same movement within 2^10 ulps of its
    length (measured: below 2^6). That needs a modest learning rate (0.1): at 0.5 the tiny model's
    large steps grow any rounding difference chaotically. (Adam would hide a gradient off by a
    constant factor in the weights; the gradient norms show it.)
    """
    assert len(losses) == len(reference.losses) and len(norms) == len(reference.norms)
    assert losses == pytest.approx(reference.losses, rel=64 * EPS32, abs=0)
    assert norms == pytest.approx(reference.norms, rel=64 * EPS32, abs=0)
    start, moved = flat(reference.initial), flat(reference.trainer.unwrapped.state_dict())
    assert (moved - start).norm() > 0.1  # the weights did train
    assert (flat(weights) - moved).norm() <= 2 ** 10 * EPS32 * (moved - start).norm()
