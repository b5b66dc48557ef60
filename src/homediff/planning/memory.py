"""Peak memory of one training process in a stage, by part: what ``homediff plan`` prints and
``homediff train --rehearse`` checks.

    estimate = estimate_memory(config, 0, micro_batch=1, device="cpu")
    estimate.parts  # bytes: backbone weights, gradients, optimiser state, EMA, activations, ...
    estimate.total

The parts, per process:

* backbone weights, gradients, optimiser state and EMA, all float32 (the optimiser's state as
  ``training.optim`` keeps it: AdamW two moments and a step per tensor; Muon a momentum per hidden
  matrix and AdamW's for the rest). Under FSDP2 (``training.sharding``) each is divided over the
  processes, and the weights of the unsharded root (everything outside the blocks) plus two blocks
  (the one running and the one prefetched) are gathered whole, and one block's gradients before
  they are reduce-scattered. Under DDP with several processes the gradient buckets are a second
  copy of the gradients;
* activations (``planning.activations``), in the autocast dtype where autocast is on;
* the frozen encoders: the text encoder's weights in its dtype and its forward pass's transient,
  the VAE's weights and its encoder's transient at the stage's resolution, in chunks of
  ``KLAutoencoder.batch_size`` images as it encodes; and the micro-batches of a step;
* on a CPU, the process's own resident memory besides its tensors (``runtime``: the interpreter,
  its imports, the kernels and threads of a training step), measured by starting one; and, for a
  text encoder read from files, the load: the files' pages and the weights read, before anything
  else is built (a peak of its own for small models); where autocast is "auto", the probe that
  decides it, before the optimiser and the EMA exist.

The encoders run before the backbone's forward pass and free their transients, so the peak is what
stays plus the largest of three phases: text encoding, image encoding (both with the gradients of
earlier micro-batches when a step accumulates, else none), and the backbone's forward and backward:
the gradients plus ``activations``, the saved tensors and gradients in flight at the step's peak
beyond the gradients themselves (``activations.peak_bytes``). ``parts`` gives each phase's own
figure; ``total`` is the peak.

On a CPU the figure is resident memory, and glibc's allocator shapes it: tensors under its mmap
threshold (at most 32 MiB) come from the heap, which keeps what the backward pass frees resident
for the next micro-batch's tensors, while larger ones are mapped afresh and returned when freed.
The VAE's feature maps at training resolutions are of the larger kind (128 channels of 256² float32
are 32 MiB), so on a CPU its transient comes on top of the activations the heap still holds rather
than in their place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
from dataclasses import dataclass

from homediff.errors import ConfigError
from homediff.planning import activations as acts
from homediff.planning.plan import (SHARDINGS, SHIPPED_CONFIGS, EncoderShapes, backbone, checkpoint_bytes,
                                    encoder_shapes)
from homediff.training.config import TrainConfig

F32 = 4
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Live tensors of the VAE encoder's widest ResNet block at once, in its first stage's channels at
#: the full resolution: the block's input (kept for the residual), the normalised, activated and
#: convolved stream, and the sum before its rescaling.
VAE_LIVE_TENSORS = 4
#: Live tensors of a text-encoder layer at once, in units of its width (residual, normalised, q, k,
#: v and attention output) and of its MLP width (gate, up, activated gate · up).
TEXT_LIVE_WIDTHS, TEXT_LIVE_MLP = 6, 3
PHASES = ("text encoder transient", "VAE transient", "activations")
BEFORE_TRAINING = ("text encoder loading", "autocast probe")


@dataclass
class MemoryEstimate:
    """Bytes by part; ``total`` is the peak (see the module's docstring)."""

    parts: dict[str, int]
    total: int
    precisions: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"parts": dict(self.parts), "total": self.total, "precisions": dict(self.precisions)}


def estimate_memory(config: TrainConfig, stage_index: int, *, micro_batch: int | None = None,
                    checkpointing: bool | None = None, processes: int = 1, sharding: str = "ddp",
                    device: str = "cuda", precisions: dict | None = None) -> MemoryEstimate:
    """The peak memory of one process training stage ``stage_index`` of ``config``.

    ``micro_batch``: samples per forward pass (default the stage's batch_size); ``checkpointing``:
    gradient checkpointing (default the config's); ``sharding``: "ddp" or "fsdp" over
    ``processes``; ``device``: "cuda" (allocated tensors) or "cpu" (the process's resident memory).
    ``precisions``: the trainer's choices (``training.precisions.choose_precisions``: "autocast",
    "text", and "attention", the dtypes of its matmul attention path); by default decided as the
    trainer would on that device, on a CPU by a matrix-product and an attention probe where the
    config says "auto"."""
    if sharding not in SHARDINGS:
        raise ConfigError(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if processes < 1 or (micro_batch is not None and micro_batch < 1):
        raise ConfigError(f"processes and micro_batch must be positive, got {processes} and {micro_batch}")
    if not 0 <= stage_index < len(config.stages):
        raise ConfigError(f"stage {stage_index} does not exist: the config has {len(config.stages)}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    stage = config.stages[stage_index]
    batch = micro_batch or stage.batch_size
    checkpointing = config.train.gradient_checkpointing if checkpointing is None else checkpointing
    shapes = encoder_shapes(config)
    model = backbone(config, shapes)
    chosen = dict(precisions or {})
    if not {"autocast", "text"} <= set(chosen):
        chosen = {**decide_precisions(config, shapes, model.config, device), **chosen}
    compute = BYTES[chosen["autocast"]] if chosen["autocast"] else F32
    side = stage.resolution // shapes.factor
    if "attention" not in chosen:
        chosen["attention"] = _matmul_attention(model, batch, side, stage, chosen["autocast"], device)
    step = acts.StepShape(batch, shapes.channels, side, side, stage.text_length, stage.tread_rate, compute,
                          (chosen["autocast"] or "float32") in chosen["attention"])
    shard = processes if sharding == "fsdp" and processes > 1 else 1

    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = checkpoint_bytes(config, model)
    parts = {"backbone weights": _weights(model, shard),
             "gradients": F32 * trained // shard + (_largest_block(model) if shard > 1 else 0),
             "optimiser state": stored["optimizer"] // shard,
             "EMA": stored.get("ema", 0) // shard}
    if sharding == "ddp" and processes > 1:
        parts["DDP gradient buckets"] = F32 * trained
    held = stage.grad_accum > 1  # a later micro-batch starts with every gradient
    parts["activations"] = acts.peak_bytes(model, step, checkpointing, held) - F32 * trained
    parts.update(_encoders(shapes, chosen["text"], batch, stage.text_length, stage.resolution))
    parts["data batches"] = _batches(batch, stage.resolution, stage.grad_accum, device)
    if device == "cpu":
        parts.update(_cpu_parts(config, shapes, model, step, checkpointing, chosen["autocast"]))
    return MemoryEstimate(parts, _peak(parts, held, resident=device == "cpu"), chosen)


def _peak(parts: dict[str, int], held: bool, resident: bool) -> int:
    """The largest of the phases (see the module's docstring); ``resident`` (a CPU): the VAE's
    transient on top of the activations, and the two phases before training: reading the text
    encoder, and the autocast probe once the parts are built."""
    steady = sum(v for k, v in parts.items() if k not in (*PHASES, *BEFORE_TRAINING, "gradients"))
    before_backward = parts["gradients"] if held else 0  # the encoders run before it
    backbone = parts["gradients"] + parts["activations"] + (parts["VAE transient"] if resident else 0)
    phases = (backbone, before_backward + parts["text encoder transient"],
              before_backward + parts["VAE transient"])
    built = sum(parts[k] for k in ("backbone weights", "text encoder weights", "VAE weights"))
    early = parts.get("runtime", 0) + max(parts.get("text encoder loading", 0),
                                          built + parts.get("autocast probe", 0))
    return max(steady + max(phases), early)


def _cpu_parts(config: TrainConfig, shapes: EncoderShapes, model, step: acts.StepShape,
               checkpointing: bool, autocast: str | None) -> dict[str, int]:
    """The runtime; a text encoder read from files (not a shipped config's stand-in); and where
    autocast is "auto", the probe that decides it (``training.precisions``): a copy of the
    backbone trained one step in float32, then in bfloat16 with the first step's gradients kept."""
    from homediff.training.precisions import launched_precision

    parts = {"runtime": runtime_bytes(shapes.text["model_type"], shapes.vae is not None, autocast)}
    if config.text_encoder.name.lower() not in SHIPPED_CONFIGS:
        parts["text encoder loading"] = _loading(shapes.text)
    if config.train.mixed_precision == "auto" and not launched_precision():
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        gradients = F32 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        full, half = (acts.peak_bytes(model, dataclasses.replace(step, compute=compute), checkpointing,
                                      gradients_held=False) for compute in (F32, BYTES["bfloat16"]))
        parts["autocast probe"] = weights + max(full, gradients + half)
    return parts


def decide_precisions(config: TrainConfig, shapes: EncoderShapes, model_config, device: str) -> dict:
    """{"autocast": dtype name or None, "text": dtype name} as the trainer decides them on
    ``device`` (``training.precisions``); a CPU's "auto" autocast by timing a matrix product of
    the backbone's MLP in both dtypes, against the trainer's threshold for a whole step."""
    from homediff import precision
    from homediff.training.precisions import accelerator_precision, launched_precision

    names = {"no": None, "bf16": "bfloat16", "fp16": "float16"}
    hidden = shapes.text["hidden_size"]
    width = shapes.text.get("intermediate_size", 4 * hidden)
    if device == "cuda":
        wanted = config.train.mixed_precision
        autocast = names[launched_precision() or ("bf16" if wanted == "auto" else wanted)]
        text = "bfloat16" if config.text_encoder.options.dtype == "auto" else config.text_encoder.options.dtype
        return {"autocast": autocast, "text": text}
    autocast = names[accelerator_precision(config)]
    if config.train.mixed_precision == "auto" and not launched_precision():
        autocast = "bfloat16" if _cpu_autocast_pays(model_config.dim, model_config.mlp_dim) else None
    rows = min(4096, 32 * config.text_encoder.options.max_length)  # as TextEncoder decides
    text = precision.choose_matmul_dtype(config.text_encoder.options.dtype, "cpu", (rows, hidden, width),
                                         "text encoder").name
    return {"autocast": autocast, "text": text}


def _matmul_attention(model, batch: int, side: int, stage, autocast: str | None,
                      device: str) -> list[str]:
    """The dtypes in which the trainer's attention would take the matmul path, as it decides
    (``training.precisions``): only on a CPU, by a probe over the step's attention layers
    (remembered)."""
    import torch

    from homediff import precision
    from homediff.models import attention

    if device != "cpu":
        return []
    layers = model.attention_layers(batch, side, side, stage.text_length, stage.tread_rate)
    dtypes = [torch.float32] + ([precision.DTYPES[autocast]] if autocast else [])
    chosen, _ = attention.choose_matmul_dtypes(layers, dtypes, "cpu")
    return sorted(map(precision.dtype_name, chosen))


@functools.lru_cache(maxsize=8)
def _cpu_autocast_pays(dim: int, mlp_dim: int) -> bool:
    from homediff import precision

    speedup = precision.bf16_speedup(precision.matmul("cpu", 1024, dim, mlp_dim), "cpu")
    return speedup >= precision.MIN_AUTOCAST_SPEEDUP


def _loading(text_config: dict) -> int:
    """Resident memory while a text encoder is read from its files on a CPU: the files' pages
    (mapped) and the weights read from them, both in the files' dtype."""
    stored = BYTES.get(text_config.get("torch_dtype") or text_config.get("dtype") or "float32", F32)
    return 2 * stored * encoder_parameters("text", json.dumps(text_config))


def _weights(model, shard: int) -> int:
    """The backbone's float32 tensors; sharded, this process's share plus what FSDP2 holds whole:
    the root's own parameters (outside the blocks) and two blocks."""
    whole = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if shard == 1:
        return whole
    blocks = sum(F32 * p for p, _ in acts.block_weights(model).values())
    return whole // shard + (whole - blocks) + 2 * _largest_block(model)


def _largest_block(model) -> int:
    return F32 * max(p for p, _ in acts.block_weights(model).values())


def _encoders(shapes: EncoderShapes, text_dtype: str, batch: int, text_length: int,
              resolution: int) -> dict[str, int]:
    """The text encoder's and VAE's weights and the transients of their forward passes."""
    text_config, dtype = shapes.text, BYTES[text_dtype]
    hidden = text_config["hidden_size"]
    mlp = text_config.get("intermediate_size", 4 * hidden)
    text = {"text encoder weights": dtype * encoder_parameters("text", json.dumps(text_config)),
            "text encoder transient": batch * text_length * (
                dtype * (TEXT_LIVE_WIDTHS * hidden + TEXT_LIVE_MLP * mlp) + F32 * hidden)}
    if shapes.vae is None:  # pixel space: the images, unshuffled into a float32 copy
        return {**text, "VAE weights": 0, "VAE transient": batch * 3 * resolution ** 2 * F32}
    from homediff.encoders.autoencoders import KLAutoencoder

    chunk = min(batch, KLAutoencoder.__init__.__kwdefaults__["batch_size"])
    widest = shapes.vae["block_out_channels"][0]
    return {**text, "VAE weights": F32 * encoder_parameters("vae", json.dumps(shapes.vae)),
            "VAE transient": chunk * VAE_LIVE_TENSORS * widest * resolution ** 2 * F32}


@functools.lru_cache(maxsize=8)
def encoder_parameters(kind: str, config_json: str) -> int:
    """Parameters of an encoder built from its config on the meta device ("text": a transformers
    model, "vae": a diffusers AutoencoderKL)."""
    import torch

    from homediff.planning import standins

    with torch.device("meta"):
        model = (standins.text_model(json.loads(config_json)) if kind == "text"
                 else standins.vae_model(json.loads(config_json)))
    return sum(p.numel() for p in model.parameters())


def _batches(batch: int, resolution: int, accumulate: int, device: str) -> int:
    """The step's micro-batches of images and position maps (float32): all of them on a CPU, where
    the loop gathers a step's micro-batches before the first runs; one on a GPU."""
    one = batch * resolution ** 2 * (3 + 2) * F32
    return one * (accumulate if device == "cpu" else 1)


#: What a training process runs besides its tensors: the imports (each model class imports its
#: own modules; {text} is the text model's type, {vae} whether there is a VAE) and the kernels and
#: threads of a few training steps of a tiny backbone ({autocast}: the autocast dtype or None).
_RUNTIME_PROBE = """
import accelerate, torch, transformers
from torch.utils.tensorboard import SummaryWriter
import homediff.planning.standins, homediff.training.loop
from homediff.models import XUT, XUTConfig
from homediff.planning.memory import peak_resident_bytes
from homediff.training.objective import LossSettings, flow_matching_loss
with torch.device("meta"):
    transformers.AutoModel.from_config(transformers.AutoConfig.for_model({text!r}))
    if {vae}:
        import diffusers
        diffusers.AutoencoderKL()
model = XUT(XUTConfig(dim=32, ctx_dim=32, head_dim=16, mlp_dim=64, depth=1))
optimizer = torch.optim.AdamW(model.parameters())
settings = LossSettings(tread_rate=0.5, autocast={autocast})
for _ in range(2):
    flow_matching_loss(model, torch.randn(1, 4, 8, 8), torch.randn(1, 4, 32), settings,
                       torch.Generator().manual_seed(0)).backward()
    optimizer.step()
print(peak_resident_bytes())
"""


@functools.lru_cache(maxsize=8)
def runtime_bytes(text_model_type: str, vae: bool, autocast: str | None) -> int:
    """Resident memory of a fresh interpreter that has done what training does besides holding
    its tensors (``_RUNTIME_PROBE``) for this text model (``model_type`` of its config), VAE and
    autocast dtype: the CPU estimate's baseline, measured once per process by starting one."""
    code = _RUNTIME_PROBE.format(text=text_model_type, vae=vae,
                                 autocast=f"torch.{autocast}" if autocast else None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def peak_resident_bytes() -> int:
    """This process's peak resident memory: Linux's ``VmHWM``, which starts afresh when a program
    starts (``ru_maxrss`` does not: it keeps the peak of the process that started it), else
    ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
