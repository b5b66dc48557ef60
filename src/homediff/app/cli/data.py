"""``homediff data``: pack a folder into shards, check a dataset, build the emoji, shapes or scenes
set."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def register(commands) -> None:
    data = commands.add_parser("data", help="prepare and check image-caption datasets")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    _register_input(actions)
    _register_builders(actions)


def _register_input(actions) -> None:
    """Commands on a user's data: pack it into shards, check every sample."""
    pack = actions.add_parser("pack", help="write a folder dataset as WebDataset tar shards")
    pack.add_argument("folder", type=Path, help="images with same-stem .txt captions")
    pack.add_argument("out", type=Path, help="folder for shard-000000.tar, ...")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard (1000)")
    pack.add_argument("--seed", type=int, default=0, help="seed of the sample order (0)")
    pack.set_defaults(run=run_pack)

    check = actions.add_parser("check", help="decode every sample and list every problem")
    check.add_argument("dir", type=Path, help="a folder dataset, or a folder of .tar shards")
    check.add_argument("--size", type=int, help="crop size to check against (smaller: upscaled)")
    check.add_argument("--min-size", type=int, default=0, help="skip images whose short side is "
                       "smaller (default 0: upscale them)")
    check.add_argument("--max-pixels", type=int, help="refuse larger images (default 8192²)")
    check.add_argument("--max-aspect", type=float,
                       help="refuse images whose long side is more than this many times the short "
                            "one (default 8)")
    check.add_argument("--allow-outside-links", action="store_true",
                       help="follow links that lead out of the folder, to files and into folders")
    check.add_argument("--caption-extension", default=".txt",
                       help="the caption files' extension (default .txt; kohya's .caption too)")
    check.add_argument("--skip-missing-captions", action="store_true",
                       help="count images without a caption file as unusable")
    check.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="processes (default: all cores)")
    check.add_argument("--summary", action="store_true", help="print only the counts")
    check.set_defaults(run=run_check)


def _register_builders(actions) -> None:
    """Commands that build the built-in data sets (``homediff.datasets``)."""
    emoji = actions.add_parser("emoji", help="build the built-in emoji dataset (OpenMoji, offline)")
    emoji.add_argument("out", type=Path, help="new folder for train/, heldout/ and split.json")
    emoji.add_argument("--size", type=int, default=64, help="image side in pixels (64)")
    emoji.add_argument("--scenes", type=int, default=0,
                       help="also build this many multi-emoji scenes with positional captions")
    emoji.add_argument("--scene-aspect", type=float, default=2.0,
                       help="long/short side ratio of the scenes (2.0)")
    emoji.add_argument("--seed", type=int, default=0, help="seed of the scenes (0)")
    emoji.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="processes (default: all cores)")
    emoji.set_defaults(run=run_emoji)

    concept = actions.add_parser(
        "concept", help="a small set that teaches a new word for a concept (for fine-tuning)",
        description="Copy the images whose caption mentions MATCH into OUT/R_WORD with MATCH replaced "
                    "by WORD, beside a sample of other images (OUT/1_prior) under their own captions.")
    concept.add_argument("source", type=Path, help="a captioned image folder, e.g. data/emoji/train")
    concept.add_argument("out", type=Path, help="new folder")
    concept.add_argument("--word", default="zorp", help="the new word (default zorp)")
    concept.add_argument("--match", default="cat", help="the concept's word in the captions (default cat)")
    concept.add_argument("--prior", type=int, default=48, help="other images kept (default 48)")
    concept.add_argument("--repeats", type=int, default=4, help="repeats of the concept per epoch (4)")
    concept.set_defaults(run=run_concept)

    shapes = actions.add_parser("shapes", help="build a synthetic set of coloured-shape scenes")
    shapes.add_argument("out", type=Path, help="new folder for train/, heldout/ and split.json")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels (64)")
    shapes.add_argument("--count", type=int, default=10000, help="training scenes (10000)")
    shapes.add_argument("--heldout", type=int, help="held-out scenes (default count/20, >= 50)")
    shapes.add_argument("--seed", type=int, default=0, help="seed of the scenes (0)")
    shapes.set_defaults(run=run_shapes)

    scenes = actions.add_parser("scenes", help="build a synthetic set of wide and tall scenes of "
                                "coloured shapes (for the shifted square crop and camera control)")
    scenes.add_argument("out", type=Path, help="new folder for train/, heldout/ and split.json")
    scenes.add_argument("--size", type=int, default=64, help="short side in pixels (64)")
    scenes.add_argument("--count", type=int, default=10000, help="training scenes (10000)")
    scenes.add_argument("--heldout", type=int, help="held-out scenes (default count/20, >= 50)")
    scenes.add_argument("--seed", type=int, default=0, help="seed of the scenes (0)")
    scenes.add_argument("--aspects", help="W:H=SHARE,... (default 1:1, 3:2, 2:3, 2:1 and 1:2, a "
                        "fifth each; the long side at most twice the short)")
    scenes.set_defaults(run=run_scenes)


def run_pack(args) -> int:
    from homediff.data.shards import pack_folder

    started = time.perf_counter()
    paths, written = pack_folder(args.folder, args.out, args.shard_size, args.seed)
    print(f"wrote {written} samples in {len(paths)} shards to {args.out} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0


def run_check(args) -> int:
    from homediff.data.check import check_folder, check_shards
    from homediff.data.shards import dataset_kind
    from homediff.data.transform import DataConfig

    options = {"min_size": args.min_size, "caption_extension": args.caption_extension,
               "allow_outside_links": args.allow_outside_links,
               "missing_caption": "skip" if args.skip_missing_captions else "empty"}
    for key in ("max_pixels", "max_aspect"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    config = DataConfig(**options)
    if dataset_kind(args.dir) == "shards":
        report = check_shards(args.dir, config, args.size)
    else:
        report = check_folder(args.dir, config, args.size, args.workers)
    if not args.summary:
        for finding in sorted(report.findings, key=lambda f: (f.path, f.kind)):
            what = "SKIPPED" if finding.skipped else "fixed"
            print(f"{finding.path}: {what}: {finding.kind}: {finding.detail}")
    skipped = report.samples - report.usable
    print(f"{report.samples} samples: {report.usable} usable, {skipped} skipped, "
          f"{len(report.findings)} problems")
    for kind, count in sorted(report.counts().items()):
        print(f"  {kind}: {count}")
    if report.warning:
        print(f"WARNING: {report.warning}; training on this folder stops until then", file=sys.stderr)
    return 0 if report.usable else 1


def run_emoji(args) -> int:
    from homediff.datasets.emoji import build_emoji_dataset

    summary = build_emoji_dataset(args.out, args.size, args.scenes, args.scene_aspect, args.seed,
                                  args.workers)
    print(f"emoji set in {args.out} ({summary.pop('seconds')} s): " +
          ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in summary.items()))
    print(f"train on {args.out / 'train'}; the held-out split is in {args.out / 'split.json'}")
    return 0


def run_concept(args) -> int:
    from homediff.datasets.concept import build_concept_set

    record = build_concept_set(args.source, args.out, args.word, args.match, args.prior, args.repeats)
    print(f"{record['concept_images']} images of {args.match!r} as {args.word!r} (x{args.repeats}) and "
          f"{record['prior_images']} others in {args.out}")
    return 0


def run_shapes(args) -> int:
    from homediff.datasets.shapes import build_shapes_dataset

    summary = build_shapes_dataset(args.out, args.size, args.count, args.heldout, args.seed)
    print(f"shapes set in {args.out} ({summary['seconds']} s): {summary['train']} training and "
          f"{summary['heldout']} held-out scenes")
    print(f"train on {args.out / 'train'}; the held-out split is in {args.out / 'split.json'}")
    return 0


def run_scenes(args) -> int:
    from homediff.datasets.scenes import build_scenes_dataset, parse_aspects

    aspects = parse_aspects(args.aspects) if args.aspects else None
    summary = build_scenes_dataset(args.out, args.size, args.count, args.heldout, args.seed, aspects)
    print(f"scenes set in {args.out} ({summary['seconds']} s): {summary['train']} training and "
          f"{summary['heldout']} held-out scenes")
    print(f"train on {args.out / 'train'}; the held-out split is in {args.out / 'split.json'}")
    return 0
