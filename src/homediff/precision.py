"""Precision chosen by measurement: where bfloat16 pays on this device, and where it does not.

A CPU with AMX or AVX512-BF16 multiplies bfloat16 matrices several times faster than float32; a CPU
with AVX2 only emulates them, tens of times slower. No capability flag says which one a build of
torch will use, so every ``"auto"`` setting on a CPU times the two dtypes on the real device, and
keeps bfloat16 only where it is clearly faster. The product timed stands for the run's products
without their cost: the shape's bucket (``probe_shape``), at most ``PROBE_MACS`` multiply-adds, so
a decision stays cheap where bfloat16 is emulated. The measured ratio is remembered in the user
cache per machine (CPU model, torch's kernel capability and ISA limit, torch version) and bucket,
so later runs decide at once and a changed machine or torch measures again; ``homediff doctor``
shows and clears it. ``measured_with`` injects a measurement instead (tests; what another class of
CPU would choose). A CUDA device decides by capability: every GPU that supports bfloat16 runs it
on tensor cores.

The settings that take ``"auto"``: Muon's Newton-Schulz iteration (``optimizer.muon_dtype``), CPU
mixed precision in training (``train.mixed_precision``), the text encoder's dtype
(``text_encoder.options.dtype``) and the sampling dtype of ``homediff generate``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from homediff.caching import FileCache, cache_key, json_file_cache, user_cache_dir
from homediff.errors import ConfigError

logger = logging.getLogger(__name__)

#: bfloat16 must be at least this much faster than float32 to be chosen: below it, the timing noise
#: of a shared machine could flip the choice, and the precision is not worth a small gain.
MIN_SPEEDUP = 1.25
#: Autocast must clear a wider margin: it rounds every activation, and a whole training step is
#: timed far fewer times than a matrix product, so its ratio is the noisier of the two.
MIN_AUTOCAST_SPEEDUP = 1.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The largest product a probe times, in multiply-adds (m·k·n; 256³): large enough to run the
#: kernels the model's products run, small enough that timing it where bfloat16 is emulated stays
#: well under a second (benchmarks/RESULTS.md).
PROBE_MACS = 2**24
PROBE_REPEATS = 5  # timings of each dtype in a probe; the fastest counts

#: ``measure(shape, device)``: bfloat16's speedup over float32 for products of ``shape`` (m, k, n).
Measure = Callable[[tuple[int, int, int], torch.device], float]
#: ``measure(layers, dtype, device)``: the matmul attention path's speedup over SDPA over a step's
#: attention layers (``models.attention``: their description in words).
AttentionMeasure = Callable[[str, torch.dtype, torch.device], float]
_injected: list[tuple[Measure, AttentionMeasure]] = []  # the innermost ``measured_with`` last


@dataclass(frozen=True)
class Choice:
    """A precision decision: the dtype, the measured float32/bfloat16 time ratio, and for what."""

    dtype: torch.dtype
    speedup: float | None  # float32 time / bfloat16 time; None when decided without timing
    what: str

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)

    def __str__(self) -> str:
        how = (f"bfloat16 measured {self.speedup:.2f}× float32's speed" if self.speedup is not None
               else "by device capability")
        return f"{self.what}: {self.name} ({how})"


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype by the name ``DTYPES`` knows it by: "float32", "bfloat16"."""
    return str(dtype).removeprefix("torch.")


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


def probe_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The bucket of an (m, k, n) product, which is also the product timed for it: each side rounded
    up to a power of two, then the longest side halved until at most ``PROBE_MACS`` multiply-adds
    remain. Products of one bucket share one measurement."""
    sides = [1 << max(int(side) - 1, 0).bit_length() for side in shape]
    while math.prod(sides) > PROBE_MACS:
        longest = sides.index(max(sides))
        sides[longest] //= 2
    return tuple(sides)


def _sdpa_as_fast(layers, dtype, device) -> float:
    return 1.0


@contextlib.contextmanager
def measured_with(measure: Measure, attention: AttentionMeasure = _sdpa_as_fast) -> Iterator[None]:
    """Within the block, every ``"auto"`` decision on a CPU takes bfloat16's speedup from
    ``measure(shape, device)`` and the matmul attention path's from ``attention(layers, dtype,
    device)`` (by default no faster than SDPA) instead of timing them, and nothing is remembered."""
    _injected.append((measure, attention))
    try:
        yield
    finally:
        _injected.pop()


def speedup_at(shape: tuple[int, int, int], device: torch.device | str) -> float:
    """bfloat16's speedup over float32 (float32 time / bfloat16 time) for products of ``shape`` on
    a CPU: from ``measured_with`` inside one; else remembered for this machine and the shape's
    bucket; else measured on the bucket's product (``measure_speedup``) and remembered."""
    device = torch.device(device)
    if _injected:
        return _injected[-1][0](tuple(shape), device)
    bucket = probe_shape(shape)
    return _remembered("x".join(map(str, bucket)), device, lambda: measure_speedup(bucket, device))


def attention_speedup(layers: str, dtype: torch.dtype, device: torch.device | str,
                      measure: Callable[[], float]) -> float:
    """The matmul attention path's speedup over SDPA over a step's attention ``layers`` (in words)
    in ``dtype`` on a CPU, at this run's thread count: from ``measured_with`` inside one; else
    remembered for this machine; else ``measure()`` (``models.attention.matmul_speedup``),
    remembered."""
    device = torch.device(device)
    if _injected:
        return _injected[-1][1](layers, dtype, device)
    name = f"attention {layers} {dtype_name(dtype)} {torch.get_num_threads()} threads"
    return _remembered(name, device, measure)


def _remembered(name: str, device: torch.device, measure: Callable[[], float]) -> float:
    """The ratio remembered under ``name`` for this machine and torch, else ``measure()``, remembered."""
    store, key = _memory(), _memory_key(device)
    known = _speedups(store.get(key))
    if name in known:
        return known[name]
    ratio = measure()
    known = {**_speedups(store.get(key)), name: ratio}  # with what other processes added meanwhile
    store.put(key, {"machine": machine_key(device), "torch": torch.__version__, "speedups": known})
    logger.debug("%s measured %.3g×; remembered in %s", name, ratio, store.path(key))
    return ratio


def measure_speedup(shape: tuple[int, int, int], device: torch.device | str, threads: int = 1) -> float:
    """float32 time / bfloat16 time of a product of ``shape``, each the fastest of
    ``PROBE_REPEATS`` timings (one preempted timing must not decide what is remembered), on
    ``threads`` threads. One by default: a probe's product ends within a scheduler's time slice, so
    with several threads on a busy machine the waits for a thread that is not running, not the
    kernels, would set its time (they can make emulated bfloat16 look as fast as float32); the
    kernels' ratio is the same on one thread."""
    device = torch.device(device)
    run, kept = matmul(device, *shape), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return (seconds(lambda: run(torch.float32), device, PROBE_REPEATS)
                / seconds(lambda: run(torch.bfloat16), device, PROBE_REPEATS))
    finally:
        torch.set_num_threads(kept)


def remembered() -> list[dict]:
    """Every remembered measurement file: ``{"file", "machine", "torch", "speedups", "current"}``
    (``current``: this CPU's and this torch's; ``speedups``: bfloat16's by product bucket ``MxKxN``,
    and the matmul attention path's as ``attention LAYERS dtype T threads``)."""
    store, entries = _memory(), []
    current = store.path(_memory_key(torch.device("cpu")))
    for path in sorted(store.folder.glob(f"*{store.suffix}")):
        content = store.get(path.stem)
        if isinstance(content, dict):
            entries.append({"file": str(path), "machine": content.get("machine"),
                            "torch": content.get("torch"), "speedups": _speedups(content),
                            "current": path == current})
    return entries


def forget() -> int:
    """Remove every remembered measurement; the number of files removed."""
    store = _memory()
    files = list(store.folder.glob(f"*{store.suffix}"))
    for path in files:
        path.unlink(missing_ok=True)
    return len(files)


def memory_folder() -> Path:
    """Where measurements are remembered: ``precision`` in the user cache."""
    return user_cache_dir("precision")


def _memory() -> FileCache:
    return json_file_cache(memory_folder())


def _memory_key(device: torch.device) -> str:
    return cache_key(machine_key(device), torch.__version__)


def _speedups(content) -> dict[str, float]:
    """The ratios of a remembered file's content (anything unexpected reads as none)."""
    speedups = content.get("speedups") if isinstance(content, dict) else None
    if not isinstance(speedups, dict):
        return {}
    return {name: float(value) for name, value in speedups.items()
            if isinstance(value, (int, float)) and value > 0}


def choose_matmul_dtype(setting: str, device: torch.device | str, shape: tuple[int, int, int],
                        what: str, *, agree: Callable[[float], float] = float) -> Choice:
    """Resolve a dtype setting for work dominated by matrix products of ``shape`` (m, k, n): a name
    in ``DTYPES`` as given; ``"auto"`` on a CPU by bfloat16's speedup there (``speedup_at``;
    ``agree`` averages it over processes so that all choose alike), on CUDA bfloat16 where
    supported, elsewhere float32."""
    if setting != "auto":
        if setting not in DTYPES:
            raise ValueError(f"unknown dtype {setting!r}; use 'auto' or one of {', '.join(DTYPES)}")
        return Choice(DTYPES[setting], None, what)
    device = torch.device(device)
    if device.type == "cuda":
        choice = Choice(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32, None, what)
    elif device.type == "cpu":
        choice = decide(agree(speedup_at(shape, device)), what)
    else:
        choice = Choice(torch.float32, None, what)
    logger.info("%s", choice)
    return choice


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

    def grads() -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    loss32, grad32 = step(torch.float32), grads()
    loss16, grad16 = step(torch.bfloat16), grads()
    cosine = _cosine(grad32, grad16)
    del grad32, grad16  # a model's worth of gradients each: not kept while the steps are timed
    speedup = bf16_speedup(step, device, warmed=True)
    model.zero_grad(set_to_none=True)
    return AutocastCheck(speedup=speedup,
                         loss_error=((loss16 - loss32).abs() / loss32.abs().clamp_min(1e-12)).item(),
                         grad_cosine=cosine)


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The cosine between two lists of tensors taken as one vector each, summed in float64 tensor
    by tensor (no copy of the whole vectors)."""
    dot = norm_a = norm_b = 0.0
    for x, y in zip(a, b):
        x, y = x.double(), y.double()
        dot += torch.dot(x.flatten(), y.flatten()).item()
        norm_a += x.square().sum().item()
        norm_b += y.square().sum().item()
    return dot / max(math.sqrt(norm_a * norm_b), 1e-300)


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
