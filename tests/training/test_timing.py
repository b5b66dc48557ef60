import itertools
from types import SimpleNamespace

import pytest
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.training import timing
from homediff.training.timing import time_steps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_step_is_timed_over_all_its_micro_batches(tmp_path, monkeypatch, accumulate):
    """The clock reads 0.05 s more at each micro-batch: an optimiser step of ``accumulate``
    micro-batches takes 0.05·accumulate s, whatever the machine."""
    stage = {"resolution": 8, "batch_size": 2, "steps": 10, "grad_accum": accumulate}
    config = tiny_config(square_folder(tmp_path / "sq"), text_encoder_folder(tmp_path / "te"),
                         stages=[stage], train={"sample_prompts": ["a red square"]})
    ticks = itertools.count()
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: 0.05 * next(ticks)))
    timed = time_steps(config, steps=3, warmup=1)
    assert timed["seconds_per_step"] == pytest.approx(0.05 * accumulate)
    assert config.train.sample_prompts == ["a red square"]  # the caller's config is left alone
    assert set(timed["precision"]) == {"muon", "mixed_precision", "text_encoder"}


def test_too_few_steps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2 steps"):
        time_steps(None, steps=1, warmup=1)
