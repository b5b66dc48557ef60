"""``homediff eval``: score a trained pipeline folder, offline.

``homediff eval MODEL_DIR --data DIR`` measures prompt fidelity (caption retrieval, seen and
held-out, next to ceiling and chance) and FD-EffNetLite0 on any data folder with ``train/`` and
``heldout/``; ``homediff eval shapes MODEL_DIR --data DIR`` reads composition back from images of a
model trained on ``homediff data shapes`` scenes. ``shapes`` is a first positional word, not a
sub-command, so the plain form needs none (a model folder named "shapes" is given as ./shapes).
"""

from __future__ import annotations

from pathlib import Path

from homediff.evaluation.settings import EvalSettings

DEFAULTS = EvalSettings()
USAGE = "homediff eval [shapes] MODEL_DIR --data DIR [options]"


def register(commands) -> None:
    ev = commands.add_parser(
        "eval", help="score a model: prompt fidelity, FD-EffNetLite0, or shapes composition",
        usage=USAGE, description="Generate images for evaluation captions and score them, "
        "offline. Writes NAME.json, NAME.md and PNGs (NAME: eval, or shapes) and prints the table.")
    ev.add_argument("target", nargs="+", metavar="[shapes] MODEL_DIR",
                    help="a saved pipeline folder, after the word 'shapes' for the composition check")
    ev.add_argument("--data", metavar="DIR", required=True, type=Path,
                    help="data folder with train/ and heldout/ (homediff data emoji|shapes)")
    ev.add_argument("--out", metavar="DIR", type=Path,
                    help="report folder (default: the folder holding MODEL_DIR)")
    options = [("per-caption", "K", "images per caption"),
               ("seen", "N", "seen captions drawn from train/"),
               ("heldout", "N", "held-out captions, at most"),
               ("distractors", "N", "gallery captions added per held-out caption, nearest in words"),
               ("steps", "S", "sampling steps"), ("cfg", "C", "guidance scale"),
               ("seed", "N", "seed of captions and noise"),
               ("batch", "N", "images per sampling call"),
               ("feature-size", "PX", "EfficientNet input side (smaller is faster, not comparable)")]
    for name, metavar, text in options:
        default = getattr(DEFAULTS, name.replace("-", "_"))
        ev.add_argument(f"--{name}", metavar=metavar, type=type(default), default=default,
                        help=f"{text} ({default})")
    ev.add_argument("--size", metavar="PX", type=int, help="image side (default: the model's)")
    ev.add_argument("--no-cache", action="store_true", help="recompute reference features")
    ev.add_argument("--device", help="cpu, cuda, … (default: cuda if available)")
    ev.set_defaults(run=run)


def _target(words: list[str]) -> tuple[str, Path]:
    from homediff.errors import HomediffError

    if len(words) == 2 and words[0] == "shapes":
        return "shapes", Path(words[1])
    if len(words) == 1 and not (words[0] == "shapes" and not Path(words[0]).is_dir()):
        return "fidelity", Path(words[0])
    raise HomediffError(f"expected MODEL_DIR or 'shapes MODEL_DIR', got {' '.join(words)!r}; "
                        f"usage: {USAGE}")


def run(args) -> int:
    from homediff.evaluation import evaluate_fidelity, evaluate_shapes, markdown
    from homediff.pipeline import HomeDiffPipeline
    from homediff.precision import resolve_device

    kind, model_dir = _target(args.target)
    settings = EvalSettings(per_caption=args.per_caption, seen=args.seen, heldout=args.heldout,
                            distractors=args.distractors, steps=args.steps, cfg=args.cfg,
                            seed=args.seed, size=args.size, batch=args.batch,
                            feature_size=args.feature_size, cache=not args.no_cache,
                            progress=True)
    settings.check()
    device = resolve_device(args.device)
    pipe = HomeDiffPipeline.from_pretrained(model_dir).to(device=device)
    out = args.out or model_dir.resolve().parent
    evaluate = evaluate_shapes if kind == "shapes" else evaluate_fidelity
    report = evaluate(pipe, args.data, settings, out=out)
    name = "shapes" if kind == "shapes" else "eval"
    print(markdown(report))
    print(f"{report['seconds']['total']} s; report: {out / (name + '.md')}, {out / (name + '.json')}")
    return 0
