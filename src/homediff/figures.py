"""Figures drawn with Pillow (no plotting library needed): image grids, sample sheets and small
line plots."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]  # matplotlib's tab10: ten curves before a colour repeats
SHEET_TILE = 128  # a sample sheet enlarges its images (by a whole factor) to at least this width
LINE = 14  # pixels per line of the sheet's 11-pixel text
LABEL_LINES = 3  # the lines under each image (a longer prompt ends in "…")
LABEL_BAND = LABEL_LINES * LINE + 6  # the band under each image
HEADER = 2 * LINE + 6  # the title line and the column titles


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: str | Path, *,
              title: str = "", xlabel: str = "", ylabel: str = "", log_y: bool = False,
              size: tuple[int, int] = (720, 440)) -> Path:
    """Draw named (x, y) series on shared axes and save a PNG."""
    width, height = size
    left, right, top, bottom = 70, 20, 36, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)
              if math.isfinite(y) and (y > 0 or not log_y)]
    if not points:
        raise ValueError("nothing to plot")

    def ty(y):
        return math.log10(y) if log_y else y

    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(ty(p[1]) for p in points), max(ty(p[1]) for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (ty(y) - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        fy = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, 10**fy if log_y else fy)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{10**fy if log_y else fy:.3g}", fill="black")
        fx = x0 + (x1 - x0) * i / 4
        px, _ = to_px(fx, 10**y0 if log_y else y0)
        draw.text((px - 10, height - bottom + 6), f"{fx:.4g}", fill="black")
    draw.text((width // 2 - 6 * len(title) // 2, 10), title, fill="black")
    draw.text((width // 2 - 30, height - 20), xlabel, fill="black")
    draw.text((4, 16), ylabel, fill="black")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = [to_px(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        draw.text((width - right - 160, top + 8 + 14 * i), name, fill=colour)
    path = Path(path)
    image.save(path)
    return path


def image_grid(images: list, columns: int | None = None):
    """One PIL image with ``images`` (all the same size) in a grid, about square by default."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], scale: int = 2,
                  columns: list[str] | None = None) -> Image.Image:
    """Rows of images with their prompt written on the left (and column titles above, if given)."""
    tile = rows[0][1][0].size
    width, height = tile[0] * scale, tile[1] * scale
    label, top = 260, 14 if columns else 0
    sheet = Image.new("RGB", (label + width * max(len(r[1]) for r in rows), top + height * len(rows)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for x, title in enumerate(columns or []):
        draw.text((label + x * width + 2, 1), title, fill="black")
    for y, (text, images) in enumerate(rows):
        draw.text((4, top + y * height + height // 2 - 6), text[:42], fill="black")
        for x, image in enumerate(images):
            sheet.paste(image.resize((width, height), Image.NEAREST), (label + x * width, top + y * height))
    return sheet


def sample_sheet(rows: list[tuple[str, list[Image.Image]]], columns: list[str],
                 title: str = "") -> Image.Image:
    """Rows of equal-sized images with each row's text written under every image, the column
    titles above them and ``title`` on top. Small images are enlarged by a whole factor (nearest
    neighbour, so pixels stay sharp) to at least ``SHEET_TILE`` pixels wide; the sheet is
    ``len(columns)`` tiles wide and ``HEADER + len(rows) · (tile height + LABEL_BAND)`` tall."""
    width, height = rows[0][1][0].size
    scale = max(1, math.ceil(SHEET_TILE / width))
    tile_w, tile_h = width * scale, height * scale
    font = _font()
    sheet = Image.new("RGB", (tile_w * len(columns), HEADER + len(rows) * (tile_h + LABEL_BAND)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title, fill="black", font=font)
    for x, name in enumerate(columns):
        draw.text((x * tile_w + 4, LINE + 4), _fit(name, font, tile_w - 8), fill="black", font=font)
    for y, (text, images) in enumerate(rows):
        top = HEADER + y * (tile_h + LABEL_BAND)
        lines = _wrap(text, font, tile_w - 8, LABEL_LINES)
        for x, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x * tile_w, top))
            for k, line in enumerate(lines):
                draw.text((x * tile_w + 4, top + tile_h + 3 + k * LINE), line, fill="black", font=font)
    return sheet


def _font() -> ImageFont.ImageFont:
    """DejaVu Sans at 11 pixels where installed, else Pillow's built-in font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 11)
    except OSError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: float, lines: int) -> list[str]:
    """``text`` in at most ``lines`` lines of at most ``width`` pixels, broken between words."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words:
        out[-1] = f"{out[-1]} {' '.join(words)}"
    return [_fit(line, font, width) for line in out]


def _fit(text: str, font, width: float) -> str:
    """``text``, cut and ended with "…" where it is wider than ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
