"""The plan: HDM's run reproduced from the FLOP model, stage lengths as the trainer counts them,
encoder costs and cache sizes, checkpoint sizes against real state, and the memory rows."""

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from homediff.errors import ConfigError
from homediff.models.flops import text_encoder_flops, train_step_flops, vae_encoder_flops
from homediff.planning.calibration import (HDM_COST, HDM_HOURS, HDM_STAGES, default_mfu,
                                           hdm_comparison, hdm_recipe)
from homediff.planning.gpus import GPUS, find_gpu, measure_cpu
from homediff.planning.plan import EncoderShapes, dataset_images, encoder_config, plan_run
from homediff.training.components import build_ema, build_model, build_optimizer
from homediff.training.config import config_from_dict

MINILM = {"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
          "num_attention_heads": 12}
PIXELS = EncoderShapes(text=MINILM, vae=None, factor=1, channels=3)


def tiny_config(**sections):
    raw = {"model": {"preset": "xut-tiny"}, "train": {"checkpoint_every": 10},
           "stages": [{"name": "a", "resolution": 16, "batch_size": 4, "grad_accum": 2, "steps": 25},
                      {"name": "b", "resolution": 32, "batch_size": 2, "epochs": 1.5,
                       "text_length": 12}]}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


def test_hdm_recipe_on_four_rtx_5090_reproduces_the_report():
    """The acceptance: one MFU for all stages (HDM's total), each stage's hours within ±30% of
    HDM's, the total within ±20% of 385 h, and the cost at $0.35 and $0.40 per GPU-hour inside
    HDM's $535–620. The ratios between stages are the FLOP model's alone."""
    gpu = find_gpu("rtx5090")
    mfu, _ = default_mfu(gpu)
    plan = plan_run(hdm_recipe(), gpu, 4, mfu, price_per_hour=0.35)
    for stage, ref in zip(plan.stages, HDM_STAGES, strict=True):
        assert stage.resolution == ref.resolution
        assert stage.samples == pytest.approx(ref.samples, rel=1e-3)
        assert abs(stage.hours / ref.hours - 1) <= 0.30, (stage.name, stage.hours, ref.hours)
        assert stage.hours == pytest.approx(stage.samples * stage.flops_per_sample
                                            / (4 * gpu.peak_tflops * 1e12 * mfu) / 3600)
    assert abs(plan.hours / HDM_HOURS - 1) <= 0.20
    assert HDM_COST[0] <= plan.gpu_hours * 0.35 and plan.gpu_hours * 0.40 <= HDM_COST[1]
    assert plan.cost == pytest.approx(plan.gpu_hours * 0.35)


def test_hdm_recipe_counts_both_encoders_and_routes_at_1024():
    plan = plan_run(hdm_recipe(), find_gpu("rtx5090"), 4, 0.4)
    last = plan.stages[-1]
    assert (last.resolution, last.text_length, last.tread_rate) == (1024, 512, 0.5)
    assert all(s.flops["text_encoder"] > 0 and s.flops["vae_encoder"] > 0 for s in plan.stages)
    assert plan.parameters == 343_176_208
    assert [s.global_batch for s in plan.stages] == [2048, 512, 512, 256]


def test_the_hdm_comparison_gives_each_stage_its_implied_mfu():
    gpu = find_gpu("rtx5090")
    plan = plan_run(hdm_recipe(), gpu, 4, 0.4)
    hdm = hdm_comparison(plan)
    assert [s["hours"] for s in hdm["stages"]] == [ref.hours for ref in HDM_STAGES]
    for stage, ref, implied in zip(plan.stages, HDM_STAGES, hdm["stages"]):
        assert implied["mfu"] == pytest.approx(ref.samples * stage.flops_per_sample
                                               / (ref.hours * 3600 * 4 * gpu.peak_tflops * 1e12))
    # the total's MFU is the default of consumer cards: the total hours come out at HDM's
    assert hdm["total"]["mfu"] == pytest.approx(default_mfu(gpu)[0])
    assert hdm_comparison(plan_run(hdm_recipe(), gpu, 2, 0.4)) is None
    assert hdm_comparison(plan_run(hdm_recipe(), find_gpu("rtx4090"), 4, 0.4)) is None


def test_stage_lengths_follow_the_trainer():
    config = tiny_config()
    plan = plan_run(config, GPUS["h100"], 2, 0.5, images=103, shapes=PIXELS)
    a, b = plan.stages
    assert (a.steps, a.samples, a.global_batch, a.micro_batch) == (25, 25 * 4 * 2 * 2, 16, 4)
    per_rank_batches = 103 // 2 // 2  # the trainer drops each rank's last partial batch
    assert b.steps == math.ceil(1.5 * per_rank_batches / 1) and b.samples == b.steps * 2 * 2
    assert plan.to_dict()["total"]["samples"] == a.samples + b.samples
    with pytest.raises(ConfigError, match="--images"):
        plan_run(config, GPUS["h100"], 2, 0.5, shapes=PIXELS)


def test_flops_time_and_cost_per_stage():
    config = tiny_config()
    plan = plan_run(config, GPUS["a100-80gb"], 3, 0.25, price_per_hour=1.5, images=1000,
                    shapes=PIXELS)
    for stage, res in zip(plan.stages, (16, 32)):
        model = plan_model_config(config)
        assert stage.flops == {
            "backbone": train_step_flops(model, res, res, stage.text_length, 0.5),
            "text_encoder": text_encoder_flops(MINILM, stage.text_length), "vae_encoder": 0}
        assert stage.hours * 3600 * 3 * 312e12 * 0.25 == pytest.approx(stage.samples * stage.flops_per_sample)
        assert stage.gpu_hours == pytest.approx(3 * stage.hours)
        assert stage.cost == pytest.approx(1.5 * stage.gpu_hours)
    assert plan.cost == pytest.approx(sum(s.cost for s in plan.stages))


def plan_model_config(config):
    return build_model(config, SimpleNamespace(dim=384), SimpleNamespace(channels=3),
                       torch.device("meta")).config


def test_cached_encoders_cost_nothing_and_take_disk():
    vae = {"block_out_channels": [8, 8, 8, 8], "latent_channels": 4, "layers_per_block": 1}
    shapes = EncoderShapes(text=MINILM, vae=vae, factor=8, channels=4)
    plain = plan_run(tiny_config(), GPUS["h100"], 1, 0.5, images=40, shapes=shapes)
    assert plain.stages[1].flops["vae_encoder"] == vae_encoder_flops(vae, 32, 32)
    assert plain.cache_bytes() == {} and plain.stages[0].cache_bytes == {}
    cached = plan_run(tiny_config(train={"cache_text": True, "cache_latents": True},
                                  text_encoder={"options": {"padding": "max_length"}}),
                      GPUS["h100"], 1, 0.5, images=40, shapes=shapes)
    a, b = cached.stages
    assert a.flops["text_encoder"] == a.flops["vae_encoder"] == 0
    entries_a, entries_b = min(a.samples, 40), min(b.samples, 40)
    assert a.cache_bytes == {"text": entries_a * 256 * 384 * 2, "latents": entries_a * 8 * 2 * 2 * 2}
    assert b.cache_bytes == {"text": entries_b * 12 * 384 * 2, "latents": entries_b * 8 * 4 * 4 * 2}
    assert cached.cache_bytes() == {"text": a.cache_bytes["text"] + b.cache_bytes["text"],
                                    "latents": a.cache_bytes["latents"] + b.cache_bytes["latents"]}


def _tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_checkpoint_bytes_are_the_tensors_the_trainer_saves(optimizer):
    config = tiny_config(optimizer={"name": optimizer})
    plan = plan_run(config, GPUS["h100"], 1, 0.5, images=10, shapes=PIXELS)
    torch.manual_seed(0)
    model = build_model(config, SimpleNamespace(dim=384), SimpleNamespace(channels=3), torch.device("cpu"))
    ema = build_ema(config, model)
    opt = build_optimizer(config, config.stages[0], model, torch.float32, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert plan.checkpoint_bytes == {"model": _tensor_bytes(model.state_dict()),
                                     "ema": _tensor_bytes(ema.state_dict()["shadow"]),
                                     "optimizer": _tensor_bytes(opt.state_dict())}
    written = plan.to_dict()["total"]["steps"] // 10 + 2
    assert plan.checkpoints_kept == min(3, written)
    assert plan.checkpoint_disk == (plan.checkpoints_kept + 1) * sum(plan.checkpoint_bytes.values())


def test_a_lora_checkpoint_holds_the_adapters_only():
    pytest.importorskip("peft")
    config = tiny_config(lora={"rank": 4}, ema={"enabled": False})
    plan = plan_run(config, GPUS["h100"], 1, 0.5, images=10, shapes=PIXELS)
    model = build_model(config, SimpleNamespace(dim=384), SimpleNamespace(channels=3), torch.device("cpu"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.parameters == trained < sum(p.numel() for p in model.parameters())
    assert plan.checkpoint_bytes == {"model": 4 * trained, "optimizer": 4 * (2 * trained + len(
        [p for p in model.parameters() if p.requires_grad]))}


@dataclass
class Estimate:
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def test_memory_rows_ask_the_estimator_for_each_sharding_and_checkpointing():
    calls = []

    def estimate(config, stage_index, *, micro_batch=None, checkpointing=None, processes=1,
                 sharding="ddp", device="cuda"):
        calls.append((stage_index, checkpointing, processes, sharding, device))
        return Estimate({"weights": 30 * 2 ** 30 // (processes if sharding == "fsdp" else 1),
                         "activations": 0 if checkpointing else 10 * 2 ** 30})

    plan = plan_run(tiny_config(), GPUS["rtx5090"], 4, 0.5, images=10, shapes=PIXELS, memory=estimate)
    assert sorted(calls) == sorted((i, c, 4, s, "cuda") for i in (0, 1) for c in (False, True)
                                   for s in ("ddp", "fsdp"))
    rows = {(r.sharding, r.checkpointing): (r.total, r.fits) for r in plan.stages[0].memory}
    assert rows[("ddp", False)] == (40 * 2 ** 30, False)
    assert rows[("ddp", True)] == (30 * 2 ** 30, True)
    assert rows[("fsdp", False)][1] and rows[("fsdp", True)][1]
    calls.clear()
    plan_run(tiny_config(optimizer={"name": "muon"}), GPUS["rtx5090"], 1, 0.5, images=10,
             shapes=PIXELS, memory=estimate)
    assert {call[3] for call in calls} == {"ddp"}  # FSDP2 trains with AdamW only


def test_wrong_assumptions_are_refused():
    for kwargs, word in (({"gpus": 0}, "--gpus"), ({"mfu": 1.5}, "--mfu"),
                         ({"price_per_hour": -1.0}, "--price")):
        with pytest.raises(ConfigError, match=word):
            plan_run(tiny_config(), GPUS["h100"], **{"gpus": 1, "mfu": 0.5, **kwargs}, images=10,
                     shapes=PIXELS)


def test_a_folder_data_set_is_counted_with_its_repeats(tmp_path):
    (tmp_path / "3_extra").mkdir()
    for name in ("a.png", "b.jpg", "3_extra/c.png", "notes.md"):
        (tmp_path / name).write_bytes(b"")
    assert dataset_images(tiny_config(dataset={"path": str(tmp_path)})) == 2 + 3
    assert dataset_images(tiny_config(dataset={"path": str(tmp_path / "absent")})) is None


def test_encoder_configs_ship_for_hdm_and_are_read_from_folders(tmp_path):
    assert encoder_config("qwen/QWEN3-0.6B", "text encoder")["num_hidden_layers"] == 28
    assert encoder_config("KBlueLeaf/EQ-SDXL-VAE", "autoencoder")["latent_channels"] == 4
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    assert encoder_config(str(tmp_path), "text encoder")["hidden_size"] == 8
    with pytest.raises(ConfigError, match="config.json"):
        encoder_config("nobody-has/this-model", "autoencoder")


def test_the_gpu_table():
    for gpu in GPUS.values():
        assert gpu.peak_tflops > 0 and gpu.memory_gib > 0 and gpu.source
        assert gpu.kind in ("consumer", "data-centre")
    assert find_gpu("RTX 5090") is GPUS["rtx5090"] and find_gpu("H100-SXM") is GPUS["h100"]
    with pytest.raises(ConfigError, match="rtx3090"):
        find_gpu("voodoo2")


def test_the_cpu_is_measured_here():
    cpu = measure_cpu()
    assert cpu.kind == "cpu" and cpu.peak_tflops > 0 and cpu.memory_gib > 0
    assert "measured here" in cpu.source
    assert 0 < default_mfu(cpu)[0] < 1 and 0 < default_mfu(GPUS["h100"])[0] < 1
