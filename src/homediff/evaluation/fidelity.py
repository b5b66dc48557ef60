"""Prompt fidelity (``evaluate_fidelity``). The gallery holds the reference images (at most
``refs_per_caption`` per caption, first in file order) of the evaluation captions and of
distractors: for each held-out caption the ``distractors`` train captions sharing most words with it
(Jaccard on word sets; for emoji, the same emoji in other skin tones and others in the same tone),
so a held-out prompt scores only if the whole combination is right. All images are embedded by
``homediff.encoders.effnet.features``. A query's score for a gallery caption is its highest cosine
similarity to that caption's images; captions are ranked by score (ties favour the query's own) and
top-k accuracy is the share of queries whose own caption ranks within the first k; its standard
error counts each caption once (``topk_standard_error``).

Queries: generated images give the accuracy; the evaluation captions' references after a round trip
through the model's resolution (centre square resized with Pillow's antialiased bicubic as training
data is; the feature network scales it up like a generated image) give the ceiling; chance is
k / gallery captions. FD-EffNetLite0 is the Fréchet distance between Gaussians fitted to the
generated and the reference features of the evaluation captions (its round-trip value is the
ceiling). It depends on the sample sizes: compare runs only at equal settings, never with FID.

Standard metrics, from weight files the user supplies (``EvalSettings.inception_weights`` and
``clip``): FID is the same Fréchet distance on the same image sets with the features of FID's
Inception network (``homediff.evaluation.inception``); the CLIP score
(``homediff.evaluation.clip_score``) is that of the generated images with their prompts, its
ceiling that of the round-tripped references with their captions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from homediff.caching import MemoryCache, cache_key, tensor_file_cache, user_cache_dir
from homediff.encoders import effnet
from homediff.evaluation import inception
from homediff.evaluation.clip_score import load_clip
from homediff.evaluation.common import EvalSettings, generate, load_image, one_off_captions, select
from homediff.evaluation.metrics import (TOPK, caption_ranks, frechet_distance, topk_accuracy,
                                         topk_standard_error)
from homediff.evaluation.report import sample_rows, write_report

logger = logging.getLogger(__name__)

FD_NAME = "FD-EffNetLite0"
PIXEL_SIDE = 16  # the pixel retrieval's side: emoji and shapes stay recognisable at 16²


@dataclass
class FeatureNet:
    """A loaded feature network: ``extract`` maps a batch of images in [−1, 1] to (B, D) features;
    ``identity`` tells its features apart in the cache."""

    identity: tuple
    extract: Callable[[torch.Tensor], torch.Tensor]


def effnet_net(settings: EvalSettings, device) -> FeatureNet:
    model = effnet.load_effnet(device)
    return FeatureNet((settings.feature_size,),
                      lambda batch: effnet.features(batch, size=settings.feature_size, model=model))


def inception_net(path: str, device) -> FeatureNet:
    model = inception.load_inception(path, device)
    stat = Path(path).stat()
    return FeatureNet(("FID Inception", str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size),
                      lambda batch: inception.features(batch, model))


def embed(images: list[torch.Tensor], settings: EvalSettings, net: FeatureNet,
          what: str = "images") -> torch.Tensor:
    """Features of (3, H, W) images, batched by shape, in input order."""
    from tqdm.auto import tqdm

    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    batches = [indices[start:start + 32] for indices in groups.values()
               for start in range(0, len(indices), 32)]
    order, found = [], []
    for part in tqdm(batches, desc=f"embedding {what}", disable=not settings.progress):
        found.append(net.extract(torch.stack([images[i] for i in part])))
        order += part
    return torch.cat(found)[torch.tensor(order).argsort()]


def reference_features(paths: list[Path], size: int | None, settings: EvalSettings,
                       net: FeatureNet) -> torch.Tensor:
    """Features of reference images (round-tripped through ``size`` if given), cached on disk
    under ``user_cache_dir("features")``, keyed by paths, modification times, sizes, the network
    and settings."""
    stats = [(str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths]
    cache = tensor_file_cache(user_cache_dir("features")) if settings.cache else MemoryCache(0)
    key = cache_key("reference features", stats, size, *net.identity)
    found = cache.get(key)
    if found is None:
        found = embed([load_image(p, size) for p in paths], settings, net,
                      "references" if size is None else "round-tripped references")
        cache.put(key, found)
    return found


def _distances(generated: torch.Tensor, references: torch.Tensor, round_trip: torch.Tensor) -> dict:
    enough = min(len(generated), len(references)) >= 2
    return {"generated": frechet_distance(generated, references) if enough else None,
            "round_trip": frechet_distance(round_trip, references) if enough else None,
            "samples": [len(generated), len(references)]}


def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if len(values) else None


def pixel_net(side: int) -> FeatureNet:
    """Retrieval with no learned features: an image's features are its pixels downsampled to
    ``side``² (area averaging) less their mean, so that cosine similarity is the images' Pearson
    correlation at that size."""
    def extract(batch: torch.Tensor) -> torch.Tensor:
        flat = torch.nn.functional.interpolate(batch, size=(side, side), mode="area").flatten(1)
        return flat - flat.mean(1, keepdim=True)
    return FeatureNet(("pixels", side), extract)


def _picks(prompts: list[str], evaluated: list[tuple], split: set) -> tuple[list[int], list[int]]:
    """Which generated images, and which round-tripped references, belong to ``split``'s captions."""
    return ([i for i, c in enumerate(prompts) if c in split],
            [i for i, (c, _) in enumerate(evaluated) if c in split])


def _retrieval(generated, round_trip, gallery, gallery_captions: list[str], prompts: list[str],
               evaluated: list[tuple], splits: dict[str, set]) -> dict:
    """Top-k caption retrieval of each split's generated images (with its standard error) and of
    its round-tripped references (the ceiling), by one kind of feature."""
    ranks = caption_ranks(generated, prompts, gallery, gallery_captions)
    ceiling = caption_ranks(round_trip, [c for c, _ in evaluated], gallery, gallery_captions)
    found = {}
    for name, split in splits.items():
        pick, ref_pick = _picks(prompts, evaluated, split)
        found[name] = {"captions": len(split), "images": len(pick), "topk": topk_accuracy(ranks[pick]),
                       "topk_se": topk_standard_error(ranks[pick], [prompts[i] for i in pick]),
                       "ceiling": topk_accuracy(ceiling[ref_pick])}
    return found


def _fid(images: torch.Tensor, settings: EvalSettings, net, references) -> dict:
    """FID of the generated images against the references' Inception features (as they are, and
    at the model's resolution)."""
    generated = embed(list(images), settings, net, "generated images for FID")
    return {"weights": settings.inception_weights, **_distances(generated, *references)}


def _clip_score(clip, images: torch.Tensor, prompts: list[str], tiles: list[torch.Tensor],
                captions: list[str], picks: dict, weights: str) -> dict:
    """The CLIP score of each split's generated images with their prompts, beside the same for the
    reference images with their captions (the ceiling)."""
    scores, ref_scores = clip(images, prompts), clip(torch.stack(tiles), captions)
    return {"weights": weights} | {
        name: {"generated": _mean(scores[pick]), "ceiling": _mean(ref_scores[ref_pick])}
        for name, (pick, ref_pick) in picks.items()}


def evaluate_fidelity(pipe, data: str | Path, settings: EvalSettings | None = None,
                      out: str | Path | None = None) -> dict:
    """Prompt fidelity and FD-EffNetLite0 of a pipeline on a data folder, with FID and the CLIP
    score when their weights are given; writes the report (``write_report``) to ``out`` if given
    and returns it."""
    started = time.perf_counter()
    s = select(pipe, data, settings)
    settings, size, train, held = s.settings, s.size, s.train, s.held
    seen, heldout, distractors = s.seen, s.heldout, s.distractors
    net = effnet_net(settings, pipe.device)
    fid_net = (inception_net(settings.inception_weights, pipe.device)
               if settings.inception_weights else None)
    clip = load_clip(settings.clip, pipe.device) if settings.clip else None
    refs = {c: train[c][:settings.refs_per_caption] for c in seen + distractors}
    refs |= {c: held[c][:settings.refs_per_caption] for c in heldout}
    gallery_captions = [c for c, paths in refs.items() for _ in paths]
    gallery = reference_features([p for paths in refs.values() for p in paths], None, settings, net)
    evaluated = [(c, p) for c in seen + heldout for p in refs[c]]
    round_trip = reference_features([p for _, p in evaluated], size, settings, net)
    wanted = set(seen) | set(heldout)
    references = gallery[[i for i, c in enumerate(gallery_captions) if c in wanted]]
    fid_refs = [reference_features([p for _, p in evaluated], side, settings, fid_net)
                for side in (None, size)] if fid_net else None
    referenced = time.perf_counter()
    images = generate(pipe, seen + heldout, settings, size)
    generated_at = time.perf_counter()
    generated = embed(list(images), settings, net, "generated images")
    prompts = [c for c in seen + heldout for _ in range(settings.per_caption)]
    tiles = [load_image(p, size) for _, p in evaluated]
    report = {"kind": "fidelity", "data": str(data), "resolution": size,
              "settings": asdict(settings),
              "gallery": {"captions": len(refs), "images": len(gallery_captions),
                          "distractors": len(distractors)},
              "chance": [min(k / len(refs), 1.0) for k in range(1, TOPK + 1)]}
    one_off = one_off_captions(seen, list(train) + list(held))
    splits = {"seen": set(seen), "heldout": set(heldout), "seen_one_off": one_off,
              "seen_variants": set(seen) - one_off}
    report |= _retrieval(generated, round_trip, gallery, gallery_captions, prompts, evaluated, splits)
    pixels = pixel_net(PIXEL_SIDE)
    report["pixels"] = {"side": PIXEL_SIDE, **_retrieval(
        pixels.extract(images), pixels.extract(torch.stack(tiles)),  # tiles: the round trips
        reference_features([p for paths in refs.values() for p in paths], None, settings, pixels),
        gallery_captions, prompts, evaluated, splits)}
    picks = {name: _picks(prompts, evaluated, splits[name]) for name in ("seen", "heldout")}
    report["fd"] = {"name": FD_NAME, **_distances(generated, references, round_trip),
                    "feature_size": settings.feature_size}
    report["fid"] = _fid(images, settings, fid_net, fid_refs) if fid_net else None
    report["clip_score"] = None
    if clip:
        report["clip_score"] = _clip_score(clip, images, prompts, tiles, [c for c, _ in evaluated],
                                           picks, settings.clip)
    report["seconds"] = {"references": round(referenced - started, 1),
                         "generation": round(generated_at - referenced, 1),
                         "total": round(time.perf_counter() - started, 1)}
    if out is not None:
        write_report(report, out, "eval", sample_rows(seen, heldout, evaluated, tiles, images,
                                                       settings.per_caption))
    return report
