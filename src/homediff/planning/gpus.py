"""The accelerators a plan can assume: peak dense bf16 rate, memory, and where each number comes from.

A peak is the vendor's dense (no structured sparsity) BF16 tensor rate with FP32 accumulation, the
arithmetic of bf16 autocast's matrix products. Memory is the capacity as printed (binary: a "24 GB"
card holds 24 GiB). ``cpu`` is this machine, measured when asked for: a short matrix-product probe
(``homediff.precision.matmul_rate``) in float32 and bfloat16, the faster one kept.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from homediff.errors import ConfigError


@dataclass(frozen=True)
class GPU:
    """An accelerator class: ``kind`` is "consumer", "data-centre" or "cpu"."""

    name: str
    peak_tflops: float
    memory_gib: float
    kind: str
    source: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dense(sparse: float) -> float:
    return sparse / 2


GPUS: dict[str, GPU] = {gpu.name: gpu for gpu in (
    GPU("rtx3090", 71.0, 24, "consumer",
        "NVIDIA Ampere GA102 whitepaper, RTX 3090: peak BF16 tensor TFLOPS with FP32 accumulate, "
        "71 dense (142 sparse); 24 GB GDDR6X"),
    GPU("rtx4090", 165.2, 24, "consumer",
        "NVIDIA Ada Lovelace whitepaper, RTX 4090: peak BF16 tensor TFLOPS with FP32 accumulate, "
        "165.2 dense (330.4 sparse); 24 GB GDDR6X"),
    GPU("rtx5090", 209.5, 32, "consumer",
        "NVIDIA RTX Blackwell whitepaper, RTX 5090: peak FP16/BF16 tensor TFLOPS with FP32 "
        "accumulate, 209.5 dense (the spec sheet's 838 is sparse with FP16 accumulate); 32 GB GDDR7"),
    GPU("a100-40gb", 312.0, 40, "data-centre",
        "NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS dense (624 sparse); 40 GB HBM2"),
    GPU("a100-80gb", 312.0, 80, "data-centre",
        "NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS dense (624 sparse); 80 GB HBM2e"),
    GPU("h100", _dense(1979.0), 80, "data-centre",
        "NVIDIA H100 datasheet, SXM5: BF16 tensor core 1,979 TFLOPS with sparsity, half dense; "
        "80 GB HBM3"),
    GPU("h100-pcie", _dense(1513.0), 80, "data-centre",
        "NVIDIA H100 datasheet, PCIe: BF16 tensor core 1,513 TFLOPS with sparsity, half dense; "
        "80 GB HBM2e"),
    GPU("h200", _dense(1979.0), 141, "data-centre",
        "NVIDIA H200 datasheet, SXM: BF16 tensor core 1,979 TFLOPS with sparsity, half dense; "
        "141 GB HBM3e"),
    GPU("l40s", 362.05, 48, "data-centre",
        "NVIDIA L40S datasheet: BF16 tensor core 362.05 TFLOPS dense (733 sparse); 48 GB GDDR6"),
)}

CPU_PROBE_SIZE = 512  # the side of the timed matrix product, as homediff doctor's on a CPU
ALIASES = {"h100-sxm": "h100", "h100sxm": "h100", "h200-sxm": "h200"}


def find_gpu(name: str) -> GPU:
    """The table's GPU of that name (any case, spaces or hyphens), or ``cpu`` measured here."""
    key = name.strip().lower().replace(" ", "").replace("_", "-")
    if key == "cpu":
        return measure_cpu()
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise ConfigError(f"unknown GPU {name!r}: choose one of {', '.join([*GPUS, 'cpu'])} (another "
                          "card: the class nearest its peak rate and memory)")
    return GPUS[key]


def local_gpu() -> GPU:
    """This machine's first CUDA device as the table's entry whose name's parts all appear in the
    device's name (the most such parts wins: "NVIDIA H100 PCIe" is h100-pcie), else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return measure_cpu()
    words = set(re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(0).lower()))
    words |= {w.removeprefix("rtx") for w in words}
    matches = [(len(parts), gpu) for gpu in GPUS.values()
               if (parts := set(gpu.name.removeprefix("rtx").split("-"))) <= words]
    if not matches:
        raise ConfigError(f"this machine's {torch.cuda.get_device_name(0)} is not in the GPU table: "
                          f"give --gpu (one of {', '.join(GPUS)}), the nearest class")
    return max(matches, key=lambda match: match[0])[1]


def measure_cpu() -> GPU:
    """This machine as a ``GPU``: the faster of a float32 and a bfloat16 matrix product (the probe
    of ``homediff doctor``), and the system's memory."""
    import psutil
    import torch

    from homediff import precision

    rates = {}
    for dtype in ("float32", "bfloat16"):
        try:
            rates[dtype] = precision.matmul_rate("cpu", precision.DTYPES[dtype], CPU_PROBE_SIZE)
        except RuntimeError:  # a dtype this build cannot multiply
            continue
    best = max(rates, key=rates.get)
    source = (f"measured here: {precision.cpu_name()}, {torch.get_num_threads()} threads, "
              f"{best} {CPU_PROBE_SIZE}² matrix product")
    return GPU("cpu", rates[best] / 1e12, round(psutil.virtual_memory().total / 2 ** 30, 1), "cpu",
               source)
