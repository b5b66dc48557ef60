"""``homediff doctor``: the documented keys with values of the right types; no timing assertions."""

import json
import subprocess
import sys

import pytest
import torch
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff import precision
from homediff.app.cli import main
from homediff.app.cli.doctor import lines
from homediff.app.doctor import EXTRAS, _time_in_processes, remembered_precisions
from homediff.models.attention import choose_matmul_dtypes
from homediff.training.timing import time_steps
from homediff.precision import DTYPES


@pytest.fixture(scope="module")
def found() -> dict:
    result = subprocess.run([sys.executable, "-m", "homediff", "doctor", "--json",
                             "--no-demo-estimate"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _rates_ok(gflops: dict) -> None:
    assert set(gflops) == {"float32", "bfloat16"}
    assert gflops["float32"] > 0
    assert gflops["bfloat16"] is None or gflops["bfloat16"] > 0


def test_doctor_json_has_the_documented_keys(found):
    assert set(found) == {"homediff", "python", "torch", "cpu", "gpus", "precision",
                          "remembered_precision", "extras", "cairo", "demo"}
    assert isinstance(found["homediff"], str) and isinstance(found["python"], str)
    assert isinstance(found["torch"]["version"], str)
    assert found["torch"]["cuda"] is None or isinstance(found["torch"]["cuda"], str)
    assert isinstance(found["torch"]["cuda_available"], bool)
    cpu = found["cpu"]
    assert isinstance(cpu["name"], str) and isinstance(cpu["capability"], str)
    assert cpu["isa_limit"] is None or isinstance(cpu["isa_limit"], str)
    assert cpu["cores"] >= 1 and cpu["threads"] >= 1
    _rates_ok(cpu["gflops"])
    assert isinstance(found["gpus"], list)
    for gpu in found["gpus"]:
        assert isinstance(gpu["name"], str) and gpu["memory_gib"] > 0
        assert isinstance(gpu["bf16"], bool)
        _rates_ok(gpu["gflops"])
    assert isinstance(found["cairo"]["loads"], bool) and isinstance(found["cairo"]["detail"], str)
    assert found["demo"] is None  # --no-demo-estimate
    memory = found["remembered_precision"]
    assert isinstance(memory["folder"], str) and isinstance(memory["entries"], list)
    if found["precision"].get("device") == "cpu":  # the auto choices were measured, and remembered
        assert any(entry["current"] and entry["speedups"] for entry in memory["entries"])


def test_doctor_extras_name_an_install_hint(found):
    assert set(found["extras"]) == set(EXTRAS)
    for module, extra in found["extras"].items():
        assert isinstance(extra["importable"], bool)
        assert extra["install"].startswith("pip install ")
        if extra["extra"]:
            assert f"homediff[{extra['extra']}]" in extra["install"]
        else:
            assert extra["package"] in extra["install"]
        assert (extra["error"] is None) == extra["importable"], module


def test_doctor_chosen_precisions_are_dtype_names(found):
    chosen = found["precision"]
    assert "error" not in chosen, chosen.get("error")
    assert chosen["device"] in ("cpu", "cuda")
    for key in ("text_encoder", "muon", "mixed_precision"):
        assert chosen[key] in DTYPES, key
    assert set(chosen["matmul_attention"]) <= {"float32", chosen["mixed_precision"]}


def test_doctor_report_reads(found):
    text = "\n".join(lines(found))
    assert found["cpu"]["capability"] in text and "not timed (--no-demo-estimate)" in text
    demo = {"minutes": 15.0, "processes": 2, "threads_per_process": 1, "seconds_per_step": 0.5,
            "steps": 1800, "timed_steps": 8, "warmup_steps": 3, "overrides": [],
            "precision": {"muon": "float32", "mixed_precision": "float32", "text_encoder": "float32"}}
    text = "\n".join(lines({**found, "demo": demo}))
    assert "about 1,800 steps in 15 minutes" in text and "2 processes of 1 thread" in text


def test_demo_timing_runs_in_one_and_in_two_processes(tmp_path):
    config = tiny_config(square_folder(tmp_path / "sq"), text_encoder_folder(tmp_path / "te"),
                         optimizer={"name": "muon"})
    single = time_steps(config, steps=3, warmup=1)
    double, threads = _time_in_processes(config, 2, steps=3, warmup=1)
    for timed in (single, double):
        assert timed["seconds_per_step"] > 0
        assert all(name in DTYPES for name in timed["precision"].values())
    assert threads >= 1


def test_doctor_shows_and_clears_the_remembered_precisions(found, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "matmul", lambda device, m, k, n: lambda dtype: None)
    precision.choose_matmul_dtype("auto", "cpu", (2048, 1024, 3072), "sampling")
    memory = remembered_precisions()
    assert memory["folder"] == str(tmp_path / "homediff" / "precision")
    [entry] = memory["entries"]
    assert entry["current"] and list(entry["speedups"]) == ["256x256x256"]
    assert entry["torch"] == torch.__version__ and entry["machine"] == precision.machine_key("cpu")
    text = "\n".join(lines({**found, "remembered_precision": memory}))
    assert f"remembered bfloat16 speed here: 256x256x256 {entry['speedups']['256x256x256']:.2g}× (in" in text
    choose_matmul_dtypes((((2, 2, 16, 8), 3),), [torch.float32], "cpu")
    text = "\n".join(lines({**found, "remembered_precision": remembered_precisions()}))
    threads = torch.get_num_threads()
    assert (f"remembered bfloat16 speed here: 256x256x256 {entry['speedups']['256x256x256']:.2g}×; "
            f"matmul attention over SDPA: 3×2×2×16×8 float32 {threads} threads ") in text
    assert main(["doctor", "--clear-precision-cache"]) == 0
    assert f"forgot 1 file(s) of remembered precision measurements in {memory['folder']}" in (
        capsys.readouterr().out)
    assert remembered_precisions()["entries"] == []
    emptied = {**found, "remembered_precision": remembered_precisions()}
    assert "remembered bfloat16 speed here: nothing measured yet" in "\n".join(lines(emptied))
