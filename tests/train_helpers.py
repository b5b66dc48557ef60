"""A tiny training set-up for the trainer's tests: coloured-square images, a tiny BERT, a tiny XUT."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from homediff.config import TrainConfig, config_from_dict

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


def tiny_config(data: Path, text_encoder: Path, **sections) -> TrainConfig:
    """A config that trains in well under a second per step on a CPU."""
    raw = {
        "model": {"preset": "xut-tiny", "overrides": {"dim": 32, "head_dim": 16, "mlp_dim": 64,
                                                      "depth": 1, "dec_blocks": 1}},
        "text_encoder": {"name": str(text_encoder), "options": {"padding": "max_length",
                                                                 "max_length": 6}},
        "dataset": {"path": str(data), "workers": 0},
        "optimizer": {"warmup_steps": 2},
        "ema": {"decay": 0.9},
        "train": {"seed": 0, "checkpoint_every": 1000, "log_every": 2, "sample_prompts": []},
        "stages": [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 10, "tread_rate": 0.5}],
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw[name] = {**raw.get(name, {}), **values}
        else:
            raw[name] = values
    return config_from_dict(raw)
