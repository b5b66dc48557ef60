"""What "auto" precision chooses and costs on each class of machine this CPU can stand in for.

    python benchmarks/portability.py [--classes native avx2 avx512] [--rounds 1]

Each class runs the doctor's measurement (``homediff.app.doctor``) in a subprocess with the class's
environment: the matrix-product rates, then the packaged ``tiny-emoji`` recipe timed in the demo's
layout (two processes of one thread on a CPU with two cores or more) with its "auto" precisions,
and, in the same run, with Muon's Newton-Schulz iteration forced to bfloat16 (the old default;
the other precisions kept as "auto" chose them). Classes:

* ``native``: this CPU as it is;
* ``avx2``: oneDNN and ATen limited to AVX2, as on a laptop without AVX-512, where bfloat16
  matrix products are emulated;
* ``avx512``: limited to AVX-512 without its bfloat16 instructions (``AVX512_CORE``).

It prints one Markdown table, with this command at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CLASSES = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"},
}
LABELS = {"native": "native", "avx2": "AVX2 laptop (emulated)",
          "avx512": "AVX-512 without bf16 (emulated)"}
OLD_MUON = "optimizer.muon_dtype=bfloat16"


def measure(out: Path, rounds: int, data: str) -> None:
    """One class's measurement (run in its environment): writes a JSON record to ``out``."""
    from homediff.app.doctor import cpu_info, demo_estimate

    cpu = cpu_info()
    auto, old = [], []
    for _ in range(rounds):  # alternated, so that both see the same load on a shared machine
        auto.append(demo_estimate(data=data))
        kept = auto[-1]["precision"]
        mixed = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}[kept["mixed_precision"]]
        old.append(demo_estimate(data=data, overrides=[
            OLD_MUON, f"train.mixed_precision={mixed}",
            f"text_encoder.options.dtype={kept['text_encoder']}"]))
    out.write_text(json.dumps({"cpu": cpu, "auto": auto, "old": old}))


def run_class(name: str, rounds: int, data: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           **CLASSES[name]}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "record.json"
        subprocess.run([sys.executable, __file__, "--measure", str(out), "--rounds", str(rounds),
                        "--data", data], env=env, check=True)
        return json.loads(out.read_text())


def row(name: str, record: dict) -> str:
    cpu, auto = record["cpu"], record["auto"]
    chosen = auto[0]["precision"]
    seconds = statistics.median(r["seconds_per_step"] for r in auto)
    old = statistics.median(r["seconds_per_step"] for r in record["old"])
    minutes = auto[0]["minutes"]
    rates = cpu["gflops"]
    return (f"| {LABELS[name]} | {cpu['capability']} | {rates['float32']:.0f} | {rates['bfloat16']:.0f} "
            f"| {chosen['text_encoder']} / {chosen['muon']} / {chosen['mixed_precision']} "
            f"| {seconds:.3f} | {old:.3f} | {int(minutes * 60 / seconds):,} | "
            f"{int(minutes * 60 / old):,} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--classes", nargs="+", choices=list(CLASSES), default=list(CLASSES))
    parser.add_argument("--rounds", type=int, default=1, help="alternated timings per variant")
    parser.add_argument("--data", default="data/emoji", help="the emoji set (built if missing)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.measure, args.rounds, args.data)
        return 0
    print("# python benchmarks/portability.py " + " ".join(sys.argv[1:] if argv is None else argv))
    records = {name: run_class(name, args.rounds, args.data) for name in args.classes}
    first = next(iter(records.values()))
    demo = first["auto"][0]
    print(f"# {first['cpu']['name']}, {first['cpu']['cores']} cores; matrix products of 512² with "
          f"{first['cpu']['threads']} threads; the tiny-emoji recipe in {demo['processes']} "
          f"process(es) of {demo['threads_per_process']} thread(s), {demo['timed_steps']} steps "
          f"timed after {demo['warmup_steps']}, median of {args.rounds} round(s)")
    print(f"| class | CPU capability | fp32 GFLOP/s | bf16 GFLOP/s | auto: text / Muon / mixed "
          f"| s/step auto | s/step Muon bf16 | demo steps in {demo['minutes']:g} min, auto "
          "| … Muon bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, record in records.items():
        print(row(name, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
