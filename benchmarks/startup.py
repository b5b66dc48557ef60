"""What "auto" precision costs before anything is drawn, and what else a launch of generate costs.

    python benchmarks/startup.py [--model FOLDER] [--launches 3] [--full]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/startup.py   # an AVX2-only CPU

First, one "auto" decision at the released model's sizes (a 2048 × 1024 × 3072 product): measured
on its bounded probe with nothing remembered, then remembered; with ``--full`` also the product
timed at full size, as decisions were made before the probe was bounded. Then the probe timed 8
times on one thread (as it runs) and on all of torch's threads. Then the seconds from launching
``homediff generate`` to its first denoising step (its sampling bar appears), the first launch with
an empty user cache and the later ones with the measurements it remembered; without ``--model``,
the demo's model (the tiny-emoji recipe, random weights) is saved in a temporary folder and used.
Last, where a launch's time goes before it draws: the seconds it spends importing each package.
Each launch runs in the environment given (threads, ISA limits).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from homediff import precision

SHAPE = (2048, 1024, 3072)


def probe_ratios(threads: int, tries: int = 8) -> list[float]:
    """bfloat16's measured speedup on the bounded probe of ``SHAPE``, ``tries`` times, on
    ``threads`` threads: one, as "auto" times it, or all of torch's, to see why it does."""
    bucket = precision.probe_shape(SHAPE)
    return [precision.measure_speedup(bucket, "cpu", threads) for _ in range(tries)]


def demo_model(folder: Path) -> Path:
    """The tiny-emoji recipe's pipeline with its initial (random) weights, saved in ``folder``."""
    from homediff.app.demo import recipe
    from homediff.pipeline import HomeDiffPipeline
    from homediff.training.components import build_autoencoder, build_model, build_text_encoder
    from homediff.training.config import load_config

    config = load_config(recipe("tiny-emoji"))
    device = torch.device("cpu")
    text = build_text_encoder(config, device)
    autoencoder = build_autoencoder(config, device)
    model = build_model(config, text, autoencoder, device)
    text.config = config.text_encoder.options  # saved with "auto", as a trained demo's is
    pipe = HomeDiffPipeline(model, text, autoencoder, sample_size=config.stages[0].resolution)
    pipe.save_pretrained(folder)
    return folder


def decision_seconds(full: bool) -> list[tuple[str, float, float]]:
    """(how, seconds, measured speedup) of one decision at ``SHAPE``, from an empty user cache."""
    rows = []
    precision.forget()
    for how in ("bounded probe, nothing remembered", "remembered"):
        start = time.perf_counter()
        speedup = precision.speedup_at(SHAPE, "cpu")
        rows.append((how, time.perf_counter() - start, speedup))
    if full:
        start = time.perf_counter()
        speedup = precision.bf16_speedup(precision.matmul("cpu", *SHAPE), torch.device("cpu"))
        rows.append(("full size (before)", time.perf_counter() - start, speedup))
    return rows


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) a process has used so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_step_seconds(model: Path, out: Path, cache: Path) -> tuple[float | None, float | None, float]:
    """Seconds from launching ``homediff generate`` to its sampling bar (None: never seen), the CPU
    seconds it used until then (on a shared machine the wall time also holds the waits for a core),
    and the seconds to its exit."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    command = [sys.executable, "-m", "homediff", "generate", "red apple", "--model", str(model),
               "--out", str(out), "--overwrite", "--steps", "16", "--seed", "0"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    drawing, cpu, seen = None, None, b""
    while chunk := process.stderr.read1(4096):
        seen += chunk
        if drawing is None and re.search(rb"\| 0/\d+ ", seen):
            drawing, cpu = time.perf_counter() - start, cpu_seconds(process.pid)
    if process.wait() != 0:
        sys.exit(f"homediff generate failed:\n{seen.decode(errors='replace')[-2000:]}")
    return drawing, cpu, time.perf_counter() - start


def import_seconds(model: Path, out: Path, cache: Path) -> dict[str, float]:
    """Seconds one launch of ``homediff generate`` spends importing each package (``python -X
    importtime``: each module's own time, summed by its top-level package), most first."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    command = [sys.executable, "-X", "importtime", "-m", "homediff", "generate", "red apple",
               "--model", str(model), "--out", str(out), "--overwrite", "--steps", "1", "--seed", "0"]
    lines = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stderr
    seconds: dict[str, float] = {}
    for own, _, name in re.findall(r"^import time:\s+(\d+) \|\s+(\d+) \| (.+)$", lines, re.M):
        package = name.strip().split(".")[0]
        seconds[package] = seconds.get(package, 0.0) + int(own) / 1e6
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a pipeline folder (default: the demo's, random)")
    parser.add_argument("--launches", type=int, default=3, help="launches of generate (default 3)")
    parser.add_argument("--full", action="store_true", help="also time the product at full size")
    args = parser.parse_args()
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    print(f"# {precision.cpu_name()}, capability {torch.backends.cpu.get_cpu_capability()}"
          + (f" (ONEDNN_MAX_CPU_ISA={limit})" if limit else "") + f", {torch.get_num_threads()} threads")
    print(f"# python benchmarks/startup.py {' '.join(sys.argv[1:])}".rstrip())
    with tempfile.TemporaryDirectory() as folder:
        os.environ["XDG_CACHE_HOME"] = str(Path(folder) / "cache")  # never the user's own
        shape = "×".join(map(str, SHAPE))
        print(f"\n| one decision at {shape} | seconds | bf16/fp32 speed |\n|---|---|---|")
        for how, seconds, speedup in decision_seconds(args.full):
            print(f"| {how} | {seconds:.3f} | {speedup:.3g}× |", flush=True)
        print("\n| the probe timed on | bf16/fp32 speed, 8 tries |\n|---|---|")
        for threads in sorted({1, torch.get_num_threads()}):
            ratios = ", ".join(f"{ratio:.2g}×" for ratio in probe_ratios(threads))
            print(f"| {threads} thread(s) | {ratios} |", flush=True)
        model = args.model or demo_model(Path(folder) / "model")
        print("\n| generate launch | user cache | seconds to the first step | CPU seconds until then "
              "| seconds to exit |\n|---|---|---|---|---|")
        for launch in range(args.launches):
            drawing, cpu, total = first_step_seconds(model, Path(folder) / "out.png",
                                                     Path(folder) / "launches")
            shown = [f"{value:.2f}" if value is not None else "-" for value in (drawing, cpu, total)]
            cache = "empty" if launch == 0 else "remembered"
            print(f"| {launch + 1} | {cache} | {' | '.join(shown)} |", flush=True)
        imports = import_seconds(model, Path(folder) / "out.png", Path(folder) / "launches")
        print(f"\n| imported by one launch | seconds |\n|---|---|\n| all | {sum(imports.values()):.2f} |")
        for package, seconds in list(imports.items())[:6]:
            print(f"| {package} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
