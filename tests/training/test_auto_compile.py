"""``train.compile = "auto"``: compile when the run's time left pays for it, keep it when measured
faster, remember the measurement (``training.compiling``)."""

import pytest
import torch
from torch._inductor.utils import fresh_cache
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.errors import ConfigError
from homediff.training import compiling
from homediff.training.compiling import COMPILED_STEPS, EAGER_STEPS, WARMUP_STEPS, AutoCompile
from homediff.training.config import TrainSection
from homediff.training.loop import Trainer

DECIDES_AT = WARMUP_STEPS + EAGER_STEPS + 1  # the step_done call that decides whether to compile


def _probe(said: list[str], key: str = "model") -> AutoCompile:
    return AutoCompile((key,), torch.device("cpu"), agree=float, say=said.append)


def _feed(probe: AutoCompile, step_seconds: list[float], seconds_left: float = 1e4) -> list:
    """step_done once per entry, the clock advancing by that entry; the actions returned."""
    now, actions = 0.0, []
    for seconds in step_seconds:
        now += seconds
        actions.append(probe.step_done(now, lambda step: seconds_left))
    return actions


def test_compiles_when_the_time_left_pays_and_keeps_faster_steps():
    said = []
    probe = _probe(said)
    eager = [5.0] * WARMUP_STEPS + [1.0] * (DECIDES_AT - WARMUP_STEPS)
    actions = _feed(probe, eager + [31.0] + [0.5] * COMPILED_STEPS)
    assert actions[DECIDES_AT - 1] == "compile"
    assert [a for a in actions if a] == ["compile"]  # kept: no switch back
    assert probe.decision == "compiled" and probe.phase == "done"
    assert probe.eager_seconds == 1.0 and probe.compile_seconds == 30.0  # 31 s less one step
    assert "2.00×" in said[-1] and "compiling took 30 s" in said[-1]
    # a later run of the same model here expects what this one measured
    assert _probe([])._remembered() == compiling.Measurement(saving=0.5, compile_seconds=30.0)


def test_reverts_slower_compiled_steps_and_does_not_try_again():
    probe = _probe([], key="slow")
    actions = _feed(probe, [1.0] * DECIDES_AT + [21.0] + [1.02] * COMPILED_STEPS)
    assert [a for a in actions if a] == ["compile", "eager"] and probe.decision == "eager"
    said = []
    again = _probe(said, key="slow")  # remembered: compiled steps were slower here
    assert [a for a in _feed(again, [1.0] * (DECIDES_AT + 5)) if a] == []
    assert again.decision == "eager" and "measured here before" in said[-1]


def test_a_short_run_does_not_compile():
    said = []
    probe = _probe(said, key="short")
    # 60 s left would save 0.15 · 60 = 9 s, less than the expected 60 s compile
    assert [a for a in _feed(probe, [1.0] * (DECIDES_AT + 3), seconds_left=60.0) if a] == []
    assert probe.decision == "eager" and "less than the 60 s a compile takes" in said[-1]


def test_a_non_finite_compiled_loss_goes_back_to_eager():
    probe = _probe([], key="nan")
    _feed(probe, [1.0] * DECIDES_AT + [20.0])
    assert probe.phase == "timing" and probe.failed() == "eager" and probe.decision == "eager"
    assert _probe([], key="nan")._remembered().saving < 0  # never tried again here
    assert _probe([], key="other").failed() is None  # eager steps: nothing to switch


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
    # eagerly, compiled, and eagerly again, and its losses stay those of one continuous run
    monkeypatch.setattr(compiling, "PRIOR_COMPILE_SECONDS", 0.0)
    monkeypatch.setattr(compiling, "MIN_SPEEDUP", float("inf"))
    steps = DECIDES_AT + COMPILED_STEPS + 2
    stages = [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": steps, "tread_rate": 0.5}]
    config = tiny_config(*assets, stages=stages, optimizer={"name": "adamw"})
    trainer = Trainer(config, tmp_path / "run")
    compiled = []
    with fresh_cache(dir=str(tmp_path)):
        trainer.run(callback=lambda progress, batch: compiled.append(
            isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)))
    assert compiled == ([False] * DECIDES_AT + [True] * (COMPILED_STEPS + 1)
                        + [False] * (steps - DECIDES_AT - COMPILED_STEPS - 1))
    assert trainer.compiler.decision == "eager"
    losses = [loss for _, loss in trainer.progress.losses]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
