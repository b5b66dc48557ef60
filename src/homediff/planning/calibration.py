"""HDM's run as the reference for time: what each stage took on four RTX 5090s, the MFU those hours
imply under homediff's FLOP model, and the default MFU of each GPU class.

Source: the HDM technical report, §4.2 (samples seen and hours per stage) and §4.3 (385 hours on
four RTX 5090s under DDP, $535–620), as the field survey gives them (§1.1, §4.1). HDM cached
neither text states nor latents, so its hours include both encoders' forward passes, and it
trained with gradient checkpointing, whose recomputation the implied MFU absorbs (MFU counts model
FLOPs). ``configs/hdm-xut-base.toml`` is that recipe with HDM's samples as stage lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from homediff.planning.gpus import GPU, GPUS
from homediff.planning.plan import Plan, plan_run
from homediff.training.config import TrainConfig, load_config


@dataclass(frozen=True)
class ReferenceStage:
    resolution: int
    samples: int
    hours: float


HDM_GPU = "rtx5090"
HDM_GPUS = 4
HDM_STAGES = (ReferenceStage(256, 152_500_000, 174), ReferenceStage(512, 42_300_000, 120),
              ReferenceStage(768, 8_500_000, 42), ReferenceStage(1024, 3_600_000, 49))
HDM_HOURS = 385  # the report's total (the stages' hours add up to it)
HDM_COST = (535, 620)  # dollars, for the 4 × 385 GPU-hours
HDM_RECIPE = "hdm-xut-base.toml"
SAME_SAMPLES = 0.01  # a stage this close to HDM's samples is HDM's stage

# Data-centre cards have more peak FLOPs per byte of memory bandwidth than a 5090 (README: "Plan a
# real run"), so the element-wise work between matrix products (norms, modulation, RoPE, the VAE's
# group norms) takes a larger share of each step: a lower fraction of the peak than HDM reached.
DATA_CENTRE_MFU = 0.30
# A CPU against its own matrix-product probe: the tiny recipe's training loop reaches this order of
# its GEMM rate (benchmarks/RESULTS.md, training-loop throughput).
CPU_MFU = 0.35


def hdm_recipe() -> TrainConfig:
    """The packaged HDM recipe."""
    with resources.as_file(resources.files("homediff").joinpath("recipes", HDM_RECIPE)) as path:
        return load_config(path)


def _implied_mfu(work: float, hours: float) -> float:
    return work / (hours * 3600 * GPUS[HDM_GPU].peak_tflops * 1e12 * HDM_GPUS)


def hdm_comparison(plan: Plan) -> dict | None:
    """HDM's hours and the MFU they imply under the plan's FLOPs per sample, per stage and in
    total, when ``plan`` is HDM's run (4 × rtx5090, HDM's resolutions and samples); else None."""
    same = (plan.gpu.name == HDM_GPU and plan.gpus == HDM_GPUS
            and len(plan.stages) == len(HDM_STAGES)
            and all(s.resolution == ref.resolution and abs(s.samples / ref.samples - 1) <= SAME_SAMPLES
                    for s, ref in zip(plan.stages, HDM_STAGES)))
    if not same:
        return None
    work = [ref.samples * s.flops_per_sample for ref, s in zip(HDM_STAGES, plan.stages)]
    return {"stages": [{"hours": ref.hours, "mfu": _implied_mfu(w, ref.hours)}
                       for ref, w in zip(HDM_STAGES, work)],
            "total": {"hours": HDM_HOURS, "mfu": _implied_mfu(sum(work), HDM_HOURS),
                      "cost": list(HDM_COST)}}


def hdm_mfu() -> float:
    """The one MFU that puts the HDM recipe's whole run at HDM's total hours."""
    return hdm_comparison(plan_run(hdm_recipe(), GPUS[HDM_GPU], HDM_GPUS, mfu=1.0))["total"]["mfu"]


def default_mfu(gpu: GPU) -> tuple[float, str]:
    """The MFU a plan assumes on ``gpu`` unless told, and why."""
    if gpu.kind == "consumer":
        return hdm_mfu(), "what HDM's 385 h on 4×RTX 5090 imply under homediff's FLOP count"
    if gpu.kind == "data-centre":
        return DATA_CENTRE_MFU, "a data-centre card's default, below HDM's consumer-card figure"
    return CPU_MFU, "a CPU's default, against the matrix-product probe"
