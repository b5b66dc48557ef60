"""``homediff doctor``: this machine, the precisions homediff chooses on it, and what it can train."""

from __future__ import annotations

import json
from pathlib import Path


def register(commands) -> None:
    doctor = commands.add_parser(
        "doctor", help="check this machine: torch, CPU and GPUs, precisions, extras, demo speed",
        description="Reports torch and CUDA, the CPU and GPUs with their measured float32 and "
                    "bfloat16 matrix-product rates, the precisions the 'auto' settings choose "
                    "here and the measurements behind them (remembered per machine in the user "
                    "cache), which optional extras import, whether the system cairo library "
                    "loads, and how many steps `make demo` would train here (a timing of under a "
                    "minute).")
    doctor.add_argument("--json", action="store_true", help="print one JSON object instead")
    doctor.add_argument("--no-demo-estimate", dest="demo", action="store_false",
                        help="skip timing the demo's training steps")
    doctor.add_argument("--data", type=Path, default=Path("data/emoji"),
                        help="emoji set for the demo timing (built in a temporary folder if missing)")
    doctor.add_argument("--minutes", type=float, default=15.0, help="the demo's training budget")
    doctor.add_argument("--clear-precision-cache", action="store_true",
                        help="forget the remembered precision measurements (each is measured again "
                             "when next needed) and stop")
    doctor.set_defaults(run=run)


def run(args) -> int:
    from homediff.app.doctor import report

    if args.clear_precision_cache:
        from homediff import precision

        removed = precision.forget()
        print(f"forgot {removed} file(s) of remembered precision measurements in "
              f"{precision.memory_folder()}")
        return 0
    found = report(demo=args.demo, data=args.data, minutes=args.minutes)
    print(json.dumps(found, indent=1) if args.json else "\n".join(lines(found)))
    return 0


def _rates(gflops: dict) -> str:
    fp32, bf16 = gflops["float32"], gflops["bfloat16"]
    text = f"float32 {fp32:,.0f} GFLOP/s, bfloat16 "
    text += "n/a" if bf16 is None else f"{bf16:,.0f} GFLOP/s"
    return text + (f" ({bf16 / fp32:.2g}× float32)" if bf16 and fp32 else "")


def _remembered(memory: dict) -> str:
    """The remembered bfloat16/float32 speed ratios of this machine, by product (m×k×n), and the
    matmul attention path's over SDPA, by shape, dtype and threads."""
    current = [entry for entry in memory["entries"] if entry["current"]]
    here = [(name, ratio) for entry in current for name, ratio in entry["speedups"].items()]
    ratios = ", ".join(f"{name} {ratio:.2g}×" for name, ratio in here if not name.startswith("attention "))
    attention = ", ".join(f"{name.removeprefix('attention ')} {ratio:.2g}×" for name, ratio in here
                          if name.startswith("attention "))
    others = len(memory["entries"]) - len(current)
    return (f"bfloat16 speed here: {ratios or 'nothing measured yet'}"
            + (f"; matmul attention over SDPA: {attention}" if attention else "")
            + f" (in {memory['folder']}"
            + (f"; {others} file(s) of other machines or torch versions" if others else "")
            + "; --clear-precision-cache forgets them)")


def lines(found: dict) -> list[str]:
    """The readable report of ``homediff.app.doctor.report()``."""
    t, cpu = found["torch"], found["cpu"]
    cuda = (f"CUDA {t['cuda']}, " + ("available" if t["cuda_available"] else "no device")
            if t["cuda"] else "CPU build")
    limit = f", limited to {cpu['isa_limit']}" if cpu["isa_limit"] else ""
    out = [f"homediff {found['homediff']}, Python {found['python']}, torch {t['version']} ({cuda})",
           f"CPU        {cpu['name']}: capability {cpu['capability']}{limit}, {cpu['cores']} cores, "
           f"{cpu['threads']} threads",
           f"           matrix products: {_rates(cpu['gflops'])}"]
    for gpu in found["gpus"] or [None]:
        if gpu is None:
            out.append("GPU        none")
            continue
        out += [f"GPU {gpu['index']}      {gpu['name']}: {gpu['memory_gib']:.0f} GiB, compute "
                f"capability {gpu['capability']}",
                f"           matrix products: {_rates(gpu['gflops'])}"]
    p = found["precision"]
    out.append(f"auto       error: {p['error']}" if "error" in p else
               f"auto       on {p['device']}: text encoder {p['text_encoder']}, Muon {p['muon']}, "
               f"mixed precision {p['mixed_precision']}, matmul attention in "
               f"{', '.join(p['matmul_attention']) or 'none (SDPA)'}")
    out.append(f"remembered {_remembered(found['remembered_precision'])}")
    extras = found["extras"]
    present = [name for name, e in extras.items() if e["importable"]]
    missing = [f"{name} ({e['install']})" for name, e in extras.items() if not e["importable"]]
    out.append(f"extras     importable: {', '.join(present) or 'none'}")
    if missing:
        out.append(f"           missing: {'; '.join(missing)}")
    c = found["cairo"]
    out.append(f"cairo      {'loads' if c['loads'] else 'does not load'}: {c['detail']}"
               + (f"; install: {c['install']}" if c["install"] else ""))
    demo = found["demo"]
    if demo is None:
        out.append("make demo  not timed (--no-demo-estimate)")
    elif "error" in demo:
        out.append(f"make demo  could not be timed: {demo['error']}")
    else:
        layout = (f"{demo['processes']} processes of {demo['threads_per_process']} thread(s), as "
                  "the demo trains" if demo["processes"] > 1 else
                  f"one process of {demo['threads_per_process']} thread(s)")
        out.append(f"make demo  about {demo['steps']:,} steps in {demo['minutes']:g} minutes: "
                   f"{demo['seconds_per_step']:.3f} s per step in {layout} (timed over "
                   f"{demo['timed_steps']} steps after {demo['warmup_steps']})")
        chosen = demo["precision"]
        out.append(f"           its trainer chose: text encoder {chosen['text_encoder']}, Muon "
                   f"{chosen['muon']}, mixed precision {chosen['mixed_precision']}")
    return out
