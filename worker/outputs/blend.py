"""Per-pixel maps from a score grid, at a chosen (usually reduced) resolution, and the heat
that the overlays draw (and the viewer's heat layer shows): each class's map on its colour
scale (one per class, shared by the PNG and the viewer; dim when the map is near chance),
plus its peaks.

Each window spreads its score over the pixels it covers; where windows overlap they combine
instead of overwriting each other:

* ``"max"`` (default): a pixel shows the best score of the windows covering it. An object
  smaller than the window is seen by the few windows centred on it; a mean over all
  covering windows divides their score by the ~16 windows around it (window 64, stride 16)
  and the object fades into the background, the max keeps it at its full score over one
  window's footprint. The colour bar then reads in the classifier's own units.
* ``"mean"``: the plain average of the covering windows (a smooth map, diluted peaks).
* ``"gaussian"``: the average weighted by a gaussian centred on each window (as MONAI's
  sliding-window inference does): close to the score of the nearest window centre.

The weights are separable, so the averages are two small matrix products
``(A_y @ S @ A_x^T) / (A_y @ V @ A_x^T)`` (V: which cells hold a score) and the max is two
running maxima along the axes. Cells without a score (NaN, e.g. skipped by a mask) are left
out. Memory is O(canvas x classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from shared.jobspec import DEFAULT_WEIGHTING, WEIGHTINGS
from worker.grid import ScoreGrid


def _axis_weights(
    origins: np.ndarray, window: int, length: int, canvas: int, weighting: str, sigma_scale: float
) -> np.ndarray:
    """(canvas, len(origins)) weight of each window at each canvas pixel centre."""
    centres = (np.arange(canvas) + 0.5) * (length / canvas)  # canvas pixel centres in image pixels
    offset = centres[:, None] - origins[None, :].astype(np.float64)  # position inside each window
    inside = (offset >= 0) & (offset < window)
    if weighting == "gaussian":
        sigma = max(sigma_scale * window, 1e-6)
        weights = np.exp(-0.5 * ((offset - window / 2) / sigma) ** 2) * inside
    elif weighting in WEIGHTINGS:
        weights = inside.astype(np.float64)
    else:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}")
    # Pixels no window covers (direct mode leaves a strip narrower than the stride at the
    # far border) take the nearest window's score.
    empty = ~inside.any(axis=1)
    if empty.any():
        nearest = np.abs(offset[empty] - window / 2).argmin(axis=1)
        weights[np.flatnonzero(empty), nearest] = 1.0
    return weights


def _running_max(covers: np.ndarray, values: np.ndarray, axis: int) -> np.ndarray:
    """Max of `values` along `axis` over the windows covering each canvas pixel.

    `covers` is (canvas, windows) boolean; the windows covering one pixel are consecutive
    (origins ascend), so K steps of "first covering window + k" visit them all.
    """
    first = covers.argmax(axis=1)
    count = int(covers.sum(axis=1).max())
    last = covers.shape[1] - 1
    pixels = np.arange(covers.shape[0])
    shape = [1] * values.ndim
    shape[axis] = covers.shape[0]
    out = np.full(values.shape[:axis] + (covers.shape[0],) + values.shape[axis + 1 :], np.nan, values.dtype)
    for k in range(count):
        index = np.minimum(first + k, last)
        valid = covers[pixels, index].reshape(shape)
        out = np.fmax(out, np.where(valid, np.take(values, index, axis=axis), np.nan))  # fmax: NaN = no score
    return out


def blend(
    grid: ScoreGrid,
    image_size: tuple[int, int],
    canvas_size: tuple[int, int],
    *,
    weighting: str = DEFAULT_WEIGHTING,
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Blend the grid into a ``(canvas_h, canvas_w, classes)`` float32 map (NaN where no
    covering window has a score).

    Args:
        grid: window scores.
        image_size: ``(H, W)`` of the image the grid was computed on.
        canvas_size: ``(h, w)`` of the output map (e.g. the overlay size).
        weighting: ``"max"``, ``"mean"`` or ``"gaussian"``.
        sigma_scale: gaussian sigma as a fraction of the window side (MONAI's default).
    """
    ay = _axis_weights(grid.rows, grid.window[0], image_size[0], canvas_size[0], weighting, sigma_scale)
    ax = _axis_weights(grid.cols, grid.window[1], image_size[1], canvas_size[1], weighting, sigma_scale)
    scores = grid.scores.astype(np.float64)
    if weighting == "max":
        return _running_max(ax > 0, _running_max(ay > 0, scores, 0), 1).astype(np.float32)
    valid = ~np.isnan(scores)
    numerator = np.einsum("yi,ijk,xj->yxk", ay, np.where(valid, scores, 0.0), ax, optimize=True)
    if valid.all():
        denominator = np.outer(ay.sum(axis=1), ax.sum(axis=1))[:, :, None]  # separable weights
    else:
        denominator = np.einsum("yi,ijk,xj->yxk", ay, valid.astype(np.float64), ax, optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denominator > 1e-12, numerator / np.maximum(denominator, 1e-12), np.nan)
    return out.astype(np.float32)


#: Probability maps are coloured from 0 to at least this score, so that a class found
#: nowhere (max 0.0003) stays dark instead of having its noise stretched to full colour.
PROBABILITY_FLOOR = 0.1
#: A class whose scores vary by less than this fraction of the score scale (1 for
#: probabilities; else the range of all the job's scores) is "near chance": an untrained or
#: unsure model, whose map would be stretched to full brightness by its own range.
CHANCE_FRACTION = 0.1
#: The brightest a near-chance map is drawn (0..1 of the colour ramp): visibly dim.
DIM_BRIGHTNESS = 0.4


@dataclass(frozen=True)
class ColourScale:
    """The scores one class's colours span, the same in the PNG overlay, the viewer's heat
    layer and its colour bar (issue 19: they differed, 0.352-0.418 against 0.000-0.418)."""

    low: float
    high: float
    near_chance: bool


#: Heat maps are blended at HEAT_PIXELS_PER_STRIDE pixels per grid stride (mean blending
#: changes value only at stride steps), at most HEAT_MAX_SIDE on the long side: the viewer's
#: heat layers, and the canvas every colour scale is measured on.
HEAT_PIXELS_PER_STRIDE = 4
HEAT_MAX_SIDE = 2048


def heat_canvas(image_size: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the heat canvas for an image of (height, width) `image_size`."""
    height, width = image_size
    scale = min(1.0, HEAT_PIXELS_PER_STRIDE / max(1, min(stride)))
    long_side = min(HEAT_MAX_SIDE, max(1, round(max(height, width) * scale)))
    scale = min(1.0, long_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def colour_scales(grid: ScoreGrid, image_size: tuple[int, int], weighting: str = DEFAULT_WEIGHTING) -> list:
    """Each class's `ColourScale`, measured once on the heat canvas (not on each picture's
    own canvas, whose blended range depends on its size): the blended map's own range, so
    that its hottest place is the brightest whatever the blending did to its peak;
    probabilities from 0 and at least to PROBABILITY_FLOOR. A class whose window scores are
    near chance is drawn from its minimum, its range at DIM_BRIGHTNESS of the ramp at most."""
    maps = blend(grid, image_size, heat_canvas(image_size, grid.stride), weighting=weighting)
    finite = grid.scores[np.isfinite(grid.scores)]
    probabilities = finite.size == 0 or (float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0)
    score_scale = 1.0 if probabilities else float(finite.max() - finite.min())
    scales = []
    for channel in range(grid.scores.shape[2]):
        plane = grid.scores[:, :, channel]
        plane = plane[np.isfinite(plane)]
        drawn = maps[:, :, channel]
        drawn = drawn[np.isfinite(drawn)]
        least, most = (float(drawn.min()), float(drawn.max())) if drawn.size else (0.0, 0.0)
        low, high = (0.0, max(most, PROBABILITY_FLOOR)) if probabilities else (least, most)
        near_chance = bool(plane.size) and float(plane.max() - plane.min()) < CHANCE_FRACTION * score_scale
        if near_chance:
            low, high = least, max(least + (most - least) / DIM_BRIGHTNESS, high)
        scales.append(ColourScale(low, high, near_chance))
    return scales


@dataclass(frozen=True)
class ClassHeat:
    """What a person sees: each class's blended map scaled to its own score range.

    ``values[..., c]`` is 0 at ``low[c]`` and 1 at ``high[c]`` (NaN where no window has a
    score); the legend of an overlay states ``low``/``high`` in score units.
    """

    values: np.ndarray  # (h, w, classes) float32
    low: tuple[float, ...]
    high: tuple[float, ...]
    weighting: str
    near_chance: tuple[bool, ...] = ()


def class_heat(
    grid: ScoreGrid,
    image_size: tuple[int, int],
    canvas_size: tuple[int, int],
    *,
    weighting: str = DEFAULT_WEIGHTING,
    ranges: list[tuple[float, float]] | None = None,
    scales: list[ColourScale] | None = None,
) -> ClassHeat:
    """Blend, then scale each class to its colour scale (`colour_scales`, the one the viewer
    uses too; given as `scales`, or computed), or to `ranges` (e.g. the overlay's, read back
    from summary.json)."""
    maps = blend(grid, image_size, canvas_size, weighting=weighting)
    if ranges is not None:
        scales = [ColourScale(float(low), float(high), False) for low, high in ranges]
    elif scales is None:
        scales = colour_scales(grid, image_size, weighting)
    values = np.empty_like(maps)
    for channel, scale in enumerate(scales):
        values[:, :, channel] = scaled(maps[:, :, channel], scale)
    return ClassHeat(
        values,
        tuple(s.low for s in scales),
        tuple(s.high for s in scales),
        weighting,
        tuple(s.near_chance for s in scales),
    )


def scaled(plane: np.ndarray, scale: ColourScale) -> np.ndarray:
    """A blended map on its colour scale: 0 at `low`, 1 at `high`, clipped (NaN kept)."""
    span = scale.high - scale.low
    if span > 0:
        return np.clip((plane - scale.low) / span, 0.0, 1.0)
    return np.where(np.isnan(plane), plane, 0.0)


@dataclass(frozen=True)
class Peak:
    """A local maximum of one class's score grid: the centre of its window, in image pixels."""

    x: int
    y: int
    score: float


def class_peaks(grid: ScoreGrid, channel: int, *, min_fraction: float = 0.5, limit: int = 20) -> list[Peak]:
    """The strongest local maxima of one class, best first, at least one window apart.

    A cell is a peak when no cell within one window (``window / stride`` cells each way)
    scores higher, and its score is in the top half (`min_fraction`) of the class's range:
    on a scene each object of the class gets its own marker, the noise floor none.
    """
    plane = np.where(np.isnan(grid.scores[:, :, channel]), -np.inf, grid.scores[:, :, channel]).astype(np.float64)
    if not np.isfinite(plane).any():
        return []
    reach = [max(1, int(w) // max(1, int(s))) for w, s in zip(grid.window, grid.stride, strict=True)]
    padded = np.pad(plane, [(reach[0], reach[0]), (reach[1], reach[1])], constant_values=-np.inf)
    local = sliding_window_view(padded, 2 * reach[0] + 1, axis=0).max(axis=-1)
    local = sliding_window_view(local, 2 * reach[1] + 1, axis=1).max(axis=-1)
    finite = plane[np.isfinite(plane)]
    threshold = finite.min() + min_fraction * (finite.max() - finite.min())
    candidates = np.argwhere((plane >= local) & (plane >= threshold) & np.isfinite(plane))
    order = np.argsort(-plane[candidates[:, 0], candidates[:, 1]], kind="stable")
    kept: list[tuple[int, int]] = []
    for i, j in candidates[order]:
        if all(abs(i - a) > reach[0] or abs(j - b) > reach[1] for a, b in kept):  # plateaus: one marker
            kept.append((int(i), int(j)))
            if len(kept) == limit:
                break
    return [
        Peak(
            x=int(grid.cols[j]) + grid.window[1] // 2,
            y=int(grid.rows[i]) + grid.window[0] // 2,
            score=float(plane[i, j]),
        )
        for i, j in kept
    ]
