"""The demo recipe's variants at equal wall time: train, score both retrievals, tabulate.

    # one run: the tiny-emoji recipe with --set changes, trained for --minutes, then scored
    python benchmarks/recipe_ablation.py run --name align-1 --seed 0 --minutes 5 \
        --set train.align_weight=1.0
    # the table of every run in --out: mean over seeds, each seed's number, ± its standard error
    python benchmarks/recipe_ablation.py table

Each run trains in one process (threads from OMP_NUM_THREADS), so that two seeds run side by side
on two cores; the trainer fits its steps to the minutes, so a slower variant gets fewer steps.
Scores are those of ``homediff eval`` with its defaults (50 seen and 44 held-out captions, 2
images each): top-5 caption retrieval by EfficientNet features and by 16×16 pixels, seen captions
split into skin-tone variants and one-off objects.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from homediff.app.demo import recipe
from homediff.evaluation import EvalSettings, evaluate_fidelity
from homediff.pipeline import HomeDiffPipeline
from homediff.training.config import load_config
from homediff.training.loop import Trainer

COLUMNS = {"seen": ("seen", 4), "one-off": ("seen_one_off", 4), "variants": ("seen_variants", 4),
           "held-out": ("heldout", 4)}


def run(args) -> None:
    out = args.out / f"{args.name}-seed{args.seed}"
    config = load_config(recipe("tiny-emoji"), [f"dataset.path={args.data / 'train'}",
                                                f"train.seed={args.seed}", "train.sample_prompts=[]",
                                                *args.set])
    trainer = Trainer(config, out, time_budget=args.minutes * 60, overwrite=True)
    trainer.run()
    pipe = HomeDiffPipeline.from_pretrained(out / "model")
    pipe.set_progress_bar_config(disable=True)
    report = evaluate_fidelity(pipe, args.data, EvalSettings(), out=out)
    scores = {"steps": trainer.progress.step, "sets": args.set,
              "compile": trainer.compiler.decision if trainer.compiler else "off"}
    for kind, section in (("effnet", report), ("pixels", report["pixels"])):
        for column, (split, k) in COLUMNS.items():
            scores[f"{kind} {column}"] = (section[split]["topk"][k], section[split]["topk_se"][k])
    (out / "scores.json").write_text(json.dumps(scores, indent=1), encoding="utf-8")
    print(json.dumps(scores))


def table(args) -> None:
    runs: dict[str, list[dict]] = {}
    for path in sorted(args.out.glob("*-seed*/scores.json")):
        runs.setdefault(path.parent.name.rsplit("-seed", 1)[0], []).append(json.loads(path.read_text()))
    names = [f"{kind} {column}" for kind in ("effnet", "pixels") for column in COLUMNS]
    print("| variant | steps | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for variant, seeds in sorted(runs.items(), key=lambda item: item[0] != "recipe"):  # recipe first
        cells = [" / ".join(str(s["steps"]) for s in seeds)]
        for name in names:
            values = [100 * s[name][0] for s in seeds]
            spread = " / ".join(f"{v:.0f}" for v in values)
            error = statistics.mean(100 * s[name][1] for s in seeds)
            cells.append(f"**{statistics.mean(values):.1f}** ({spread}) ± {error:.0f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("--name", default="recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--set", action="append", default=[], help="a recipe change, KEY=VALUE")
    parser.add_argument("--data", type=Path, default=Path("data/emoji"))
    parser.add_argument("--out", type=Path, default=Path("runs/recipe-ablation"))
    args = parser.parse_args()
    (run if args.action == "run" else table)(args)


if __name__ == "__main__":
    main()
