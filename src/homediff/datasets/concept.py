"""A small fine-tuning set that teaches a new word: the images whose caption names a concept, with
the concept's word replaced by a new one, beside a sample of other images under their own captions
(prior preservation, so that the rest of what a model knows is still trained on).

    build_concept_set("data/emoji/train", "data/zorp", word="zorp", match="cat")

writes ``OUT/R_WORD/`` (the matched images, each caption with ``match`` replaced by ``word``,
repeated ``R`` times per epoch in the kohya way) and ``OUT/1_prior/`` (``prior`` other images), and
``OUT/concept.json`` naming which source images the concept is. Files are copied, not linked.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

from homediff.data.folder import scan_folder
from homediff.errors import HomediffError


def build_concept_set(source: str | Path, out: str | Path, word: str, match: str, prior: int = 48,
                      repeats: int = 4, seed: int = 0) -> dict:
    """Build the set (see the module docstring); returns counts and the concept's source images."""
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise HomediffError(f"{out}: not empty; give a new folder")
    pattern = re.compile(rf"\b{re.escape(match)}\b", re.IGNORECASE)
    entries = [e for e in scan_folder(source, cache=False) if e.caption]
    captions = {e.image: (source / e.caption).read_text(encoding="utf-8").strip() for e in entries}
    concept = [e for e in entries if pattern.search(captions[e.image])]
    others = [e for e in entries if not pattern.search(captions[e.image])]
    if not concept:
        raise HomediffError(f"{source}: no caption mentions {match!r}")
    random.Random(seed).shuffle(others)
    folders = {f"{repeats}_{word}": concept, "1_prior": others[:prior]}
    for folder, chosen in folders.items():
        (out / folder).mkdir(parents=True)
        for index, entry in enumerate(chosen):
            image = source / entry.image
            shutil.copyfile(image, out / folder / f"{index:04d}{image.suffix.lower()}")
            caption = captions[entry.image]
            if folder != "1_prior":
                caption = pattern.sub(word, caption)
            (out / folder / f"{index:04d}.txt").write_text(caption, encoding="utf-8")
    record = {"word": word, "match": match, "concept": [e.image for e in concept],
              "concept_images": len(concept), "prior_images": len(folders["1_prior"]), "repeats": repeats}
    (out / "concept.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record
