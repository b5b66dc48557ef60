"""A tiny training set-up for the trainer's tests: coloured-square images, a tiny BERT, a tiny XUT."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from homediff.training import sharding
from homediff.training.checkpoint import write_checkpoint
from homediff.training.components import Builders
from homediff.training.config import TrainConfig, config_from_dict
from homediff.training.loop import Trainer
from homediff.training.monitor import Monitor
from homediff.training.objective import training_loss

EPS32 = torch.finfo(torch.float32).eps
# what `accelerate launch` sets from an FSDP `accelerate config` (wrap by transformer block)
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}
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


class PerImageDraws:
    """The training loss with each image's own random numbers, whatever batch it is in.

    The trainer draws flow times, noise and token routing for a whole batch from one generator, so
    a batch of 4 and two micro-batches of 2 draw different numbers for the same images. This loss
    (handed to the trainer as ``Builders.loss``) instead draws, inside each call, every
    ``torch.rand``/``torch.randn`` on the step's generator row by row from a generator seeded by
    (optimiser step, image file name, kind of draw): the same numbers for the same image at the same
    step, in any batch layout or process. ``callback`` tells it the step.
    """

    def __init__(self):
        self.step = 0

    def callback(self, progress, batch) -> None:
        self.step = progress.step

    def __call__(self, batch, parts, settings, generator) -> torch.Tensor:
        keys = [Path(key).name for key in batch["key"]]  # the same wherever the data folder is
        real = {"rand": torch.rand, "randn": torch.randn}

        def per_image(name):
            def draw(*size, generator=None, **options):
                if generator is not step_generator:
                    return real[name](*size, generator=generator, **options)
                shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
                assert shape[0] == len(keys), (shape, keys)
                rows = []
                for key in keys:
                    tag = repr((self.step, key, name, shape[1:])).encode()
                    seed = int.from_bytes(hashlib.blake2b(tag, digest_size=8).digest(), "little") >> 1
                    own = torch.Generator(generator.device).manual_seed(seed)
                    rows.append(real[name](shape[1:], generator=own, **options))
                return torch.stack(rows)
            return draw

        step_generator = generator
        torch.rand, torch.randn = per_image("rand"), per_image("randn")
        try:
            return training_loss(batch, parts, settings, generator)
        finally:
            torch.rand, torch.randn = real["rand"], real["randn"]


class RecordingMonitor(Monitor):
    """The usual monitor, also keeping each step's gradient norm (before clipping) and learning
    rate (the first parameter group's, without its per-tensor scale)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norms: list[float] = []
        self.lrs: list[float] = []

    def step(self, progress, loss, groups, grad_norm, images) -> None:
        self.norms.append(float(grad_norm))
        self.lrs.append(groups[0]["lr"] / groups[0]["lr_scale"])
        super().step(progress, loss, groups, grad_norm, images)


def recording(**builders) -> Builders:
    """Builders whose monitor is a ``RecordingMonitor`` (and any others given)."""
    monitor = lambda config, run_dir, enabled: RecordingMonitor(  # noqa: E731
        run_dir, enabled=enabled, wandb=False, config=config)
    return Builders(monitor=monitor, **builders)


@dataclass
class Recording:
    """A training run with random draws made per image: the trainer, its weights and EMA (whole)
    before training (after a resume, the checkpoint's), the step it began at, the images of each
    optimiser step and each step's gradient norm (before clipping)."""

    trainer: Trainer
    initial: dict[str, torch.Tensor]
    initial_ema: dict | None
    start: int
    images: dict[int, list[str]]

    @property
    def losses(self) -> list[float]:
        """The losses of the steps this run trained (on a resume, not the checkpoint's)."""
        return [loss for step, loss in self.trainer.progress.losses if step > self.start]

    @property
    def norms(self) -> list[float]:
        return self.trainer.monitor.norms


def train_recording(config: TrainConfig, run_dir: Path, **options) -> Recording:
    """Train with ``PerImageDraws``; ``options`` go to the ``Trainer`` (``resume``, ``max_steps``).
    Under FSDP every process must call this; only the first holds the whole ``initial``."""
    draws = PerImageDraws()
    trainer = Trainer(config, run_dir, builders=recording(loss=draws), **options)
    initial = {k: v.clone() for k, v in sharding.model_state(trainer.unwrapped, trainer.fsdp).items()}
    ema = trainer.ema.state_dict() if trainer.ema else None
    if ema:  # the live averages otherwise
        ema["shadow"] = {k: v.clone() for k, v in ema["shadow"].items()}
    start, images = trainer.progress.step, {}

    def callback(progress, batch):
        draws.callback(progress, batch)
        images.setdefault(progress.step, []).extend(Path(key).name for key in batch["key"])
    trainer.run(callback=callback)
    return Recording(trainer, initial, ema, start, images)


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


def torchrun(launches: list[list[str]], logs: Path, timeout: float, env: dict | None = None) -> str:
    """Run ``python -m torch.distributed.run`` once per argument list, side by side (one process
    each, one thread per worker), and return their output, the first's first. A hung collective
    would leave the workers behind their launchers, so on a timeout every launcher's process group
    is killed and the test fails; so it does when one fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    logs.mkdir(parents=True, exist_ok=True)
    files = [logs / f"launcher{i}.log" for i in range(len(launches))]
    running = []
    for arguments, file in zip(launches, files):
        with open(file, "w") as out:
            running.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *arguments],
                                            env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        codes = [launcher.wait(timeout=max(0.0, deadline - time.monotonic())) for launcher in running]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for launcher in running:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    output = "\n".join(file.read_text() for file in files)
    if codes is None:
        pytest.fail(f"the workers did not finish in {timeout:.0f} s:\n{output[-3000:]}")
    assert codes == [0] * len(codes), output[-3000:]
    return output


def as_earlier_version(folder: Path, root: Path, progress: dict, precision: dict | None = None,
                       **files) -> Path:
    """A copy of checkpoint ``folder`` under ``root`` whose progress.json holds ``progress`` and
    ``precision`` as an earlier version wrote them; ``files`` replace others by name (a "." in a
    file name is written "_": ``config_toml="..."``), as text."""
    names = [name for name in os.listdir(folder) if name != "manifest.json"]
    writers = {name: (lambda path, source=folder / name: shutil.copyfile(source, path)) for name in names}
    writers["progress.json"] = lambda path: path.write_text(
        json.dumps({"progress": progress, "precision": precision}), encoding="utf-8")
    for key, text in files.items():
        writers[key.replace("_", ".")] = lambda path, text=text: path.write_text(text, encoding="utf-8")
    return write_checkpoint(root, progress["step"], writers)
