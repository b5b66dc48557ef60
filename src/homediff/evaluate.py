"""Evaluation, offline: prompt fidelity by retrieval, a Fréchet distance on EfficientNet-Lite0
features, and composition on shapes scenes; JSON and Markdown reports and PNGs.

Data: a folder with ``train/`` and ``heldout/`` image-caption folders (``homediff data emoji``,
``homediff data shapes``, or your own). Evaluation captions: ``seen`` distinct captions of train/
and at most ``heldout`` of heldout/, drawn with the seed in proportion to their number of images, so
the mix follows the data (in the shapes set a single-object caption has many scenes, a relation
caption one or two); sorted first, so runs repeat. Each is generated ``per_caption`` times; images repeat exactly for the same seed, captions and ``batch``.

Prompt fidelity (``evaluate_fidelity``). The gallery holds the reference images (at most
``refs_per_caption`` per caption, first in file order) of the evaluation captions and of
distractors: for each held-out caption the ``distractors`` train captions sharing most words with it
(Jaccard on word sets; for emoji, the same emoji in other skin tones and others in the same tone),
so a held-out prompt scores only if the whole combination is right. All images are embedded by
``homediff.effnet.features``. A query's score for a gallery caption is its highest cosine
similarity to that caption's images; captions are ranked by score (ties favour the query's own) and
top-k accuracy is the share of queries whose own caption ranks within the first k; its standard
error counts each caption once (``topk_standard_error``).
Queries: generated images give the accuracy; the evaluation captions' references after a round trip
through the model's resolution (centre square resized with Pillow's antialiased bicubic as training
data is; the feature network scales it up like a generated image) give the ceiling; chance is
k / gallery captions. FD-EffNetLite0 is the Fréchet distance between Gaussians fitted to the
generated and the reference features of the evaluation captions (its round-trip value is the
ceiling). It depends on the sample sizes: compare runs only at equal settings, never with FID.

Composition (``evaluate_shapes``): every generated image is read back by ``homediff.shapes.check``
against its prompt; ceiling: the caption's first reference image after the round trip; chance:
those references scored against another evaluation caption (a seeded derangement).

Defaults (``EvalSettings``): 50 seen and at most 50 held-out captions, 2 images each, 16 Euler steps,
guidance 3, features at 224 px. On the emoji set that is 188 images: about 3 minutes for xut-tiny at
32 px on 2 CPU cores, 2.5 of them sampling. Reference features are cached in the user cache folder
(``~/.cache/homediff/features``), so a second evaluation on the same data skips them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from homediff import effnet, shapes
from homediff.data.crop import shifted_square_crop
from homediff.data.folder import default_cache_dir, scan_folder
from homediff.errors import ConfigError, HomediffError

logger = logging.getLogger(__name__)

FD_NAME = "FD-EffNetLite0"
TOPK = 10  # accuracies at k = 1..TOPK are kept for the plot


@dataclass
class EvalSettings:
    """Options of both evaluations (see the module docstring); ``size`` None: the pipeline's."""

    per_caption: int = 2
    seen: int = 50
    heldout: int = 50
    distractors: int = 4
    refs_per_caption: int = 1
    steps: int = 16
    cfg: float = 3.0
    seed: int = 0
    size: int | None = None
    batch: int = 32
    feature_size: int = effnet.INPUT_SIZE
    cache: bool = True
    progress: bool = False

    def check(self) -> None:
        for name in ("per_caption", "refs_per_caption", "steps", "batch", "feature_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got "
                                  f"{getattr(self, name)}")
        if self.seen < 0 or self.heldout < 0 or self.distractors < 0:
            raise ConfigError("seen, heldout and distractors must be >= 0")


# --- captions and images ------------------------------------------------------------------------

def read_captions(folder: Path) -> dict[str, list[Path]]:
    """Caption → its image paths (file order) for an image-caption folder."""
    found: dict[str, list[Path]] = {}
    for entry in scan_folder(folder, cache=False):
        if entry.caption:
            text = (folder / entry.caption).read_text(encoding="utf-8").strip()
            if text:
                found.setdefault(text, []).append(folder / entry.image)
    return found


def read_split(data: str | Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """(train, heldout) caption → image paths of a data folder."""
    data = Path(data)
    for name in ("train", "heldout"):
        if not (data / name).is_dir():
            raise HomediffError(f"{data}: no {name}/ folder; give a data set built by `homediff "
                                "data emoji` or `homediff data shapes`, or any folder with train/ "
                                "and heldout/ image-caption folders")
    parts = [read_captions(data / name) for name in ("train", "heldout")]
    for name, part in zip(("train", "heldout"), parts):
        if not part:
            raise HomediffError(f"{data / name}: no captioned images found")
    return parts[0], parts[1]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w-]+", text.lower()))


def choose_captions(train: dict, held: dict, settings: EvalSettings):
    """(seen, held-out, distractor) caption lists; see the module docstring."""
    rng = random.Random(settings.seed)
    seen, heldout = _draw(train, settings.seen, rng), _draw(held, settings.heldout, rng)
    if not seen and not heldout:
        raise ConfigError("no evaluation captions: give --seen or --heldout a positive number")
    pool = [(c, _words(c)) for c in sorted(train)]
    chosen: set[str] = set()
    for caption in heldout:
        words = _words(caption)
        ranked = sorted(pool, key=lambda item: -len(words & item[1]) / len(words | item[1]))
        chosen.update(c for c, _ in ranked[:settings.distractors])
    return seen, heldout, sorted(chosen - set(seen))


def _draw(captions: dict, count: int, rng: random.Random) -> list[str]:
    """``count`` distinct captions, each drawn with probability proportional to its images."""
    tickets = [c for c in sorted(captions) for _ in range(max(1, len(captions[c])))]
    rng.shuffle(tickets)
    return sorted(list(dict.fromkeys(tickets))[:count])


def load_image(path: Path, size: int | None = None) -> torch.Tensor:
    """The centre square of an image as (3, S, S) in [−1, 1]; resized to ``size`` if given."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as err:
        raise HomediffError(f"{path}: cannot read the image ({err})") from err
    return shifted_square_crop(image, size or min(image.size), "center").image


def embed(images: list[torch.Tensor], settings: EvalSettings, model=None,
          what: str = "images") -> torch.Tensor:
    """Features of (3, H, W) images, batched by shape, in input order (``model``: a loaded
    EfficientNet-Lite0, default the CPU one)."""
    from tqdm.auto import tqdm

    out = torch.zeros(len(images), effnet.FEATURE_DIM)
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    batches = [indices[start:start + 32] for indices in groups.values()
               for start in range(0, len(indices), 32)]
    for part in tqdm(batches, desc=f"embedding {what}", disable=not settings.progress):
        batch = torch.stack([images[i] for i in part])
        out[part] = effnet.features(batch, size=settings.feature_size, model=model)
    return out


def reference_features(paths: list[Path], size: int | None, settings: EvalSettings, model=None):
    """Features of reference images (round-tripped through ``size`` if given), cached on disk
    under the user cache folder, keyed by paths, modification times, sizes and settings."""
    stats = [(str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths]
    key = hashlib.sha1(json.dumps([stats, size, settings.feature_size, 1]).encode()).hexdigest()
    file = default_cache_dir().parent / "features" / f"{key[:24]}.pt"
    if settings.cache and file.is_file():
        return torch.load(file, weights_only=True)
    found = embed([load_image(p, size) for p in paths], settings, model,
                  "references" if size is None else "round-tripped references")
    if settings.cache:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(found, file)
        except OSError as err:
            logger.info("%s: cannot cache features (%s)", file, err)
    return found


def generate(pipe, captions: list[str], settings: EvalSettings, size: int) -> torch.Tensor:
    """``per_caption`` images per caption, caption-major, (N, 3, size, size) in [−1, 1]."""
    from tqdm.auto import tqdm

    per_call = max(1, settings.batch // settings.per_caption)
    previous = dict(getattr(pipe, "_progress", {}))
    pipe.set_progress_bar_config(disable=True)
    out = []
    try:
        for chunk, start in enumerate(tqdm(range(0, len(captions), per_call), desc="generating",
                                           disable=not settings.progress)):
            generator = torch.Generator().manual_seed(settings.seed * 100_003 + chunk)
            images = pipe(captions[start:start + per_call], height=size, width=size,
                          num_inference_steps=settings.steps, guidance_scale=settings.cfg,
                          generator=generator, num_images_per_prompt=settings.per_caption,
                          output_type="pt").images
            out.append(images.float() * 2 - 1)
    finally:
        pipe.set_progress_bar_config(**previous)
    return torch.cat(out)


# --- metrics ------------------------------------------------------------------------------------

def caption_ranks(queries: torch.Tensor, query_captions: list[str], gallery: torch.Tensor,
                  gallery_captions: list[str]) -> torch.Tensor:
    """1-based rank of each query's caption among the gallery's captions (module docstring)."""
    names = sorted(set(gallery_captions))
    index = {c: i for i, c in enumerate(names)}
    missing = set(query_captions) - set(index)
    if missing:
        raise ValueError(f"{len(missing)} query captions have no gallery image, e.g. {min(missing)!r}")
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(gallery.double(), dim=1).T
    owner = torch.tensor([index[c] for c in gallery_captions])
    scores = torch.full((len(queries), len(names)), -2.0, dtype=torch.float64)
    scores = scores.scatter_reduce(1, owner.expand(len(queries), -1), sims, "amax")
    own = scores.gather(1, torch.tensor([[index[c]] for c in query_captions]))
    return 1 + (scores > own).sum(1)


def topk_accuracy(ranks: torch.Tensor, ks=range(1, TOPK + 1)) -> list[float | None]:
    """Share of ranks within k, for each k (None without queries)."""
    return [float((ranks <= k).double().mean()) if len(ranks) else None for k in ks]


def topk_standard_error(ranks: torch.Tensor, captions: list[str],
                        ks=range(1, TOPK + 1)) -> list[float | None]:
    """Standard error of each top-k accuracy when the captions are a random draw: the spread of the
    per-caption accuracies over the square root of their number (a caption's images are not
    independent draws, so they count once). None with fewer than 2 captions."""
    index = {c: i for i, c in enumerate(sorted(set(captions)))}
    if len(index) < 2:
        return [None for _ in ks]
    owner = torch.tensor([index[c] for c in captions])

    def per_caption(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(index), dtype=torch.float64).index_add_(0, owner, values.double())

    images = per_caption(torch.ones(len(owner)))
    return [float((per_caption(ranks <= k) / images).std() / len(index) ** 0.5) for k in ks]


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½) of Gaussians fitted to (N, D) sets."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(sa)
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root @ sb @ root).clamp(min=0).sqrt().sum()
    return max(float(mu @ mu + sa.trace() + sb.trace() - 2 * cross), 0.0)


# --- evaluations --------------------------------------------------------------------------------

def _resolution(pipe, settings: EvalSettings) -> int:
    size = settings.size or pipe.sample_size
    pipe.check_size(size, size)
    return size


def evaluate_fidelity(pipe, data: str | Path, settings: EvalSettings | None = None,
                      out: str | Path | None = None) -> dict:
    """Prompt fidelity and FD-EffNetLite0 of a pipeline on a data folder; writes the report
    (``write_report``) to ``out`` if given and returns it."""
    settings = settings or EvalSettings()
    settings.check()
    started, size = time.perf_counter(), _resolution(pipe, settings)
    train, held = read_split(data)
    seen, heldout, distractors = choose_captions(train, held, settings)
    model = effnet.load_effnet(pipe.device)
    refs = {c: train[c][:settings.refs_per_caption] for c in seen + distractors}
    refs |= {c: held[c][:settings.refs_per_caption] for c in heldout}
    gallery_captions = [c for c, paths in refs.items() for _ in paths]
    gallery = reference_features([p for paths in refs.values() for p in paths], None, settings,
                                 model)
    evaluated = [(c, p) for c in seen + heldout for p in refs[c]]
    round_trip = reference_features([p for _, p in evaluated], size, settings, model)
    wanted = set(seen) | set(heldout)
    references = gallery[[i for i, c in enumerate(gallery_captions) if c in wanted]]
    referenced = time.perf_counter()
    images = generate(pipe, seen + heldout, settings, size)
    generated_at = time.perf_counter()
    generated = embed(list(images), settings, model, "generated images")
    prompts = [c for c in seen + heldout for _ in range(settings.per_caption)]
    report = {"kind": "fidelity", "data": str(data), "resolution": size,
              "settings": asdict(settings),
              "gallery": {"captions": len(refs), "images": len(gallery_captions),
                          "distractors": len(distractors)},
              "chance": [min(k / len(refs), 1.0) for k in range(1, TOPK + 1)]}
    ranks = caption_ranks(generated, prompts, gallery, gallery_captions)
    ceiling = caption_ranks(round_trip, [c for c, _ in evaluated], gallery, gallery_captions)
    for name, split in (("seen", set(seen)), ("heldout", set(heldout))):
        pick = [i for i, c in enumerate(prompts) if c in split]
        ref_pick = [i for i, (c, _) in enumerate(evaluated) if c in split]
        report[name] = {"captions": len(split), "images": len(pick),
                        "topk": topk_accuracy(ranks[pick]),
                        "topk_se": topk_standard_error(ranks[pick], [prompts[i] for i in pick]),
                        "ceiling": topk_accuracy(ceiling[ref_pick])}
    enough = min(len(generated), len(references)) >= 2
    report["fd"] = {"name": FD_NAME,
                    "generated": frechet_distance(generated, references) if enough else None,
                    "round_trip": frechet_distance(round_trip, references) if enough else None,
                    "samples": [len(generated), len(references)],
                    "feature_size": settings.feature_size}
    report["seconds"] = {"references": round(referenced - started, 1),
                         "generation": round(generated_at - referenced, 1),
                         "total": round(time.perf_counter() - started, 1)}
    if out is not None:
        tiles = [load_image(p, size) for _, p in evaluated]
        write_report(report, out, "eval", _sample_rows(seen, heldout, evaluated, tiles, images,
                                                       settings.per_caption))
    return report


def _shuffled(count: int, seed: int) -> list[int]:
    """A seeded permutation without fixed points (for count > 1)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    target = [0] * count
    for i in range(count):
        target[order[i]] = order[(i + 1) % count]
    return target


def _rates(results: list[dict]) -> dict[str, float | None]:
    rates = {}
    for name in shapes.PROPERTIES:
        values = [r[name] for r in results if r[name] is not None]
        rates[name] = sum(values) / len(values) if values else None
    return rates


def evaluate_shapes(pipe, data: str | Path, settings: EvalSettings | None = None,
                    out: str | Path | None = None) -> dict:
    """Composition scores of a pipeline trained on shapes scenes (module docstring)."""
    settings = settings or EvalSettings()
    settings.check()
    started, size = time.perf_counter(), _resolution(pipe, settings)
    train, held = read_split(data)
    seen, heldout, _ = choose_captions(train, held, settings)
    captions = seen + heldout
    for caption in captions:
        shapes.parse_caption(caption)  # a clear error for a data set that is not shapes
    tiles = [load_image(train[c][0], size) for c in seen]
    tiles += [load_image(held[c][0], size) for c in heldout]
    images = generate(pipe, captions, settings, size)
    generated = time.perf_counter()
    prompts = [c for c in captions for _ in range(settings.per_caption)]
    results = [shapes.check(image, c) for image, c in zip(images, prompts)]
    ceiling = [shapes.check(t, c) for t, c in zip(tiles, captions)]
    other = _shuffled(len(captions), settings.seed)
    chance = [shapes.check(tiles[other[i]], c) for i, c in enumerate(captions)]
    report = {"kind": "shapes", "data": str(data), "resolution": size,
              "settings": asdict(settings)}
    for name, split in (("seen", set(seen)), ("heldout", set(heldout))):
        mine = [(r, c) for r, c in zip(results, prompts) if c in split]
        kinds = {}
        for result, caption in mine:
            kinds.setdefault(shapes.parse_caption(caption).kind, []).append(result)
        report[name] = {"captions": len(split), "images": len(mine),
                        "rates": _rates([r for r, _ in mine]),
                        "ceiling": _rates([r for r, c in zip(ceiling, captions) if c in split]),
                        "by_kind": {kind: _rates(part) for kind, part in sorted(kinds.items())}}
    report["chance"] = _rates(chance)
    report["seconds"] = {"generation": round(generated - started, 1),
                         "total": round(time.perf_counter() - started, 1)}
    if out is not None:
        pairs = [(c, None) for c in captions]
        write_report(report, out, "shapes", _sample_rows(seen, heldout, pairs, tiles, images,
                                                         settings.per_caption))
    return report


# --- reports ------------------------------------------------------------------------------------

def _pct(value, error=None) -> str:
    """A percentage, with ``± error`` (one standard error, in points) when given."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" + ("" if error is None else f" ± {100 * error:.1f}")


def _num(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(report: dict) -> str:
    """The report as Markdown tables (accuracy next to its ceiling and chance)."""
    s, h = report["seen"], report["heldout"]
    head = (f"| metric | seen ({s['captions']} captions, {s['images']} images) | ceiling | "
            f"held-out ({h['captions']} captions, {h['images']} images) | ceiling | chance |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    if report["kind"] == "shapes":
        rows = [f"| {name} | {_pct(s['rates'][name])} | {_pct(s['ceiling'][name])} | "
                f"{_pct(h['rates'][name])} | {_pct(h['ceiling'][name])} | "
                f"{_pct(report['chance'][name])} |" for name in shapes.PROPERTIES]
        kinds = [f"| {kind} | {_pct(s['by_kind'].get(kind, {}).get('all'))} | "
                 f"{_pct(h['by_kind'].get(kind, {}).get('all'))} |" for kind in shapes.KINDS]
        return (f"Composition read back by the shapes checker at {report['resolution']} px\n\n"
                + head + "\n".join(rows) + "\n\n| caption kind: all properties right | seen | "
                "held-out |\n|---|---:|---:|\n" + "\n".join(kinds) + "\n")
    rows = [f"| top-{k} retrieval | {_pct(s['topk'][k - 1], s['topk_se'][k - 1])} | "
            f"{_pct(s['ceiling'][k - 1])} | {_pct(h['topk'][k - 1], h['topk_se'][k - 1])} | "
            f"{_pct(h['ceiling'][k - 1])} | "
            f"{_pct(report['chance'][k - 1])} |" for k in (1, 5)]
    fd = report["fd"]
    return (f"Prompt fidelity at {report['resolution']} px: caption retrieval among "
            f"{report['gallery']['captions']} gallery captions "
            f"({report['gallery']['distractors']} of them distractors)\n\n" + head
            + "\n".join(rows) + f"\n\n| {fd['name']} (EfficientNet-Lite0 features at "
            f"{fd['feature_size']} px; not FID) | generated | round trip (ceiling) |\n"
            f"|---|---:|---:|\n| {fd['samples'][0]} generated vs {fd['samples'][1]} reference "
            f"images | {_num(fd['generated'])} | {_num(fd['round_trip'])} |\n")


def _sample_rows(seen, heldout, evaluated, tiles, images, per_caption, rows: int = 6):
    """Rows of [reference, generated…] for the first captions of each split."""
    first = {}
    for (caption, _), tile in zip(evaluated, tiles):
        first.setdefault(caption, tile)
    order = seen + heldout
    picked = seen[:rows] + heldout[:rows]
    return [[first[c]] + [images[order.index(c) * per_caption + j] for j in range(per_caption)]
            for c in picked]


def write_report(report: dict, out: str | Path, name: str, rows=None) -> list[Path]:
    """Write NAME.json, NAME.md, and PNGs (NAME-samples.png: reference then generated images per
    row, seen captions first; for fidelity NAME-topk.png, accuracy against k) into ``out``."""
    from homediff.pipeline import image_grid
    from homediff.plots import line_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report), encoding="utf-8")
    if rows:
        scale = max(1, 64 // rows[0][0].shape[-1])
        tiles = [Image.fromarray(((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
                                 .numpy()).resize((t.shape[-1] * scale,) * 2, Image.NEAREST)
                 for row in rows for t in row]
        paths.append(out / f"{name}-samples.png")
        image_grid(tiles, columns=len(rows[0])).save(paths[-1])
    if report["kind"] == "fidelity":
        ks = list(range(1, TOPK + 1))
        series = {"seen": report["seen"]["topk"], "seen ceiling": report["seen"]["ceiling"],
                  "held-out": report["heldout"]["topk"],
                  "held-out ceiling": report["heldout"]["ceiling"], "chance": report["chance"]}
        series = {label: (ks, ys) for label, ys in series.items() if None not in ys}
        paths.append(line_plot(series, out / f"{name}-topk.png", title="caption retrieval",
                               xlabel="k", ylabel="top-k accuracy"))
    return paths
