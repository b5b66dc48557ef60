"""LoRA against full fine-tuning of the demo model on the same new word, at equal steps.

    homediff data concept data/emoji/train data/zorp --word zorp --match cat
    python benchmarks/finetune.py --base runs/demo/model --data data/zorp --steps 300

Each variant trains in its own process from configs/finetune-lora-emoji.toml (full fine-tuning:
the same with ``lora.rank = 0`` and its own learning rate), which reports its trainable parameters,
seconds per step and peak resident memory. Then the base and both results generate, with the same
seeds, every concept caption ("grinning zorp") and 24 captions of the prior images:

- concept: the cosine similarity of EfficientNet-Lite0 features of the concept captions' images to
  the mean feature of the concept's own images (the cat emoji), before and after;
- forgetting: for the other captions, 1 − cosine between each image's features before and after
  (0: unchanged), and the RMS pixel change.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "finetune-lora-emoji.toml"


def train(variant: str, base: str, data: str, steps: int, lr: float, out: Path) -> dict:
    """One fine-tune in this process; returns its measurements."""
    from homediff.training.config import load_config
    from homediff.training.loop import Trainer

    overrides = [f"init.from={base}", f"dataset.path={data}", f"stages.0.steps={steps}",
                 f"stages.0.lr={lr}", "train.sample_prompts=[]", f"train.checkpoint_every={steps}"]
    if variant == "full":
        overrides.append("lora.rank=0")
    trainer = Trainer(load_config(RECIPE, overrides), out)
    stamps: list[float] = []
    trainer.run(callback=lambda progress, batch: stamps.append(time.perf_counter()))
    warm = min(10, steps // 4)
    return {"variant": variant, "model": str(out / "model"),
            "trainable": sum(p.numel() for p in trainer.unwrapped.parameters() if p.requires_grad),
            "seconds_per_step": (stamps[-1] - stamps[warm]) / (len(stamps) - 1 - warm),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "final_loss": sum(x for _, x in trainer.progress.losses[-20:]) / 20}


def images(pipe, captions: list[str], seeds: list[int]) -> torch.Tensor:
    out = []
    for caption in captions:
        for seed in seeds:
            out.append(pipe(caption, num_inference_steps=24, guidance_scale=3.0, output_type="pt",
                            generator=torch.Generator().manual_seed(seed)).images[0])
    return torch.stack(out) * 2 - 1


def measure(base: str, results: list[dict], data: Path) -> list[dict]:
    from homediff.encoders import effnet
    from homediff.evaluation.common import load_image
    from homediff.pipeline import HomeDiffPipeline

    record = json.loads((data / "concept.json").read_text())
    concept_dir = next(p for p in data.iterdir() if p.name.endswith(f"_{record['word']}"))
    concept = sorted(p.read_text().strip() for p in concept_dir.glob("*.txt"))
    others = sorted(p.read_text().strip() for p in (data / "1_prior").glob("*.txt"))[:24]
    base_pipe = HomeDiffPipeline.from_pretrained(base)
    size = base_pipe.sample_size
    references = torch.stack([load_image(p, size) for p in sorted(concept_dir.glob("*.png"))])
    target = torch.nn.functional.normalize(effnet.features(references).mean(0), dim=0)

    def evaluate(pipe):
        pipe.set_progress_bar_config(disable=True)
        new, old = images(pipe, concept, [0, 1]), images(pipe, others, [0])
        return new, old, effnet.features(new), effnet.features(old)

    before = evaluate(base_pipe)
    rows = []
    for result in [{"variant": "base"}, *results]:
        after = before if result["variant"] == "base" else evaluate(
            HomeDiffPipeline.from_pretrained(result["model"]))
        cosine = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)  # noqa: E731
        rows.append({**result,
                     "concept_similarity": cosine(after[2], target).mean().item(),
                     "others_feature_change": (1 - cosine(after[3], before[3])).mean().item(),
                     "others_pixel_rms_change": (after[1] - before[1]).square().mean().sqrt().item() / 2})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/demo/model")
    parser.add_argument("--data", type=Path, default=Path("data/zorp"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lora-lr", type=float, default=0.5)
    parser.add_argument("--full-lr", type=float, default=0.1)
    parser.add_argument("--train", choices=("lora", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train:  # a child: one variant, its measurements as JSON on the last line
        lr = args.lora_lr if args.train == "lora" else args.full_lr
        print(json.dumps(train(args.train, args.base, str(args.data), args.steps, lr, args.out)))
        return
    with tempfile.TemporaryDirectory() as work:
        results = []
        for variant in ("lora", "full"):
            child = subprocess.run([sys.executable, __file__, "--train", variant, "--base", args.base,
                                    "--data", str(args.data), "--steps", str(args.steps),
                                    "--lora-lr", str(args.lora_lr), "--full-lr", str(args.full_lr),
                                    "--out", str(Path(work) / variant)],
                                   capture_output=True, text=True, check=True)
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        rows = measure(args.base, results, args.data)
    print("| variant | trainable parameters | s/step | peak RSS GiB | loss (last 20) | concept "
          "similarity | others: feature change | others: pixel RMS change |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [f"{row.get('trainable', 0):,}", f"{row.get('seconds_per_step', 0):.3f}",
                 f"{row.get('peak_rss_gib', 0):.2f}", f"{row.get('final_loss', 0):.4f}",
                 f"{row['concept_similarity']:.4f}", f"{row['others_feature_change']:.4f}",
                 f"{row['others_pixel_rms_change']:.4f}"]
        print(f"| {row['variant']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
