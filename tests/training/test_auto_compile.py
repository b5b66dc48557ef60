"""``train.compile = "auto"``: compile when the run's time left pays for it, keep it when measured
faster, remember the measurement (``training.compiling``)."""

import pytest
import torch
from torch._inductor.utils import fresh_cache
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.errors import ConfigError
from homediff.training import compiling
from homediff.training.compiling import COMPARED_STEPS, EAGER_STEPS, WARMUP_STEPS, AutoCompile
from homediff.training.config import TrainSection
from homediff.training.loop import Trainer

DECIDES_AT = WARMUP_STEPS + EAGER_STEPS + 1  # the step_done call that decides whether to compile


def _probe(said: list[str], key: str = "model") -> AutoCompile:
    return AutoCompile((key,), torch.device("cpu"), agree=float, say=said.append)


def _simulate(probe: AutoCompile, eager: float, compiled: float, compile_seconds: float = 30.0,
              steps: int = 40, seconds_left: float = 1e4) -> tuple[list, list]:
    """Feed ``steps`` steps whose lengths follow the backbone the probe asked for (the first
    compiled step also compiles; the warm-up steps are slow); returns the actions and, per step,
    the backbone that ran it."""
    now, running, compiled_once, actions, ran = 0.0, "eager", False, [], []
    for step in range(steps):
        if step < WARMUP_STEPS:
            now += 5.0
        elif running == "compiled":
            now += compiled + (0.0 if compiled_once else compile_seconds)
            compiled_once = True
        else:
            now += eager
        ran.append(running)
        action = probe.step_done(now, lambda step_seconds: seconds_left)
        actions.append(action)
        running = action or running
    return actions, ran


def test_compiles_when_the_time_left_pays_and_keeps_faster_steps():
    said = []
    probe = _probe(said)
    actions, ran = _simulate(probe, eager=1.0, compiled=0.5)
    assert actions[DECIDES_AT - 1] == "compiled" and ran[DECIDES_AT] == "compiled"
    # after the compiling step the two backbones alternate, step by step, then compiled stays
    compared = ran[DECIDES_AT + 1:DECIDES_AT + 1 + 2 * COMPARED_STEPS]
    assert compared == ["eager", "compiled"] * COMPARED_STEPS
    assert set(ran[DECIDES_AT + 1 + 2 * COMPARED_STEPS:]) == {"compiled"}
    assert probe.decision == "compiled" and probe.phase == "done"
    assert probe.eager_seconds == 1.0 and probe.compile_seconds == 29.5  # less one eager step
    assert "2.00×" in said[-1] and "compiling took 30 s" in said[-1]
    # a later run of the same model here expects what this one measured
    assert _probe([])._remembered() == compiling.Measurement(saving=0.5, compile_seconds=29.5)


def test_reverts_slower_compiled_steps_and_does_not_try_again():
    probe = _probe([], key="slow")
    actions, ran = _simulate(probe, eager=1.0, compiled=1.02)
    assert probe.decision == "eager" and ran[-1] == "eager" and actions[-1] is None
    said = []
    again = _probe(said, key="slow")  # remembered: compiled steps were slower here
    actions, ran = _simulate(again, eager=1.0, compiled=0.5)
    assert set(ran) == {"eager"} and again.decision == "eager"
    assert "measured here before" in said[-1]


def test_a_short_run_does_not_compile():
    said = []
    probe = _probe(said, key="short")
    # 60 s left would save 0.15 · 60 = 9 s, less than the expected 60 s compile
    actions, ran = _simulate(probe, eager=1.0, compiled=0.5, seconds_left=60.0)
    assert set(ran) == {"eager"} and probe.decision == "eager"
    assert "less than the 60 s a compile takes" in said[-1]


def test_a_non_finite_compiled_loss_goes_back_to_eager():
    probe = _probe([], key="nan")
    _simulate(probe, eager=1.0, compiled=0.5, steps=DECIDES_AT + 2)
    assert probe.phase == "comparing" and probe.running == "compiled"
    assert probe.failed() == "eager" and probe.decision == "eager"
    assert _probe([], key="other").failed() is None  # eager steps: nothing to switch
    said = []
    again = _probe(said, key="nan")  # remembered: never tried again here, and the log says why
    assert again._remembered().failed
    _, ran = _simulate(again, eager=1.0, compiled=0.5)
    assert set(ran) == {"eager"} and again.decision == "eager"
    assert "torch.compile failed here before" in said[-1]


def test_kernels_for_a_restricted_instruction_set_are_cached_apart(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    compiling.separate_kernel_cache()  # unrestricted: inductor's own default
    assert "TORCHINDUCTOR_CACHE_DIR" not in compiling.os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    compiling.separate_kernel_cache()
    assert compiling.os.environ["TORCHINDUCTOR_CACHE_DIR"] == f"{default_cache_dir()}/aten-avx2"
    # inductor's default, written into the environment by inductor itself, is no choice
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    compiling.separate_kernel_cache()
    assert compiling.os.environ["TORCHINDUCTOR_CACHE_DIR"] == f"{default_cache_dir()}/aten-avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the user's choice stays
    compiling.separate_kernel_cache()
    assert compiling.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


def test_the_setting_takes_true_false_or_auto():
    assert TrainSection().compile == "auto"
    for value in (True, False, "auto"):
        assert TrainSection(compile=value).compile == value
    with pytest.raises(ConfigError, match="compile"):
        TrainSection(compile="always")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto-compile")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def test_the_trainer_switches_its_backbone_as_decided(assets, tmp_path, monkeypatch):
    # compile at once (nothing to pay), then find it too slow however fast it is: the run trains
    # eagerly, compiled, alternating, and eagerly again, its losses those of one continuous run
    monkeypatch.setattr(compiling, "PRIOR_COMPILE_SECONDS", 0.0)
    monkeypatch.setattr(compiling, "MIN_SPEEDUP", float("inf"))
    steps = DECIDES_AT + 1 + 2 * COMPARED_STEPS + 2
    stages = [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": steps, "tread_rate": 0.5}]
    config = tiny_config(*assets, stages=stages, optimizer={"name": "adamw"})
    trainer = Trainer(config, tmp_path / "run")
    compiled = []
    with fresh_cache(dir=str(tmp_path)):
        trainer.run(callback=lambda progress, batch: compiled.append(
            isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)))
    assert compiled == ([False] * DECIDES_AT + [True] + [False, True] * COMPARED_STEPS
                        + [False] * 2)
    assert trainer.compiler.decision == "eager"
    losses = [loss for _, loss in trainer.progress.losses]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))


def test_a_compile_error_is_remembered_and_its_step_redone_eagerly(assets, tmp_path, monkeypatch):
    """torch.compile's own error (here inductor's, as when its generated C++ does not compile) in
    the first compiled step: one process redoes that step eagerly and trains on; the failure is
    remembered, so the next run of the same configuration here does not compile at all."""
    from torch._inductor.exc import InductorError

    from homediff.training import loop

    class Broken(torch.nn.Module):
        def __init__(self, eager):
            super().__init__()
            self._orig_mod = eager

        def forward(self, *args, **kwargs):
            raise InductorError(RuntimeError("C++ compile error"), None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing remembered by other tests
    monkeypatch.setattr(loop, "compile_backbone", Broken)
    monkeypatch.setattr(compiling, "PRIOR_COMPILE_SECONDS", 0.0)
    steps = DECIDES_AT + 3
    stages = [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": steps, "tread_rate": 0.5}]
    config = tiny_config(*assets, stages=stages, optimizer={"name": "adamw"})
    trainer = Trainer(config, tmp_path / "run")
    said = []
    monkeypatch.setattr(trainer.monitor, "say", said.append)
    batches = []
    trainer.run(callback=lambda progress, batch: batches.append(progress.step))
    assert len(batches) == steps  # the failed step's batch was trained, not skipped for another
    assert not any("non-finite" in line for line in said)
    assert [step for step, _ in trainer.progress.losses] == list(range(1, steps + 1))
    assert trainer.compiler.decision == "eager" and not isinstance(trainer.model, Broken)
    assert any("torch.compile failed: InductorError: RuntimeError: C++ compile error" in line for line in said)

    def never(eager):
        raise AssertionError("a remembered failure must not be compiled again")
    monkeypatch.setattr(loop, "compile_backbone", never)
    again = Trainer(config, tmp_path / "again")
    again.run()
    assert again.compiler.decision == "eager" and len(again.progress.losses) == steps
