"""Camera control, measured (``evaluate_camera``): does a camera edit move the view over the same
scene, as the position map asks?

For each prompt and seed the model draws the canonical square view and every edit in ``EDITS``
(x and y shifts of ±0.2 and ±0.4, zooms 0.7 and 1.5, a 2:1 and a 1:2 frame), all from the same
seed. ``homediff.evaluation.alignment.align`` finds the camera under which the canonical view best
predicts each edited image. Per edit the report gives, as mean ± standard error over prompts and
seeds:

- the measured camera and its error as a fraction of the requested move: ``|s − s_req| / |s_req|``
  for shifts, ``|ln z − ln z_req| / |ln z_req|`` for zooms, per image (the JSON also holds the
  error of the mean camera, ``*_error_of_mean``); for frames, which request no move, the offset of
  the square view inside the frame in pixels;
- consistency: the correlation of the edited image with the aligned canonical view over their
  overlap, beside the same search between the canonical view of one seed and the edit of the next
  (the baseline: what any two images of that prompt share); and both at the requested camera.

Writes camera.json, camera.md and camera.png (per edit: the canonical view with the requested
(green) and measured (red) window, the edit, and the canonical view resampled as measured).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from homediff.evaluation.alignment import Camera, align, predict, similarity_at
from homediff.evaluation.settings import CameraSettings
from homediff.generation import GenerationRequest, sample
from homediff.geometry import canonical_box

TOLERANCE = 0.15  # an edit counts as recovered when its mean error is within this share of the move


@dataclass(frozen=True)
class Edit:
    name: str
    camera: Camera = Camera()
    frame: tuple[int, int] = (1, 1)  # (height, width) in units of the canonical side


EDITS = tuple([Edit(f"{axis} {sign}{amount}", Camera(**{axis: float(f"{sign}{amount}")}))
               for axis in ("x", "y") for amount in (0.2, 0.4) for sign in "+-"]
              + [Edit("zoom 0.7", Camera(zoom=0.7)), Edit("zoom 1.5", Camera(zoom=1.5)),
                 Edit("2:1 frame", frame=(1, 2)), Edit("1:2 frame", frame=(2, 1))])


def draw_views(pipe, prompts: list[str], settings: CameraSettings, size: int) -> dict:
    """Images (prompt-major, seed-minor) of the canonical view (key None) and of every edit: one
    request per view (``generation``), so image k of every view comes from seed ``settings.seed``
    + k, and the views of one prompt and seed differ only by their camera."""
    from tqdm.auto import tqdm

    views = {}
    for edit in tqdm((None, *EDITS), desc="camera views", disable=not settings.progress):
        frame = (1, 1) if edit is None else edit.frame
        camera = {} if edit is None else {"zoom": edit.camera.zoom, "x_shift": edit.camera.x,
                                          "y_shift": edit.camera.y}
        request = GenerationRequest(prompts, seed=settings.seed, steps=settings.steps, cfg=settings.cfg,
                                    height=size * frame[0], width=size * frame[1], num=settings.seeds,
                                    batch_size=max(settings.seeds, settings.batch), **camera)
        views[edit] = torch.stack(sample(pipe, request, output_type="pt")[0]).float() * 2 - 1
    return views


def _pixels_per_unit(image: torch.Tensor) -> float:
    """Pixels per position unit of an image: its long side spans 2 (geometry's canonical box)."""
    return max(image.shape[-2:]) / 2


def measure(canonical: torch.Tensor, edited: torch.Tensor, other: torch.Tensor, edit: Edit) -> dict:
    """One prompt and seed: the alignment of ``edited`` (same seed) and of ``other`` (the next
    seed's edit, the baseline) with the canonical view; errors against the requested camera."""
    found, baseline = align(canonical, edited), align(canonical, other)
    want, got = edit.camera, found.camera
    ppu = _pixels_per_unit(edited)
    shift = math.hypot(want.x, want.y)
    record = {"camera": asdict(got), "similarity": found.similarity, "overlap": found.overlap,
              "baseline": baseline.similarity,
              "similarity_requested": similarity_at(canonical, edited, want),
              "baseline_requested": similarity_at(canonical, other, want),
              "move_px": [-got.x * ppu, -got.y * ppu],
              "offset_px": math.hypot(got.x - want.x, got.y - want.y) * ppu}
    if shift:
        record["shift_error"] = math.hypot(got.x - want.x, got.y - want.y) / shift
    if want.zoom != 1:
        record["zoom_error"] = abs(math.log(got.zoom / want.zoom)) / abs(math.log(want.zoom))
    return record


def _mean_se(values: list[float]) -> list[float]:
    """[mean, standard error] (error 0 for a single value)."""
    spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return [statistics.fmean(values), spread]


def summarise(edit: Edit, records: list[dict], size: int) -> dict:
    """Mean ± standard error of each measure of one edit over its prompts and seeds."""
    ppu = max(edit.frame) * size / 2
    summary = {"requested": asdict(edit.camera), "frame": list(edit.frame), "images": len(records),
               "requested_move_px": [-edit.camera.x * ppu, -edit.camera.y * ppu],
               "zoom": _mean_se([r["camera"]["zoom"] for r in records]),
               "x": _mean_se([r["camera"]["x"] for r in records]),
               "y": _mean_se([r["camera"]["y"] for r in records])}
    for key in ("similarity", "baseline", "similarity_requested", "baseline_requested",
                "offset_px", "shift_error", "zoom_error"):
        if key in records[0]:
            summary[key] = _mean_se([r[key] for r in records])
    want = edit.camera
    if want.x or want.y:  # the mean move against the request (per-image errors never cancel)
        summary["shift_error_of_mean"] = math.hypot(summary["x"][0] - want.x, summary["y"][0] - want.y
                                                    ) / math.hypot(want.x, want.y)
    if want.zoom != 1:
        summary["zoom_error_of_mean"] = abs(math.log(summary["zoom"][0] / want.zoom)
                                            ) / abs(math.log(want.zoom))
    errors = [summary[k][0] for k in ("shift_error", "zoom_error") if k in summary]
    summary["recovered"] = all(e <= TOLERANCE for e in errors) if errors else None
    summary["records"] = records
    return summary


def evaluate_camera(pipe, prompts: list[str], settings: CameraSettings | None = None,
                    out: str | Path | None = None) -> dict:
    """Measure every edit in ``EDITS`` for ``prompts``; writes the report into ``out`` if given."""
    settings = settings or CameraSettings()
    settings.check()
    if not prompts:
        raise ValueError("the camera evaluation needs at least one prompt")
    size = settings.size or pipe.sample_size
    pipe.check_size(size, size)
    started = time.perf_counter()
    views = draw_views(pipe, prompts, settings, size)
    drawn = time.perf_counter()
    n = settings.seeds
    edits = {}
    for edit in EDITS:
        records = [measure(views[None][i], views[edit][i],
                           views[edit][i - i % n + (i + 1) % n], edit)
                   for i in range(len(views[None]))]
        edits[edit.name] = summarise(edit, records, size)
    report = {"kind": "camera", "resolution": size, "prompts": prompts,
              "settings": asdict(settings), "tolerance": TOLERANCE, "edits": edits,
              "seconds": {"generation": round(drawn - started, 1),
                          "measurement": round(time.perf_counter() - drawn, 1),
                          "total": round(time.perf_counter() - started, 1)}}
    if out is not None:
        write_camera_report(report, views, out)
    return report


def _pm(pair, digits: int = 2, scale: float = 1.0) -> str:
    return "–" if pair is None else f"{scale * pair[0]:.{digits}f} ± {scale * pair[1]:.{digits}f}"


def camera_markdown(report: dict) -> str:
    """The per-edit table of a camera report."""
    rows = []
    for name, e in report["edits"].items():
        want = e["requested"]
        asked = (f"frame {e['frame'][1]}:{e['frame'][0]}" if want == asdict(Camera())
                 else ", ".join(f"{k} {want[k]:+g}" if k != "zoom" else f"zoom {want[k]:g}"
                                for k in ("zoom", "x", "y") if want[k] != asdict(Camera())[k]))
        measured = f"zoom {e['zoom'][0]:.2f}, x {e['x'][0]:+.2f}, y {e['y'][0]:+.2f}"
        error = ("shift_error" in e and _pm(e["shift_error"], 0, 100) + "% of the shift") or \
                ("zoom_error" in e and _pm(e["zoom_error"], 0, 100) + "% of the zoom") or \
                _pm(e["offset_px"], 1) + " px off"
        mark = {True: "yes", False: "no", None: "–"}[e["recovered"]]
        rows.append(f"| {name} | {asked} | {measured} | {error} | {mark} | "
                    f"{_pm(e['similarity'])} | {_pm(e['baseline'])} | "
                    f"{_pm(e['similarity_requested'])} | {_pm(e['baseline_requested'])} |")
    s = report["settings"]
    return (f"Camera control at {report['resolution']} px: {len(report['prompts'])} prompts × "
            f"{s['seeds']} seeds, {s['steps']} steps, guidance {s['cfg']}; mean ± standard error. "
            f"Recovered: mean error within {100 * report['tolerance']:.0f}% of the requested move. "
            "Consistency: correlation of the edit with the canonical view where they overlap, "
            "aligned as measured or as requested, beside the same for the next seed's edit "
            "(nothing in common).\n\n"
            "| edit | requested | measured | error | recovered | consistency | different seeds "
            "| at requested camera | different seeds |\n"
            "|---|---|---|---:|:---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(array)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _window(draw, camera: Camera, frame: tuple[int, int], side: int, colour: str) -> None:
    """The edit's view, in the canonical view's coordinates, on a canvas spanning [−2, 2]²."""
    half_y, half_x = canonical_box(*frame)

    def to_px(u: float) -> float:
        return (u + 2) / 4 * side

    ys = [(sign * half_y + camera.y) / camera.zoom for sign in (-1, 1)]
    xs = [(sign * half_x + camera.x) / camera.zoom for sign in (-1, 1)]
    draw.rectangle([to_px(xs[0]), to_px(ys[0]), to_px(xs[1]), to_px(ys[1])], outline=colour, width=2)


def camera_figure(report: dict, views: dict, index: int = 0) -> Image.Image:
    """Per edit, for image ``index``: the canonical view with the requested (green) and measured
    (red) windows, the edited image, and the canonical view resampled at the measured camera."""
    canonical = views[None][index]
    size = canonical.shape[-1]
    scale = max(1, 96 // size)
    tile = size * scale
    rows = []
    for edit in EDITS:
        found = Camera(**report["edits"][edit.name]["records"][index]["camera"])
        edited = views[edit][index]
        params = torch.tensor([[math.log(found.zoom), found.y, found.x]])
        pred, mask = predict(canonical, params, *edited.shape[-2:])
        aligned = torch.where(mask[0], pred[0].float(), torch.zeros(()))
        board = Image.new("RGB", (2 * tile, 2 * tile), (200, 200, 200))
        board.paste(_to_pil(canonical, scale), (tile // 2, tile // 2))
        draw = ImageDraw.Draw(board)
        _window(draw, edit.camera, edit.frame, 2 * tile, "green")
        _window(draw, found, edit.frame, 2 * tile, "red")
        rows.append((edit.name, [board, _to_pil(edited, scale), _to_pil(aligned, scale)]))
    label, pad = 90, 6
    widths = [max(r[1][c].width for r in rows) for c in range(3)]
    heights = [max(p.height for p in r[1]) for r in rows]
    sheet = Image.new("RGB", (label + sum(widths) + 3 * pad, 16 + sum(heights) + pad * len(rows)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(("canonical: asked / measured", "edit", "aligned canonical")):
        draw.text((label + sum(widths[:c]) + c * pad, 2), title, fill="black")
    top = 16
    for (name, panels), height in zip(rows, heights):
        draw.text((4, top + height // 2 - 6), name, fill="black")
        for c, panel in enumerate(panels):
            sheet.paste(panel, (label + sum(widths[:c]) + c * pad, top))
        top += height + pad
    return sheet


def write_camera_report(report: dict, views: dict, out: str | Path, name: str = "camera") -> list[Path]:
    """NAME.json, NAME.md and NAME.png in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(camera_markdown(report), encoding="utf-8")
    camera_figure(report, views).save(paths[2])
    return paths
