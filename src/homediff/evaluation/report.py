"""The evaluation reports: NAME.json, NAME.md (Markdown tables beside ceiling and chance) and PNGs."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from homediff.datasets.shapes import KINDS
from homediff.evaluation.metrics import TOPK
from homediff.evaluation.shape_checker import PROPERTIES
from homediff.figures import image_grid, line_plot


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
                f"{_pct(report['chance'][name])} |" for name in PROPERTIES]
        kinds = [f"| {kind} | {_pct(s['by_kind'].get(kind, {}).get('all'))} | "
                 f"{_pct(h['by_kind'].get(kind, {}).get('all'))} |" for kind in KINDS]
        return (f"Composition read back by the shapes checker at {report['resolution']} px\n\n"
                + head + "\n".join(rows) + "\n\n| caption kind: all properties right | seen | "
                "held-out |\n|---|---:|---:|\n" + "\n".join(kinds) + "\n")
    pixels = report["pixels"]
    return (f"Prompt fidelity at {report['resolution']} px: caption retrieval among "
            f"{report['gallery']['captions']} gallery captions "
            f"({report['gallery']['distractors']} of them distractors), by EfficientNet-Lite0 "
            f"features\n\n" + head + "\n".join(_retrieval_rows(report, report)) + "\n\n"
            f"The same retrieval by the images' pixels at {pixels['side']}×{pixels['side']} "
            "(correlation; no learned features, so no training signal can have fitted it)\n\n"
            + head + "\n".join(_retrieval_rows(pixels, report)) + "\n\n" + _standard_metrics(report))


def _retrieval_rows(found: dict, report: dict) -> list[str]:
    """Top-1 and top-5 of seen and held-out captions, then top-5 of the seen captions that come in
    variants (skin tones) and of the one-off ones."""
    s, h = found["seen"], found["heldout"]
    rows = [f"| top-{k} retrieval | {_pct(s['topk'][k - 1], s['topk_se'][k - 1])} | "
            f"{_pct(s['ceiling'][k - 1])} | {_pct(h['topk'][k - 1], h['topk_se'][k - 1])} | "
            f"{_pct(h['ceiling'][k - 1])} | {_pct(report['chance'][k - 1])} |" for k in (1, 5)]
    for key, label in (("seen_variants", "with variants"), ("seen_one_off", "one-off")):
        g = found[key]
        rows.append(f"| top-5, seen {label} ({g['captions']} captions) | "
                    f"{_pct(g['topk'][4], g['topk_se'][4])} | {_pct(g['ceiling'][4])} | | | "
                    f"{_pct(report['chance'][4])} |")
    return rows


def _standard_metrics(report: dict) -> str:
    """The Fréchet distances (FD-EffNetLite0, FID if measured), the CLIP score if measured, and a
    note on what is missing."""
    fd, fid, clip = report["fd"], report.get("fid"), report.get("clip_score")
    lines = [f"| Fréchet distance, {fd['samples'][0]} generated vs {fd['samples'][1]} reference "
             "images | generated | round trip (ceiling) |", "|---|---:|---:|",
             f"| {fd['name']} (EfficientNet-Lite0 features at {fd['feature_size']} px; not FID) | "
             f"{_num(fd['generated'])} | {_num(fd['round_trip'])} |"]
    if fid:
        lines.append(f"| FID (Inception-v3 pool3 features, {Path(fid['weights']).name}) | "
                     f"{_num(fid['generated'])} | {_num(fid['round_trip'])} |")
    if clip:
        s, h = clip["seen"], clip["heldout"]
        lines += ["", f"| CLIP score ({Path(clip['weights']).name}) | seen | ceiling | held-out | "
                  "ceiling |", "|---|---:|---:|---:|---:|",
                  f"| 100 · max(cos(image, caption), 0) | {_num(s['generated'])} | "
                  f"{_num(s['ceiling'])} | {_num(h['generated'])} | {_num(h['ceiling'])} |"]
    lines.append("")
    if fid:
        lines.append("FID falls as the number of images grows: compare it only at equal counts "
                     "(published FIDs use 10,000 to 50,000 images).")
    else:
        lines.append("FD-EffNetLite0 is not FID and not comparable with published FIDs; give the "
                     "FID Inception weights (`--inception-weights`) to measure FID.")
    if not clip:
        lines.append("No CLIP score: give a local CLIP model (`--clip`) to measure it.")
    return "\n".join(lines) + "\n"


def sample_rows(seen, heldout, evaluated, tiles, images, per_caption, rows: int = 6):
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
