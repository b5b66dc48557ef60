"""Precision chosen by measurement (homediff.precision) and the trainer's use of it. The decisions
are tested through their inputs (a measured ratio), never through the timing of this machine."""

import logging

import pytest
import torch
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff import precision
from homediff.precision import AutocastCheck, Choice, choose_dtype, decide
from homediff.training.components import Builders, build_optimizer
from homediff.training.loop import Trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def never(dtype):
    raise AssertionError("nothing may be timed here")


def test_bfloat16_only_where_it_clears_the_margin():
    assert decide(0.03, "x").dtype == torch.float32  # emulated bf16 (AVX2)
    assert decide(1.0, "x").dtype == torch.float32
    assert decide(precision.MIN_SPEEDUP * 0.99, "x").dtype == torch.float32
    assert decide(precision.MIN_SPEEDUP, "x").dtype == torch.bfloat16
    assert decide(4.0, "x").dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_an_explicit_setting_is_taken_as_given_without_timing(name):
    choice = choose_dtype(name, "cpu", never, "x")
    assert choice == Choice(precision.DTYPES[name], None, "x")


def test_auto_on_a_cpu_follows_the_agreed_measurement(caplog):
    runs = []
    run = lambda dtype: runs.append(dtype)  # noqa: E731
    with caplog.at_level(logging.INFO, logger="homediff.precision"):
        fast = choose_dtype("auto", "cpu", run, "probe", agree=lambda measured: 3.0)
        slow = choose_dtype("auto", "cpu", run, "probe", agree=lambda measured: 0.05)
    assert (fast.dtype, fast.speedup) == (torch.bfloat16, 3.0)
    assert (slow.dtype, slow.speedup) == (torch.float32, 0.05)
    assert set(runs) == {torch.float32, torch.bfloat16}  # both candidates ran
    assert "probe: bfloat16 (bfloat16 measured 3.00× float32's speed)" in caplog.text
    assert "probe: float32 (bfloat16 measured 0.05× float32's speed)" in caplog.text


def test_auto_elsewhere_decides_without_timing_and_a_bad_name_is_refused():
    assert choose_dtype("auto", "meta", never, "x").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        choose_dtype("fp8", "cpu", never, "x")


def test_seconds_and_speedup_are_positive_ratios_of_real_runs():
    run = precision.matmul("cpu", 8, 16, 4)
    assert run(torch.float32).shape == (8, 4) and run(torch.bfloat16).dtype == torch.bfloat16
    assert precision.seconds(lambda: run(torch.float32), "cpu") > 0
    assert precision.bf16_speedup(run, torch.device("cpu")) > 0


def regression(dtype: torch.dtype):
    """A linear layer, its inputs and a squared-error loss, in ``dtype``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 16).to(dtype)
    x, target = torch.randn(32, 64, dtype=dtype), torch.randn(32, 16, dtype=dtype)
    return model, lambda: (model(x) - target).pow(2).mean()


def test_autocast_check_of_a_float64_model_finds_no_difference():
    """Autocast leaves float64 alone: both steps are the same computation, exactly."""
    model, loss = regression(torch.float64)
    check = precision.check_autocast(model, loss, "cpu")
    assert check.loss_error == 0.0 and check.grad_cosine == pytest.approx(1.0, abs=1e-12)
    assert check.speedup > 0 and check.close
    assert all(p.grad is None for p in model.parameters())


def test_autocast_check_sees_bfloat16_rounding_of_a_float32_model():
    """In bfloat16 (8-bit mantissa, relative rounding 2**-9) the products of 64 terms differ from
    float32's by well under 1 %: the check sees a difference, and calls it close."""
    model, loss = regression(torch.float32)
    check = precision.check_autocast(model, loss, "cpu")
    assert 0 < check.loss_error < 0.01 and 0.999 < check.grad_cosine <= 1 + 1e-12
    assert check.close
    assert not AutocastCheck(speedup=2.0, loss_error=0.05, grad_cosine=1.0).close
    assert not AutocastCheck(speedup=2.0, loss_error=0.0, grad_cosine=0.9).close


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_text_encoder_takes_an_explicit_dtype(assets, dtype):
    from homediff.encoders.text import TextEncoder

    encoder = TextEncoder.from_pretrained(assets[1], dtype=dtype, max_length=8)
    assert encoder.model.dtype == precision.DTYPES[dtype]
    assert encoder.encode(["a red square"]).dtype == precision.DTYPES[dtype]


def test_trainer_records_its_choices_and_a_resume_reuses_them(assets, tmp_path, monkeypatch):
    config = tiny_config(*assets, optimizer={"name": "muon"},
                         stages=[{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 4}])
    built = []
    first = Trainer(config, tmp_path, max_steps=2, builders=Builders(
        optimizer=lambda *args: built.append(build_optimizer(*args)) or built[-1]))
    chosen = first.precision
    assert chosen["autocast"] in (None, "bfloat16") and chosen["muon"] in ("float32", "bfloat16")
    assert str(first.text_encoder.model.dtype) == f"torch.{chosen['text']}"
    first.run()
    assert built[0].ns_dtype == precision.DTYPES[chosen["muon"]]

    monkeypatch.setattr(precision, "bf16_speedup", never)
    resumed = Trainer(config, tmp_path, resume="latest")  # the same machine: nothing re-timed
    assert resumed.precision == chosen


def test_a_resume_on_another_machine_measures_again(assets, tmp_path, monkeypatch):
    config = tiny_config(*assets, optimizer={"name": "muon"},
                         stages=[{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 4}])
    Trainer(config, tmp_path, max_steps=2).run()
    monkeypatch.setattr(precision, "machine_key", lambda device: "cpu:another")
    monkeypatch.setattr(precision, "bf16_speedup", lambda run, device, warmed=False: 0.05)
    resumed = Trainer(config, tmp_path, resume="latest")
    assert resumed.precision["machine"] == "cpu:another"
    assert (resumed.precision["autocast"], resumed.precision["muon"]) == (None, "float32")


def test_auto_defers_to_accelerate_launch_and_an_explicit_value_wins(monkeypatch, caplog):
    from homediff.training.config import config_from_dict
    from homediff.training.precisions import accelerator_precision

    def config(mixed):
        return config_from_dict({"dataset": {"path": "x"}, "train": {"mixed_precision": mixed},
                                 "stages": [{"resolution": 8, "steps": 1}]})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert accelerator_precision(config("auto")) == "fp16"
    with caplog.at_level("WARNING"):
        assert accelerator_precision(config("no")) == "no"
    assert "train.mixed_precision = 'no' in the config wins over accelerate's 'fp16'" in caplog.text
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate's default: not a request
    gpu = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
    assert accelerator_precision(config("auto")) == (gpu if torch.cuda.is_available() else "no")
