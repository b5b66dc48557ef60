"""The plan's memory checked: predicted against measured peak memory of training on this machine.

    python benchmarks/memory_check.py                       # every row below
    python benchmarks/memory_check.py --only tiny           # rows whose name contains "tiny"
    python benchmarks/memory_check.py --set train.mixed_precision=bf16   # a change for every row
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/memory_check.py --only "256² mb1 ckpt"

Rows: xut-base (configs/hdm-xut-base.toml, its real encoder shapes) at 256² and 512², micro-batch
1 and 2, with and without gradient checkpointing; the tiny recipes (tiny-emoji, tiny-shapes) at
micro-batch 1. Each row is one stage rehearsed for ``--steps`` optimiser steps in a child process
(``homediff.planning.rehearsal``): the measurement is that process's peak resident memory (CUDA's
most allocated on a GPU) before its checkpoint is written; the prediction is
``homediff.planning.memory.estimate_memory`` with the precisions the trainer chose. The target is
within ±25 %. Prints a Markdown table and the exact command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from homediff.app.demo import recipe
from homediff.planning.rehearsal import rehearse
from homediff.training.config import load_config

GIB = 2 ** 30
TARGET = 0.25


def rows() -> list[tuple[str, str, list[str], str, int]]:
    """(name, recipe, overrides, stage, micro-batch) of every row."""
    found = []
    for resolution in (256, 512):
        for micro in (1, 2):
            for checkpointing in (True, False):
                name = f"xut-base {resolution}² mb{micro} {'ckpt' if checkpointing else 'no ckpt'}"
                found.append((name, "hdm-xut-base",
                              [f"train.gradient_checkpointing={str(checkpointing).lower()}"],
                              str(resolution), micro))
    found += [("tiny-emoji 32² mb1", "tiny-emoji", [], "32", 1),
              ("tiny-shapes 24² mb1", "tiny-shapes", [], "24", 1)]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", help="the rows whose name contains this text")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per row (default 2: "
                        "the second runs with the optimiser's state in place)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config change for every row, e.g. train.mixed_precision=bf16")
    args = parser.parse_args(argv)
    chosen = [row for row in rows() if not args.only or args.only in row[0]]
    lines = []
    for name, config_name, overrides, stage, micro in chosen:
        started = time.perf_counter()
        config = load_config(recipe(config_name), overrides + args.overrides)
        (result,) = rehearse(config, steps=args.steps, stages=[stage], micro_batch=micro)
        error = result.memory_error
        precision = result.precision
        lines.append(f"| {name} | {precision['autocast'] or 'float32'} | {precision['text']} | "
                     f"{result.planned['peak_bytes'] / GIB:.2f} | {result.measured['peak_bytes'] / GIB:.2f} | "
                     f"{error:+.1%} | {'yes' if abs(error) <= TARGET else 'NO'} | "
                     f"{time.perf_counter() - started:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    isa = " ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
                   if k in os.environ)
    print(f"# {isa + ' ' if isa else ''}python benchmarks/memory_check.py "
          + " ".join(sys.argv[1:] if argv is None else argv))
    print("| row | autocast | text encoder | predicted GiB | measured GiB | Δ | within ±25 % | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())
