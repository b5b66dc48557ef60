import math
import signal
import subprocess
import sys
import threading

import pytest
import torch
from train_helpers import (EPS32, assert_trained_alike, flat, recording, square_folder,
                           text_encoder_folder, tiny_config, train_recording)

from homediff.errors import ConfigError
from homediff.pipeline import HomeDiffPipeline
from homediff.training.checkpoint import list_checkpoints, load_tensors
from homediff.training.components import build_model, build_optimizer
from homediff.training.loop import Trainer, TrainingStopped


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def losses(trainer) -> list[float]:
    return [loss for _, loss in trainer.progress.losses]


def test_a_tiny_model_overfits_a_handful_of_images(assets, tmp_path):
    config = tiny_config(*assets, stages=[{"resolution": 8, "batch_size": 8, "lr": 0.5, "steps": 200,
                                           "tread_rate": 0.0}], ema={"enabled": False},
                         optimizer={"warmup_steps": 20})
    trainer = Trainer(config, tmp_path)
    trainer.run()
    curve = losses(trainer)
    first, last = sum(curve[:20]) / 20, sum(curve[-20:]) / 20
    assert last < first / 5, (first, last)  # measured: about 1.37 -> 0.11


def test_gradient_accumulation_equals_the_full_batch(assets, tmp_path):
    """Batch 4 and two accumulated micro-batches of 2 train alike (``assert_trained_alike``): the
    sampler's order does not depend on the batch size, so each step sees the same 4 images, and
    with random draws made per image the same flow times, noise and token routing (rate 0.5)."""
    runs = []
    for batch, accumulate in ((4, 1), (2, 2)):
        stage = {"resolution": 8, "batch_size": batch, "grad_accum": accumulate, "lr": 0.1,
                 "steps": 8, "tread_rate": 0.5}
        runs.append(train_recording(tiny_config(*assets, stages=[stage]), tmp_path / f"{batch}-{accumulate}"))
    full, accumulated = runs
    assert len(full.images) == 8 and all(len(set(keys)) == 4 for keys in full.images.values())
    assert {step: sorted(keys) for step, keys in accumulated.images.items()} == {
        step: sorted(keys) for step, keys in full.images.items()}
    assert_trained_alike(full, accumulated.losses, accumulated.norms,
                         accumulated.trainer.unwrapped.state_dict())
    # one EMA update per optimiser step, not per micro-batch
    assert full.trainer.ema.updates == accumulated.trainer.ema.updates == 8
    averaged = full.trainer.ema.shadow  # the trained parameters (buffers are the model's own)
    ema, start = flat(averaged), flat({name: full.initial[name] for name in averaged})
    assert (flat(accumulated.trainer.ema.shadow) - ema).norm() <= 2 ** 10 * EPS32 * (ema - start).norm()


@pytest.mark.parametrize("optimizer", [{"name": "adamw"}, {"name": "muon", "muon_dtype": "bfloat16"},
                                       {"name": "muon", "muon_dtype": "float32"}])
def test_stop_and_resume_equals_the_uninterrupted_run(assets, tmp_path, optimizer):
    stages = [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 6, "tread_rate": 0.5},
              {"resolution": 16, "batch_size": 2, "lr": 0.2, "steps": 5, "tread_rate": 0.25}]
    config = tiny_config(*assets, stages=stages, optimizer=optimizer)
    built = []
    whole = Trainer(config, tmp_path / "whole", builders=recording(
        optimizer=lambda *args: built.append(build_optimizer(*args)) or built[-1]))
    whole.run()
    if optimizer["name"] == "muon":
        assert built[0].ns_dtype == getattr(torch, optimizer["muon_dtype"])

    first = Trainer(config, tmp_path / "split", max_steps=8)  # stops inside the second stage
    assert first.run() is None
    assert list_checkpoints(tmp_path / "split" / "checkpoints")[-1].name == "step-00000008"
    resumed = Trainer(config, tmp_path / "split", resume="latest")
    assert resumed.progress.step == 8 and resumed.progress.stage == 1
    resumed.run()

    assert losses(resumed) == losses(whole)  # bit for bit
    final = load_tensors(tmp_path / "whole" / "model.safetensors")
    again = load_tensors(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_stage_transition_changes_resolution_batch_and_lr(assets, tmp_path):
    stages = [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 3, "grad_accum": 2},
              {"resolution": 16, "batch_size": 2, "lr": 0.1, "steps": 2}]
    config = tiny_config(*assets, stages=stages, optimizer={"warmup_steps": 0, "min_lr_ratio": 0.1})
    seen = []
    trainer = Trainer(config, tmp_path, builders=recording())
    out = trainer.run(callback=lambda progress, batch: seen.append(
        (progress.step, tuple(batch["image"].shape))))
    assert seen == [(0, (4, 3, 8, 8))] * 2 + [(1, (4, 3, 8, 8))] * 2 + [(2, (4, 3, 8, 8))] * 2 + \
        [(3, (2, 3, 16, 16)), (4, (2, 3, 16, 16))]
    # each stage's cosine from its own base LR: 1, then ½(1 + cos(π·k/n)) down to 0.1 at its end
    cosine = lambda k, n: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / n))  # noqa: E731
    expected = [0.5 * cosine(k, 3) for k in range(3)] + [0.1 * cosine(k, 2) for k in range(2)]
    assert trainer.monitor.lrs == pytest.approx(expected, rel=4 * EPS32)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003",
                                                                          "step-00000005"]
    pipe = HomeDiffPipeline.from_pretrained(out)
    image = pipe("a red square", height=16, width=16, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "model.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(tmp_path / "logs")).Reload()  # the resolved config, as text
    assert "config/text_summary" in logs.Tags()["tensors"]
    text = logs.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "resolution = 16" in text and "batch_size = 2" in text


def test_a_time_budget_refits_the_stage_length_and_its_lr_schedule(assets, tmp_path):
    config = tiny_config(*assets, stages=[{"resolution": 8, "batch_size": 4, "lr": 0.5,
                                           "steps": 1000}], optimizer={"warmup_steps": 0})
    trainer = Trainer(config, tmp_path, time_budget=30.0, builders=recording(),
                      clock=lambda: 2.0 * trainer.progress.step)  # 2 s a step
    trainer.run()
    multipliers = [lr / 0.5 for lr in trainer.monitor.lrs]
    assert trainer.progress.step == 15  # refitted at step 10: 30 s at 2 s a step
    assert multipliers[10] < 0.5 < 0.99 < multipliers[9]  # the cosine jumps ahead to 10 of 15 steps
    with pytest.raises(ConfigError, match="one stage"):
        Trainer(tiny_config(*assets, stages=[{"resolution": 8, "steps": 1}] * 2), tmp_path,
                time_budget=30.0)


@pytest.mark.parametrize("base", [0, 4])
def test_training_times_follow_the_configured_logit_normal(assets, tmp_path, base):
    """t = sigmoid(mean + std·u), then the shift s = √(8·8)/base: s·t / (1 + (s − 1)·t) adds ln s to
    the logit, so the logits' mean moves by ln 2 for base 4 and their spread stays."""
    config = tiny_config(*assets, train={"time_mean": -1.0, "time_std": 0.5, "sample_prompts": [],
                                         "time_shift_base": base},
                         stages=[{"resolution": 8, "batch_size": 8, "steps": 3}])
    times = []

    def model_seeing_times(*args):
        model = build_model(*args)
        model.register_forward_pre_hook(lambda module, inputs: times.append(inputs[1].detach()))
        return model
    Trainer(config, tmp_path, builders=recording(model=model_seeing_times)).run()
    logits = torch.logit(torch.cat(times))
    moved = math.log(8 / base) if base else 0.0
    assert len(logits) == 24 and -1.4 < logits.mean() - moved < -0.6 and 0.25 < logits.std() < 0.8


def test_non_finite_losses_skip_steps_then_stop(assets, tmp_path):
    config = tiny_config(*assets, train={"max_bad_steps": 3, "sample_prompts": []})
    trainer = Trainer(config, tmp_path, builders=recording(
        loss=lambda batch, parts, settings, generator: torch.tensor(float("nan"), requires_grad=True)))
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row"):
        trainer.run()
    assert trainer.progress.step == 0


def test_a_folder_smaller_than_the_batch_fills_its_batches_from_the_next_epochs(assets, tmp_path, caplog):
    """Eight images in batches of 12 (a concept folder under a fine-tuning batch): each batch goes
    on into the next shuffled epoch, each epoch shows every image once, a stage of 6 epochs takes
    a step an epoch, and a warning says so once. A run stopped after its first step, inside the
    second epoch, resumes with the same images and ends with the same weights, bit for bit."""
    config = tiny_config(*assets, stages=[{"resolution": 8, "batch_size": 12, "epochs": 6, "lr": 0.1}])
    with caplog.at_level("WARNING"):
        whole = train_recording(config, tmp_path / "whole")
    assert caplog.text.count("smaller than a batch") == 1
    assert sorted(whole.images) == list(range(6))
    seen = [key for step in range(6) for key in whole.images[step]]
    assert all(len(set(seen[i:i + 8])) == 8 for i in range(0, 72, 8))
    train_recording(config, tmp_path / "split", max_steps=1)
    resumed = train_recording(config, tmp_path / "split", resume="latest")
    assert resumed.images == {step: keys for step, keys in whole.images.items() if step >= 1}
    final = [load_tensors(tmp_path / run / "model.safetensors") for run in ("whole", "split")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_missing_dataset_is_a_clear_error(assets, tmp_path):
    config = tiny_config(tmp_path / "nowhere", assets[1])
    with pytest.raises(ConfigError, match="nowhere is not a folder"):
        Trainer(config, tmp_path / "run").run()


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(assets, tmp_path):
    """SIGTERM to ``homediff train`` mid-run: it finishes the step (or, waiting for the next
    step's data, stops there), checkpoints and exits with 0.
    The signal goes out once the run has said that it wrote its first checkpoint (step 2), so
    the run is inside its training loop, whatever the machine's speed."""
    config_path = tmp_path / "run.toml"
    from homediff.training.config import to_toml
    config = tiny_config(*assets, stages=[{"resolution": 8, "batch_size": 4, "steps": 100000}],
                         dataset={"path": str(assets[0]), "workers": 1},
                         train={"checkpoint_every": 2, "sample_prompts": []})
    config_path.write_text(to_toml(config))
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "homediff", "train", str(config_path),
                                "--out", str(run_dir)], stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, process.kill)  # a hung run fails the test instead of hanging it
    watchdog.start()
    try:
        said = []
        for line in process.stderr:  # the progress bar's carriage returns end lines too
            said.append(line)
            if line.startswith("checkpoint step 2 "):
                process.send_signal(signal.SIGTERM)
                break
        err = "".join(said) + process.stderr.read()
        process.wait()
    finally:
        watchdog.cancel()
    assert process.returncode == 0, err
    assert "resume with --resume latest" in err
    step = int(list_checkpoints(run_dir / "checkpoints")[-1].name.split("-")[1])
    assert step >= 2
    resumed = Trainer(config, run_dir, resume="latest", max_steps=step + 2)
    assert resumed.progress.step == step
    resumed.run()
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step-{step + 2:08d}"
