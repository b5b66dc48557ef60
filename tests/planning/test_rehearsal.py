"""The rehearsal end to end on a tiny config, its stand-in encoders and random stream, and its
command-line checks."""

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import text_encoder_folder, tiny_config

from homediff.app.cli import main
from homediff.errors import ConfigError
from homediff.planning import standins
from homediff.planning.rehearsal import decided, select_stages
from homediff.training.checkpoint import Checkpoint
from homediff.training.config import to_toml


def test_a_tiny_config_rehearses_end_to_end_and_reports_consistent_numbers(tmp_path, capsys):
    config = tiny_config(tmp_path / "no-data", text_encoder_folder(tmp_path / "bert"),
                         stages=[{"name": "small", "resolution": 8, "batch_size": 4, "grad_accum": 2,
                                  "steps": 10, "tread_rate": 0.5}])
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(config), encoding="utf-8")
    out = tmp_path / "rehearsal"
    assert main(["train", str(path), "--rehearse", "--steps", "2", "--json", "--out", str(out)]) == 0
    (stage,) = json.loads(capsys.readouterr().out)["stages"]
    assert (stage["name"], stage["micro_batch"], stage["grad_accum"], stage["steps"]) == ("small", 1, 2, 2)
    assert stage["device"] == "cpu" and any("micro-batch 4 → 1" in c for c in stage["changes"])
    measured, planned = stage["measured"], stage["planned"]
    folder = out / "stage-0" / "checkpoints" / "step-00000002"
    Checkpoint.load(folder)  # whole, as the rehearsal read it back
    assert measured["checkpoint_bytes"] == sum(f.stat().st_size for f in folder.iterdir())
    assert measured["checkpoint_bytes"] > planned["checkpoint_bytes"] > 0  # files add JSON and random states
    assert 0 < measured["save_seconds"] + measured["load_seconds"] < measured["wall_seconds"]
    assert measured["seconds_per_sample"] > 0 and planned["seconds_per_sample"] > 0
    assert planned["samples"] == 10 * 4 * 2
    assert math.isclose(measured["projected_hours"], 80 * measured["seconds_per_sample"] / 3600)
    assert measured["peak_with_checkpoint_bytes"] >= measured["peak_bytes"] > 0
    assert math.isclose(stage["memory_error"], measured["peak_bytes"] / planned["peak_bytes"] - 1)
    assert sum(stage["memory_parts"].values()) > 0 and planned["peak_bytes"] > stage["memory_parts"]["runtime"]


def test_stages_are_chosen_by_name_or_resolution(tmp_path):
    config = tiny_config(tmp_path, text_encoder_folder(tmp_path / "bert"),
                         stages=[{"name": "low", "resolution": 8, "steps": 1},
                                 {"name": "high", "resolution": 16, "steps": 1}])
    assert select_stages(config, None) == [0, 1]
    assert select_stages(config, ["high", "8", "16px"]) == [1, 0]
    with pytest.raises(ConfigError, match="no such stage.*low, high"):
        select_stages(config, ["32"])


def test_later_stages_keep_the_precisions_the_first_measured(tmp_path):
    config = tiny_config(tmp_path, tmp_path, train={"mixed_precision": "auto"},
                         text_encoder={"name": "x", "options": {"dtype": "auto"}},
                         optimizer={"name": "muon"})
    kept, fixed = decided(config, {"autocast": None, "text": "bfloat16", "muon": "float32"})
    assert (kept.train.mixed_precision, kept.text_encoder.options.dtype, kept.optimizer.muon_dtype) == (
        "no", "bfloat16", "float32")
    assert len(fixed) == 3 and config.train.mixed_precision == "auto"  # the given config is left as it was
    again, none = decided(kept, {"autocast": "bfloat16", "text": "float32", "muon": "bfloat16"})
    assert again == kept and none == []


def test_rehearsal_flags_need_rehearse(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(tiny_config(tmp_path, tmp_path)), encoding="utf-8")
    assert main(["train", str(path), "--steps", "3"]) == 2
    assert "--steps go with --rehearse" in capsys.readouterr().err
    assert main(["train", str(path), "--rehearse", "--resume"]) == 2


def test_the_byte_tokenizer_pads_and_cuts_to_the_text_length():
    tokenizer = standins.byte_tokenizer()
    ids = tokenizer(["ab", "héllo wörld"], padding="max_length", truncation=True, max_length=6)["input_ids"]
    pad = tokenizer.pad_token_id
    assert ids[0] == [*tokenizer("ab")["input_ids"], pad, pad, pad, pad] and len(ids[1]) == 6
    assert pad == 256 and len(tokenizer("é")["input_ids"]) == 2  # one token per UTF-8 byte


def test_the_random_stream_gives_trainer_batches_of_the_stage(one_thread):
    stream = standins.RandomStream(resolution=16, batch_size=3, text_length=40, seed=0)
    first, second = (next(stream.epoch(0, 0)) for _ in range(2))
    assert first["image"].shape == (3, 3, 16, 16) and first["pos"].shape == (3, 256, 2)
    assert -1 <= first["image"].min() and first["image"].max() <= 1
    assert torch.equal(first["image"], second["image"])  # an epoch repeats from its seed
    assert all(0 < len(c) <= 38 for c in first["caption"]) and len(set(first["key"])) == 3
    assert first["aspect"].abs().max() <= math.log(2) + 1e-6
    for pos, aspect in zip(first["pos"], first["aspect"]):
        height, width = pos.amax(0) - pos.amin(0)  # a square crop spans part of the long side
        if aspect > 0.01:
            assert width < height
        elif aspect < -0.01:
            assert height < width


def test_an_encoder_not_installed_is_built_from_its_config(tmp_path):
    folder = tmp_path / "qwen-config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 300,
        "max_position_embeddings": 64}))
    config = tiny_config(tmp_path, Path(folder))
    encoder = standins.text_encoder(config, torch.device("cpu"))
    states = encoder.encode(["a cat", "a much longer caption than six bytes"])
    assert states.shape == (2, 6, 32) and torch.isfinite(states).all()
