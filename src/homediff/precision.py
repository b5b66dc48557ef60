"""Precision chosen by measurement: where bfloat16 pays on this device, and where it does not.

A CPU with AMX or AVX512-BF16 multiplies bfloat16 matrices several times faster than float32; a CPU
with AVX2 only emulates them, tens of times slower. No capability flag says which one a build of
torch will use, so every ``"auto"`` setting times its candidates once, on the real device at the
run's sizes (a few milliseconds), and keeps bfloat16 only where it is clearly faster. A CUDA device
decides by capability: every GPU that supports bfloat16 runs it on tensor cores.

The settings that take ``"auto"``: Muon's Newton-Schulz iteration (``optimizer.muon_dtype``), CPU
mixed precision in training (``train.mixed_precision``), the text encoder's dtype
(``text_encoder.options.dtype``) and the sampling dtype of ``homediff generate``.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from homediff.errors import ConfigError

logger = logging.getLogger(__name__)

#: bfloat16 must be at least this much faster than float32 to be chosen: below it, the timing noise
#: of a shared machine could flip the choice, and the precision is not worth a small gain.
MIN_SPEEDUP = 1.25
#: Autocast must clear a wider margin: it rounds every activation, and a whole training step is
#: timed far fewer times than a matrix product, so its ratio is the noisier of the two.
MIN_AUTOCAST_SPEEDUP = 1.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Choice:
    """A precision decision: the dtype, the measured float32/bfloat16 time ratio, and for what."""

    dtype: torch.dtype
    speedup: float | None  # float32 time / bfloat16 time; None when decided without timing
    what: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def __str__(self) -> str:
        how = (f"bfloat16 measured {self.speedup:.2f}× float32's speed" if self.speedup is not None
               else "by device capability")
        return f"{self.what}: {self.name} ({how})"


def seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3,
            warm: bool = True) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, after one warm-up call unless ``warm`` is
    False (the caller has run it already); cheap calls are looped so that each timing spans about
    a millisecond or more."""
    device = torch.device(device)

    def timed(loops: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / loops

    first = timed(1) if warm else None
    loops = max(1, min(100, int(1e-3 / max(first or 1.0, 1e-7))))
    return min(timed(loops) for _ in range(repeats))


def bf16_speedup(run: Callable[[torch.dtype], object], device: torch.device,
                 warmed: bool = False) -> float:
    """float32 time / bfloat16 time of ``run(dtype)``; > 1 means bfloat16 is faster. ``warmed``:
    the caller has run both once already.

    One timing of each first: where bfloat16 is emulated (tens of times slower) that settles it
    without spending seconds on repeats; a ratio near ``MIN_SPEEDUP`` is timed three times more.
    """
    ratio = (seconds(lambda: run(torch.float32), device, 1, warm=not warmed)
             / seconds(lambda: run(torch.bfloat16), device, 1, warm=not warmed))
    if ratio < MIN_SPEEDUP / 2 or ratio > MIN_SPEEDUP * 2:
        return ratio
    return seconds(lambda: run(torch.float32), device) / seconds(lambda: run(torch.bfloat16), device)


def machine_key(device: torch.device | str) -> str:
    """What precision choices depend on: the device type and the CPU's kernels or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return ":".join([device.type, cpu_name(), torch.backends.cpu.get_cpu_capability(),
                     os.environ.get("ONEDNN_MAX_CPU_ISA", "")])


def cpu_name() -> str:
    """The CPU's model name where the system tells it (Linux), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul(device: torch.device | str, m: int, k: int, n: int) -> Callable[[torch.dtype], torch.Tensor]:
    """``run(dtype)``: an (m, k) @ (k, n) matrix product in that dtype on ``device``."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    pairs = {dtype: (a.to(dtype), b.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    return lambda dtype: torch.mm(*pairs[dtype])


def matmul_rate(device: torch.device | str, dtype: torch.dtype, n: int = 512) -> float:
    """Measured FLOP/s of an n × n matrix product in ``dtype`` (``homediff doctor``)."""
    run = matmul(device, n, n, n)
    return 2 * n ** 3 / seconds(lambda: run(dtype), torch.device(device))


def choose_dtype(setting: str, device: torch.device | str,
                 run: Callable[[torch.dtype], object] | None, what: str, *,
                 cuda_fallback: torch.dtype = torch.float32,
                 agree: Callable[[float], float] = float) -> Choice:
    """Resolve a dtype setting: a name in ``DTYPES`` as given; ``"auto"`` on a CPU by timing
    ``run(dtype)`` in float32 and bfloat16 (``agree`` averages the measurement over processes so
    that all choose alike); on CUDA bfloat16 where supported, else ``cuda_fallback``."""
    if setting != "auto":
        if setting not in DTYPES:
            raise ValueError(f"unknown dtype {setting!r}; use 'auto' or one of {', '.join(DTYPES)}")
        return Choice(DTYPES[setting], None, what)
    device = torch.device(device)
    if device.type == "cuda":
        choice = Choice(torch.bfloat16 if torch.cuda.is_bf16_supported() else cuda_fallback, None, what)
    elif device.type == "cpu":
        choice = decide(agree(bf16_speedup(run, device)), what)
    else:
        choice = Choice(torch.float32, None, what)
    logger.info("%s", choice)
    return choice


def choose_matmul_dtype(setting: str, device: torch.device | str, shape: tuple[int, int, int],
                        what: str) -> Choice:
    """``choose_dtype`` for work dominated by matrix products of ``shape`` (m, k, n)."""
    timed = setting == "auto" and torch.device(device).type == "cpu"
    return choose_dtype(setting, device, matmul(device, *shape) if timed else None, what)


def decide(speedup: float, what: str) -> Choice:
    """bfloat16 when ``speedup`` clears ``MIN_SPEEDUP``, else float32."""
    return Choice(torch.bfloat16 if speedup >= MIN_SPEEDUP else torch.float32, speedup, what)


@dataclass(frozen=True)
class AutocastCheck:
    """A training step with and without bfloat16 autocast, from the same weights and inputs."""

    speedup: float  # float32 step time / bfloat16 step time
    loss_error: float  # |loss_bf16 - loss_fp32| / |loss_fp32|
    grad_cosine: float  # cosine between the two gradients

    #: bfloat16 keeps about 3 significant digits: a loss within 2 % and gradients pointing the same
    #: way (cosine ≥ 0.98) mean the step trains the same model; more means the model is sensitive.
    MAX_LOSS_ERROR = 0.02
    MIN_GRAD_COSINE = 0.98

    @property
    def close(self) -> bool:
        return self.loss_error <= self.MAX_LOSS_ERROR and self.grad_cosine >= self.MIN_GRAD_COSINE


def check_autocast(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
                   device: torch.device) -> AutocastCheck:
    """Time forward + backward of ``loss_fn`` (a closure over ``model``) with and without bfloat16
    autocast on ``device``, and compare the two losses and gradients. Gradients are left cleared."""
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(dtype: torch.dtype):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        return loss.detach().float()

    def grads() -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                          for p in params])

    loss32, grad32 = step(torch.float32), grads()
    loss16, grad16 = step(torch.bfloat16), grads()
    speedup = bf16_speedup(step, device, warmed=True)
    model.zero_grad(set_to_none=True)
    return AutocastCheck(speedup=speedup,
                         loss_error=((loss16 - loss32).abs() / loss32.abs().clamp_min(1e-12)).item(),
                         grad_cosine=torch.nn.functional.cosine_similarity(grad32, grad16, dim=0).item())


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the system's available
    memory for a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def resolve_device(name: str | None) -> torch.device:
    """The device a user named (``None``: CUDA when there is one, else the CPU), checked to exist
    here; a wrong or missing device is a ``ConfigError`` that says what there is."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s); use cpu")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r}: homediff runs on cpu, cuda or mps")
    return device
