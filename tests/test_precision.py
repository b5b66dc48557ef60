"""Precision chosen by measurement (homediff.precision) and the trainer's use of it. The decisions
are tested through their inputs (a measured ratio, injected with ``measured_with``), never through
the timing of this machine; the user cache of remembered measurements is a temporary folder."""

import logging
import math

import pytest
import torch
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff import precision
from homediff.precision import AutocastCheck, Choice, choose_matmul_dtype, decide, measured_with
from homediff.training.components import Builders, build_optimizer
from homediff.training.loop import Trainer

SLOW, FAST = 0.05, 4.0  # bfloat16's speedup where it is emulated (AVX2) and where it is native


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """The user cache, where measurements are remembered: a folder of this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "homediff" / "precision"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def never(*args, **kwargs):
    raise AssertionError("nothing may be measured here")


def measuring(speedup: float):
    """Every "auto" decision takes ``speedup`` as bfloat16's measured speedup (whatever this CPU does)."""
    return measured_with(lambda shape, device: speedup)


def count_products(monkeypatch) -> list:
    """The shapes of the products measured from now on, one per measurement (each timed as a
    no-op)."""
    timed = []

    def product(device, m, k, n):
        timed.append((m, k, n))
        return lambda dtype: None
    monkeypatch.setattr(precision, "matmul", product)
    return timed


def test_bfloat16_only_where_it_clears_the_margin():
    assert decide(0.03, "x").dtype == torch.float32  # emulated bf16 (AVX2)
    assert decide(1.0, "x").dtype == torch.float32
    assert decide(precision.MIN_SPEEDUP * 0.99, "x").dtype == torch.float32
    assert decide(precision.MIN_SPEEDUP, "x").dtype == torch.bfloat16
    assert decide(4.0, "x").dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_an_explicit_setting_is_taken_as_given_without_timing(name):
    with measured_with(never):
        choice = choose_matmul_dtype(name, "cpu", (8, 8, 8), "x")
    assert choice == Choice(precision.DTYPES[name], None, "x")


def test_auto_on_a_cpu_follows_the_agreed_measurement(caplog):
    shapes = []

    def measure(shape, device):
        shapes.append(shape)
        return 1.0
    with caplog.at_level(logging.INFO, logger="homediff.precision"), measured_with(measure):
        fast = choose_matmul_dtype("auto", "cpu", (8, 16, 4), "probe", agree=lambda measured: 3.0)
        slow = choose_matmul_dtype("auto", "cpu", (8, 16, 4), "probe", agree=lambda measured: SLOW)
    assert (fast.dtype, fast.speedup) == (torch.bfloat16, 3.0)
    assert (slow.dtype, slow.speedup) == (torch.float32, SLOW)
    assert shapes == [(8, 16, 4)] * 2  # each process measures, then they agree
    assert "probe: bfloat16 (bfloat16 measured 3.00× float32's speed)" in caplog.text
    assert "probe: float32 (bfloat16 measured 0.05× float32's speed)" in caplog.text


def test_auto_elsewhere_decides_without_timing_and_a_bad_name_is_refused():
    with measured_with(never):
        assert choose_matmul_dtype("auto", "meta", (8, 8, 8), "x").dtype == torch.float32
        with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
            choose_matmul_dtype("fp8", "cpu", (8, 8, 8), "x")


def test_auto_times_a_product_of_bounded_size_whatever_the_problem(monkeypatch):
    """The XUT-base sampling product (2048 × 1024 × 3072) is timed as one of at most 2**24
    multiply-adds (benchmarks/RESULTS.md: what either costs where bfloat16 is emulated). A product
    below the bound is timed at its own size, rounded up to powers of two."""
    timed = count_products(monkeypatch)
    choose_matmul_dtype("auto", "cpu", (2048, 1024, 3072), "sampling")
    choose_matmul_dtype("auto", "cpu", (48, 32, 100), "tiny")
    assert len(timed) == 2 and all(math.prod(shape) <= 2**24 for shape in timed)
    assert timed[1] == (64, 32, 128)
    assert precision.probe_shape((2048, 1024, 3072)) == timed[0]
    assert precision.probe_shape((2000, 1000, 2100)) == timed[0]  # one bucket, one decision
    assert precision.probe_shape((1, 1, 1)) == (1, 1, 1)


def test_a_measurement_is_remembered_per_machine_torch_and_shape_bucket(monkeypatch, user_cache):
    timed = count_products(monkeypatch)
    first = choose_matmul_dtype("auto", "cpu", (2048, 1024, 3072), "sampling")
    again = choose_matmul_dtype("auto", "cpu", (2000, 1000, 2100), "text encoder")
    assert len(timed) == 1 and again.speedup == first.speedup and again.dtype == first.dtype
    assert len(list(user_cache.glob("*.json"))) == 1
    choose_matmul_dtype("auto", "cpu", (48, 32, 100), "another bucket")
    assert len(timed) == 2
    version, machine = torch.__version__, precision.machine_key
    monkeypatch.setattr(torch, "__version__", "0.0.0")  # another torch: measured again
    choose_matmul_dtype("auto", "cpu", (2048, 1024, 3072), "sampling")
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(precision, "machine_key", lambda device: "cpu:another:AVX2:")
    choose_matmul_dtype("auto", "cpu", (2048, 1024, 3072), "sampling")
    assert len(timed) == 4
    monkeypatch.setattr(precision, "machine_key", machine)  # this machine and torch: remembered
    choose_matmul_dtype("auto", "cpu", (2048, 1024, 3072), "sampling")
    assert len(timed) == 4
    entries = precision.remembered()
    assert len(entries) == 3 and sum(entry["current"] for entry in entries) == 1
    assert precision.forget() == 3 and precision.remembered() == []


def test_the_probe_runs_on_one_thread_and_leaves_the_threads_as_they_were(monkeypatch):
    """A small product on several threads of a busy machine times the waits for a descheduled
    thread, not the kernels: the probe runs on one."""
    threads_seen = []

    def product(device, m, k, n):
        return lambda dtype: threads_seen.append(torch.get_num_threads())
    monkeypatch.setattr(precision, "matmul", product)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        choose_matmul_dtype("auto", "cpu", (64, 64, 64), "x")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert threads_seen and set(threads_seen) == {1}


def test_an_unreadable_memory_is_measured_again(monkeypatch, user_cache):
    timed = count_products(monkeypatch)
    choose_matmul_dtype("auto", "cpu", (64, 64, 64), "x")
    for path in user_cache.glob("*.json"):
        path.write_text("{not json")
    choose_matmul_dtype("auto", "cpu", (64, 64, 64), "x")
    assert len(timed) == 2


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


def auto_config(assets):
    """Every precision setting "auto", Muon included."""
    return tiny_config(*assets, optimizer={"name": "muon", "muon_dtype": "auto"},
                       text_encoder={"name": str(assets[1]), "options": {
                           "padding": "max_length", "max_length": 6, "dtype": "auto"}},
                       train={"mixed_precision": "auto", "sample_prompts": []},
                       stages=[{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 4}])


def autocast_checked(monkeypatch, speedup: float) -> list:
    """The trainer's autocast check reports ``speedup`` with equal losses and gradients; the list
    collects the models it was run on."""
    checked = []

    def check(model, loss_fn, device):
        checked.append(model)
        return AutocastCheck(speedup=speedup, loss_error=0.0, grad_cosine=1.0)
    monkeypatch.setattr(precision, "check_autocast", check)
    return checked


def test_when_bfloat16_is_measured_slow_auto_picks_float32_everywhere(assets, tmp_path, monkeypatch,
                                                                      user_cache):
    """As on an AVX2-only CPU: the trainer's three choices, the text encoder's and the sampling
    dtype are float32, the training step is not even timed in bfloat16, and nothing of this
    imagined CPU is remembered. Measured fast, the same settings give bfloat16 everywhere."""
    from homediff.pipeline import HomeDiffPipeline
    from tiny_components import tiny_pipeline_folder

    folder = tiny_pipeline_folder(tmp_path / "pipe")
    config = auto_config(assets)
    checked = autocast_checked(monkeypatch, FAST)
    with measuring(SLOW):
        trainer = Trainer(config, tmp_path / "slow")
        pipe = HomeDiffPipeline.from_pretrained(folder)
        sampling = pipe.sampling_dtype("auto")
    assert (trainer.precision.autocast, trainer.precision.muon, trainer.precision.text) == (
        None, "float32", "float32")
    assert trainer.text_encoder.model.dtype == torch.float32 and sampling == torch.float32
    assert checked == [] and not user_cache.exists()
    with measuring(FAST):
        trainer = Trainer(config, tmp_path / "fast")
        sampling = HomeDiffPipeline.from_pretrained(folder).sampling_dtype("auto")
    assert (trainer.precision.autocast, trainer.precision.muon, trainer.precision.text) == (
        "bfloat16", "bfloat16", "bfloat16")
    assert trainer.text_encoder.model.dtype == torch.bfloat16 and sampling == torch.bfloat16
    assert len(checked) == 1


def test_the_choices_are_made_without_a_trainer_as_a_run_makes_them(assets, tmp_path, monkeypatch):
    """``choose_precisions(config, device)`` builds the parts itself and chooses what the trainer
    of that config chooses, whichever way the measurements fall."""
    from homediff.training.precisions import choose_precisions

    config = auto_config(assets)
    autocast_checked(monkeypatch, FAST)
    for speed, name in ((SLOW, "slow"), (FAST, "fast")):
        with measuring(speed):
            alone = choose_precisions(config, torch.device("cpu"))
            trainer = Trainer(config, tmp_path / name)
        assert alone == trainer.precision, name
    assert alone.autocast == "bfloat16" and alone.muon == "bfloat16"


def test_trainer_records_its_choices_and_a_resume_reuses_them(assets, tmp_path, monkeypatch):
    """Chosen bfloat16 everywhere when the run began; resumed on the same machine where bfloat16 now
    measures slow, it keeps the checkpoint's choices (each one differs from what it would measure)."""
    config = auto_config(assets)
    autocast_checked(monkeypatch, FAST)
    built = []
    with measuring(FAST):
        first = Trainer(config, tmp_path, max_steps=2, builders=Builders(
            optimizer=lambda *args: built.append(build_optimizer(*args)) or built[-1]))
    chosen = first.precision
    assert (chosen.autocast, chosen.muon, chosen.text) == ("bfloat16",) * 3
    assert first.text_encoder.model.dtype == torch.bfloat16
    first.run()
    assert built[0].ns_dtype == torch.bfloat16

    monkeypatch.setattr(precision, "check_autocast", never)
    with measuring(SLOW):
        resumed = Trainer(config, tmp_path, resume="latest")
    assert resumed.precision == chosen
    assert resumed.text_encoder.model.dtype == torch.bfloat16


def attention_measured(speedups: dict):
    """bfloat16 products measured fast; the matmul attention path's speedup by dtype as given."""
    return measured_with(lambda shape, device: FAST,
                         lambda layers, dtype, device: speedups[str(dtype).removeprefix("torch.")])


def test_the_attention_path_is_chosen_per_dtype_before_the_autocast_step_and_reused(assets, tmp_path,
                                                                                    monkeypatch):
    """The matmul path where measured faster: in bfloat16 only here, which the autocast step is
    timed with; recorded, and reused on resume where it now measures slower. Where bfloat16 products
    are slow, attention is not even timed in bfloat16."""
    config = auto_config(assets)
    checked = autocast_checked(monkeypatch, FAST)
    with attention_measured({"float32": 1.0, "bfloat16": 3.0}):
        first = Trainer(config, tmp_path / "run", max_steps=2)
    assert first.precision.attention == ("bfloat16",)
    assert checked[0].matmul_attention_dtypes == {torch.bfloat16}
    assert first.unwrapped.matmul_attention_dtypes == {torch.bfloat16}
    first.run()
    with attention_measured({"float32": 1.0, "bfloat16": 1.0}):
        resumed = Trainer(config, tmp_path / "run", resume="latest")
    assert resumed.precision == first.precision
    assert resumed.unwrapped.matmul_attention_dtypes == {torch.bfloat16}

    timed = []

    def attention_speedup(layers, dtype, device):
        timed.append(dtype)
        return 3.0
    with measured_with(lambda shape, device: SLOW, attention_speedup):
        slow = Trainer(config, tmp_path / "slow")
    assert timed == [torch.float32] and slow.precision.autocast is None
    assert slow.precision.attention == ("float32",)
    assert slow.unwrapped.matmul_attention_dtypes == {torch.float32}


def test_a_resume_on_another_machine_measures_again(assets, tmp_path, monkeypatch):
    config = auto_config(assets)
    autocast_checked(monkeypatch, FAST)
    with measuring(FAST):
        Trainer(config, tmp_path, max_steps=2).run()
    monkeypatch.setattr(precision, "machine_key", lambda device: "cpu:another")
    with measuring(SLOW):
        resumed = Trainer(config, tmp_path, resume="latest")
    assert resumed.precision.machine == "cpu:another"
    assert (resumed.precision.autocast, resumed.precision.muon, resumed.precision.text) == (
        None, "float32", "float32")


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
