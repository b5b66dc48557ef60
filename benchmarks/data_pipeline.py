"""How fast does the data pipeline turn files into training samples?

Per core: decode + shifted square crop + position map + caption processing, one sample at a time in
one process with one torch thread (what one loader worker does), for the emoji PNGs at 64 px and for
JPEGs of 512×512 and 512×768 cropped to 256. Then the DataLoader with 2 workers, and the folder
index on many files. Targets (issue 3): ≥ 1,000 images/s per core for 64-px emoji, ≥ 150 for
512-px JPEGs cropped to 256.

    python benchmarks/data_pipeline.py [--images 400] [--index-files 100000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from homediff.data import CaptionConfig, DataConfig, FolderDataset, make_loader, scan_folder

TAGS = ("1girl, solo, long hair, smile, looking at viewer, outdoors, sky, cloud, tree, dress, "
        "holding, flower, standing, day, blue eyes, brown hair, white dress, grass, sunlight")


def photo_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour fields plus fine grain: JPEG sizes close to real photos (~60-90 KB at 512²)."""
    y, x = np.mgrid[0:height, 0:width] / 512
    image = np.stack([np.sin(rng.uniform(2, 9) * x + rng.uniform(2, 9) * y + rng.uniform(0, 6))
                      for _ in range(3)], -1) * 90 + 128
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_jpegs(folder: Path, count: int, height: int, width: int) -> float:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    sizes = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(photo_like(height, width, rng)).save(path, quality=90)
        path.with_suffix(".txt").write_text(TAGS)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def make_emoji(folder: Path, count: int) -> str:
    """The first ``count`` emoji PNGs, or synthetic 64-px PNGs if the emoji extra is missing."""
    try:
        from homediff.datasets import emoji
        chosen = emoji.list_emoji()[:count]
        emoji.build_emoji_dataset(folder, size=64, workers=2, emojis=chosen)
        return "OpenMoji PNG"
    except Exception as err:  # the emoji extra or libcairo2 missing
        print(f"(emoji set unavailable: {err}; using synthetic PNGs)", file=sys.stderr)
    rng = np.random.default_rng(0)
    (folder / "train").mkdir(parents=True)
    for i in range(count):
        image = np.full((64, 64, 3), 255, np.uint8)
        image[16:48, 16:48] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(folder / "train" / f"{i:05d}.png")
        (folder / "train" / f"{i:05d}.txt").write_text("a coloured square")
    return "synthetic PNG"


def per_core(dataset: FolderDataset, rounds: int = 3) -> float:
    """Best of ``rounds`` passes over the dataset, images/s, one thread."""
    best = 0.0
    for epoch in range(rounds):
        started = time.perf_counter()
        for index in range(len(dataset)):
            dataset[epoch * len(dataset) + index]
        best = max(best, len(dataset) / (time.perf_counter() - started))
    return best


def loader_rate(dataset: FolderDataset, workers: int, batch: int, epochs: int = 3) -> float:
    loader = make_loader(dataset, batch_size=batch, workers=workers)
    for _ in loader:  # a first epoch starts the (persistent) workers outside the timing
        pass
    started, images = time.perf_counter(), 0
    for _ in range(epochs):
        for item in loader:
            images += len(item["key"])
    return images / (time.perf_counter() - started)


def index_times(folder: Path, files: int) -> tuple[float, float]:
    for d in range(10):
        sub = folder / f"{d}_part"
        sub.mkdir(parents=True)
        for i in range(files // 10):
            (sub / f"{i:06d}.jpg").touch()
            (sub / f"{i:06d}.txt").touch()
    started = time.perf_counter()
    assert len(scan_folder(folder, folder.parent / "cache")) == files // 10 * 10
    cold = time.perf_counter() - started
    started = time.perf_counter()
    scan_folder(folder, folder.parent / "cache")
    return cold, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="images per JPEG case")
    parser.add_argument("--emoji", type=int, default=1000, help="emoji PNGs")
    parser.add_argument("--index-files", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    captions = CaptionConfig(tag_dropout=0.1, group_dropout=0.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kind = make_emoji(tmp / "emoji", args.emoji)
        cases = [(f"{kind} 64 → 64", tmp / "emoji" / "train", 64)]
        for height, width in ((512, 512), (512, 768)):
            folder = tmp / f"jpeg{height}x{width}"
            kib = make_jpegs(folder, args.images, height, width)
            cases.append((f"JPEG {height}×{width} ({kib:.0f} KiB) → 256", folder, 256))
        for name, folder, size in cases:
            dataset = FolderDataset(folder, DataConfig(size=size, flip=0.5, captions=captions),
                                    cache=tmp / "cache")
            core = per_core(dataset)
            batch = 64 if size == 64 else 16
            rows.append((name, core, 1000 / core, loader_rate(dataset, 2, batch)))
        cold, cached = index_times(tmp / "index", args.index_files)
    print(f"\n{'case':36s} {'img/s/core':>11s} {'ms/img':>7s} {'loader 2 workers img/s':>23s}")
    for name, core, ms, loader in rows:
        print(f"{name:36s} {core:11,.0f} {ms:7.2f} {loader:23,.0f}")
    print(f"\nfolder index of {args.index_files:,} images (+ captions, 10 repeat folders): "
          f"{cold:.2f} s to scan, {cached:.2f} s from the cache")
    print("\ncommand: python benchmarks/data_pipeline.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
