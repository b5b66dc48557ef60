"""``homediff eval``: score a trained pipeline folder, offline.

``homediff eval MODEL_DIR --data DIR`` measures prompt fidelity (caption retrieval, seen and
held-out, next to ceiling and chance) and FD-EffNetLite0 on any data folder with ``train/`` and
``heldout/``; ``homediff eval shapes MODEL_DIR --data DIR`` reads composition back from images of a
model trained on ``homediff data shapes`` scenes; ``homediff eval camera MODEL_DIR (--prompts FILE |
--data DIR)`` measures how camera edits move the view. ``shapes`` and ``camera`` are first
positional words, not sub-commands, so the plain form needs none (a model folder named "shapes" is
given as ./shapes).

``--inception-weights FILE`` and ``--clip PATH`` add FID and the CLIP score to the fidelity
evaluation, from weight files the user has; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from homediff.evaluation.settings import CameraSettings, EvalSettings

DEFAULTS = EvalSettings()
CAMERA = CameraSettings()
KINDS = ("shapes", "camera")
USAGE = "homediff eval [shapes|camera] MODEL_DIR --data DIR [options]"


def register(commands) -> None:
    ev = commands.add_parser(
        "eval", help="score a model: prompt fidelity, FD-EffNetLite0, shapes composition, or "
        "camera control", usage=USAGE, description="Generate images and score them, offline. "
        "Writes NAME.json, NAME.md and PNGs (NAME: eval, shapes or camera) and prints the table.")
    ev.add_argument("target", nargs="+", metavar="[shapes|camera] MODEL_DIR",
                    help="a saved pipeline folder, after the word 'shapes' for the composition "
                         "check or 'camera' for camera control")
    ev.add_argument("--data", metavar="DIR", type=Path,
                    help="data folder with train/ and heldout/ (homediff data emoji|shapes|scenes); "
                         "camera: its training captions are the prompts unless --prompts is given")
    ev.add_argument("--prompts", metavar="FILE", type=Path,
                    help="camera: prompts, one per line (default: --count captions of --data)")
    ev.add_argument("--seeds", metavar="N", type=int, default=CAMERA.seeds,
                    help=f"camera: seeds per prompt, at least 2 ({CAMERA.seeds})")
    ev.add_argument("--count", metavar="N", type=int, default=CAMERA.prompts,
                    help=f"camera: training captions drawn as prompts ({CAMERA.prompts})")
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
    ev.add_argument("--inception-weights", metavar="FILE", type=Path,
                    help="measure FID with this local file of FID's Inception network: "
                    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or StyleGAN's "
                    "inception-2015-12-05.pt")
    ev.add_argument("--clip", metavar="PATH", type=Path,
                    help="measure the CLIP score with this local CLIP: a Hugging Face CLIP "
                    "folder, or an open_clip .bin/.safetensors with vocab.json and merges.txt "
                    "beside it")
    ev.add_argument("--no-cache", action="store_true", help="recompute reference features")
    ev.add_argument("--device", help="cpu, cuda, … (default: cuda if available)")
    ev.set_defaults(run=run)


def _target(words: list[str]) -> tuple[str, Path]:
    from homediff.errors import HomediffError

    if len(words) == 2 and words[0] in KINDS:
        return words[0], Path(words[1])
    if len(words) == 1 and not (words[0] in KINDS and not Path(words[0]).is_dir()):
        return "fidelity", Path(words[0])
    raise HomediffError("expected MODEL_DIR, 'shapes MODEL_DIR' or 'camera MODEL_DIR', got "
                        f"{' '.join(words)!r}; "
                        f"usage: {USAGE}")


def run(args) -> int:
    from homediff.errors import HomediffError
    from homediff.evaluation import evaluate_fidelity, evaluate_shapes, markdown
    from homediff.pipeline import HomeDiffPipeline
    from homediff.precision import resolve_device

    kind, model_dir = _target(args.target)
    if kind == "camera":
        return run_camera(args, model_dir)
    if args.data is None:
        raise HomediffError(f"homediff eval {'shapes ' if kind == 'shapes' else ''}needs --data DIR "
                            "(a folder with train/ and heldout/)")
    if kind == "shapes" and (args.inception_weights or args.clip):
        raise HomediffError("--inception-weights and --clip belong to the fidelity evaluation; "
                            "`homediff eval shapes` takes neither")
    settings = EvalSettings(per_caption=args.per_caption, seen=args.seen, heldout=args.heldout,
                            distractors=args.distractors, steps=args.steps, cfg=args.cfg,
                            seed=args.seed, size=args.size, batch=args.batch,
                            feature_size=args.feature_size, cache=not args.no_cache,
                            progress=True,
                            inception_weights=args.inception_weights and str(args.inception_weights),
                            clip=args.clip and str(args.clip))
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


def camera_prompts(args) -> list[str]:
    """The prompts of ``eval camera``: the lines of --prompts, else --count captions of --data."""
    from homediff.errors import HomediffError
    from homediff.evaluation import read_split, spread_captions

    if args.prompts is not None:
        try:
            lines = args.prompts.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise HomediffError(f"{args.prompts}: cannot read the prompts ({err})") from err
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise HomediffError(f"{args.prompts}: no prompts (one per line)")
        return prompts
    if args.data is None:
        raise HomediffError("homediff eval camera needs --prompts FILE (one prompt per line) or "
                            "--data DIR (its training captions)")
    return spread_captions(read_split(args.data)[0], args.count)


def run_camera(args, model_dir: Path) -> int:
    from homediff.evaluation.camera import camera_markdown, evaluate_camera
    from homediff.pipeline import HomeDiffPipeline
    from homediff.precision import resolve_device

    settings = CameraSettings(prompts=args.count, seeds=args.seeds, steps=args.steps, cfg=args.cfg,
                              seed=args.seed, size=args.size, batch=args.batch, progress=True)
    settings.check()
    prompts = camera_prompts(args)
    pipe = HomeDiffPipeline.from_pretrained(model_dir).to(device=resolve_device(args.device))
    out = args.out or model_dir.resolve().parent
    report = evaluate_camera(pipe, prompts, settings, out=out)
    print(camera_markdown(report))
    print(f"{report['seconds']['total']} s; report: {out / 'camera.md'}, {out / 'camera.json'}, "
          f"{out / 'camera.png'}")
    return 0
