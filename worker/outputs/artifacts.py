"""Writing a job's outputs: ``heatmap.npz``, ``summary.json`` and one overlay PNG per class.

An overlay is made to be read by a person: the image in dimmed grey, the class's heat in
colour scaled to that class's own score range (so a small object is as bright as a large
one), its peaks ringed and numbered, and a legend strip with the colour bar and the range
in score units; the same range and peaks go to summary.json.

Every file is written under a temporary name in the target folder and renamed into place,
so a reader (or a crash) never leaves a half-written artifact behind.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shared.jobspec import DEFAULT_WEIGHTING
from shared.storage import HEATMAP_FILE, SUMMARY_FILE, overlay_filename
from worker.grid import ScoreGrid
from worker.outputs.blend import ColourScale, Peak, class_heat, class_peaks

# A perceptually ordered dark-to-bright colormap (anchor colours of matplotlib's "inferno").
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def _interpolate_anchors(values: np.ndarray) -> np.ndarray:
    positions = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, len(_ANCHORS) - 1)
    frac = (positions - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[high] * frac).round().astype(np.uint8)


_LUT = _interpolate_anchors(np.linspace(0.0, 1.0, 1024))  # a table: 10x faster than interpolating per pixel


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB (NaN as 0)."""
    index = np.rint(np.nan_to_num(np.clip(values, 0.0, 1.0), nan=0.0) * (len(_LUT) - 1)).astype(np.intp)
    return _LUT[index]


def write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def overlay_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def write_heatmap(out_dir: Path, grid: ScoreGrid, class_names: list[str], mode: str, model: str) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        scores=grid.scores.astype(np.float32),
        classes=np.asarray(class_names, dtype=str),
        class_indices=grid.class_indices.astype(np.int64),
        computed=np.ones(grid.scores.shape[:2], dtype=bool) if grid.computed is None else grid.computed,
        rows=grid.rows.astype(np.int64),
        cols=grid.cols.astype(np.int64),
        window=np.asarray(grid.window, dtype=np.int64),
        stride=np.asarray(grid.stride, dtype=np.int64),
        mode=np.asarray(mode),
        model=np.asarray(model),
    )
    path = out_dir / HEATMAP_FILE
    write_atomic(path, buffer.getvalue())
    return path


#: Height of the legend strip under an overlay (class, colour bar, score range), and the
#: narrowest overlay that gets one (narrower: the legend is in summary.json only).
LEGEND_HEIGHT = 32
MIN_LEGEND_WIDTH = 240
COLORMAP_NAME = "inferno"
_PEAK_COLOUR = (0, 229, 255)  # cyan: not in the colormap, visible on grey and on heat
_OPACITY = (0.2, 0.7)  # heat opacity at the bottom and the top of the class's range


@dataclass(frozen=True)
class Overlays:
    """What `write_overlays` wrote: file names, the map's size, and per class the colour
    scale (``low``/``high`` in score units) and the peaks drawn, for summary.json."""

    files: list[str]
    size: tuple[int, int]  # (height, width) of the map area (the legend strip is extra)
    legend: dict
    classes: list[dict]


def overlay_base(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The downscaled image in dimmed grey: the heat's colours are then the only colours."""
    small = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR).convert("L")
    grey = np.asarray(small, dtype=np.float32) * 0.55 + 40.0
    return np.repeat(grey[:, :, None], 3, axis=2)


def _draw_peaks(draw: ImageDraw.ImageDraw, peaks: list[Peak], scale: tuple[float, float], radius: float) -> None:
    """A ring around every peak (the best one thicker and numbered 1, the next ones 2, 3...)."""
    font = ImageFont.load_default(size=11)
    for rank, peak in enumerate(peaks, start=1):
        x, y = peak.x * scale[1], peak.y * scale[0]
        width = 3 if rank == 1 else 2
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=_PEAK_COLOUR, width=width)
        if rank <= 9:
            draw.text((x + radius + 2, y - radius - 2), str(rank), fill=_PEAK_COLOUR, font=font)


def _format_score(value: float, span: float) -> str:
    """Enough decimals to tell the bar's three numbers apart (0.00 rather than 3.85e-11)."""
    decimals = 2 if span <= 0 else int(min(8, max(0, 2 - np.floor(np.log10(span) + 1e-3))))
    return f"{value:.{decimals}f}"


def _legend_strip(width: int, legend: dict) -> Image.Image:
    """Class name and blending on the left; the colour bar with its score range on the right."""
    name, low, high = legend["name"], legend["low"], legend["high"]
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=11)
    draw.text((6, 3), name[:28], fill=(255, 255, 255), font=font)
    note = "near chance: drawn dim" if legend.get("near_chance") else f"{legend['weighting']} over windows"
    draw.text((6, 17), note, fill=(250, 190, 90) if legend.get("near_chance") else (170, 170, 170), font=font)
    left = max(120, width // 3)
    right = width - 10
    ramp = colormap(np.linspace(0.0, 1.0, max(2, right - left)))
    strip.paste(Image.fromarray(np.repeat(ramp[None], 10, axis=0)), (left, 4))
    for fraction in (0.0, 0.5, 1.0):
        text = _format_score(low + fraction * (high - low), high - low)
        x = left + fraction * (right - left - 1)
        anchor = "lt" if fraction == 0 else ("rt" if fraction == 1 else "mt")
        draw.line((x, 14, x, 17), fill=(255, 255, 255))
        draw.text((x, 18), text, fill=(255, 255, 255), font=font, anchor=anchor)
    return strip


def render_overlay(
    base: np.ndarray, heat: np.ndarray, peaks: list[Peak], scale: tuple[float, float], legend: dict | None
) -> Image.Image:
    """One class: heat in colour over the grey image (opacity grows with the heat), peaks
    ringed, and (when `legend` is given) the legend strip underneath."""
    values = np.nan_to_num(heat, nan=0.0)
    opacity = np.where(np.isnan(heat), 0.0, _OPACITY[0] + (_OPACITY[1] - _OPACITY[0]) * values)[:, :, None]
    mixed = (1 - opacity) * base + opacity * colormap(values).astype(np.float32)
    picture = Image.fromarray(mixed.round().astype(np.uint8))
    radius = legend["peak_radius"] if legend else 4.0
    _draw_peaks(ImageDraw.Draw(picture), peaks, scale, radius)
    if legend is None:
        return picture
    full = Image.new("RGB", (picture.width, picture.height + LEGEND_HEIGHT))
    full.paste(picture, (0, 0))
    full.paste(_legend_strip(picture.width, legend), (0, picture.height))
    return full


def write_overlays(
    out_dir: Path,
    grid: ScoreGrid,
    image: np.ndarray,
    class_names: list[str] | None = None,
    *,
    max_side: int = 1024,
    weighting: str = DEFAULT_WEIGHTING,
    image_size: tuple[int, int] | None = None,
    scales: list[ColourScale] | None = None,
) -> Overlays:
    """One PNG per score channel: the class's heat (`worker.outputs.blend.class_heat`: scaled to its
    own score range) over the dimmed downscaled image, its peaks ringed, and a legend strip
    with the colour bar and the range in score units (also returned for summary.json).
    `image_size` (h, w) is the grid's coordinate frame when `image` is a smaller picture of it
    (an overview of a large image). `scales`: the classes' colour scales (the viewer's;
    computed from the grid when not given, the same way)."""
    height, width = image_size or image.shape[:2]
    size = overlay_size(height, width, max_side)
    scale = (size[0] / height, size[1] / width)
    base = overlay_base(image, size)
    heat = class_heat(grid, (height, width), size, weighting=weighting, scales=scales)
    names = class_names or [str(int(i)) for i in grid.class_indices]
    # Rings around one window's heat, so they frame the object without hiding it (capped for
    # a large window on a small image).
    radius = max(6.0, min(min(grid.window[0] * scale[0], grid.window[1] * scale[1]), 0.06 * max(size)))
    files, classes = [], []
    for channel, class_index in enumerate(grid.class_indices):
        peaks = class_peaks(grid, channel)
        low, high, near_chance = heat.low[channel], heat.high[channel], heat.near_chance[channel]
        legend = None
        if size[1] >= MIN_LEGEND_WIDTH:
            legend = {"name": names[channel], "low": low, "high": high, "weighting": weighting, "peak_radius": radius}
            legend["near_chance"] = near_chance
        picture = render_overlay(base, heat.values[:, :, channel], peaks, scale, legend)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        name = overlay_filename(class_index)
        write_atomic(out_dir / name, buffer.getvalue())
        files.append(name)
        classes.append(
            {
                "scale": {"low": low, "high": high, "near_chance": near_chance},
                "peaks": [{"x": p.x, "y": p.y, "score": p.score} for p in peaks],
            }
        )
    legend_info = {
        "colormap": COLORMAP_NAME,
        "weighting": weighting,
        "legend_height": LEGEND_HEIGHT if size[1] >= MIN_LEGEND_WIDTH else 0,
        "note": "each class is coloured from its own scale.low (darkest) to scale.high (brightest), as in the "
        "viewer; scale.near_chance: the map varies by less than a tenth of the score scale and is drawn dim",
    }
    return Overlays(files, size, legend_info, classes)


def write_summary(out_dir: Path, summary: dict) -> Path:
    path = out_dir / SUMMARY_FILE
    write_atomic(path, json.dumps(summary, indent=2, sort_keys=False).encode())
    return path
