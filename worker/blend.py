"""Per-pixel maps from a score grid, at a chosen (usually reduced) resolution.

Each window spreads its score over the pixels it covers; where windows overlap the scores
are averaged (``"mean"``) or weighted by a gaussian centred on each window (``"gaussian"``,
as MONAI's sliding-window inference does), so overlapping windows combine instead of
overwriting each other. Window weights are separable, which turns the blend into two small
matrix products: ``(A_y @ S @ A_x^T) / (A_y @ 1 @ A_x^T)``. Memory is O(canvas x classes).
"""

from __future__ import annotations

import numpy as np

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
    elif weighting == "mean":
        weights = inside.astype(np.float64)
    else:
        raise ValueError("weighting must be 'mean' or 'gaussian'")
    # Pixels no window covers (direct mode leaves a strip narrower than the stride at the
    # far border) take the nearest window's score.
    empty = ~inside.any(axis=1)
    if empty.any():
        nearest = np.abs(offset[empty] - window / 2).argmin(axis=1)
        weights[np.flatnonzero(empty), nearest] = 1.0
    return weights


def blend(
    grid: ScoreGrid,
    image_size: tuple[int, int],
    canvas_size: tuple[int, int],
    *,
    weighting: str = "mean",
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Blend the grid into a ``(canvas_h, canvas_w, classes)`` float32 map.

    Args:
        grid: window scores.
        image_size: ``(H, W)`` of the image the grid was computed on.
        canvas_size: ``(h, w)`` of the output map (e.g. the overlay size).
        weighting: ``"mean"`` or ``"gaussian"``.
        sigma_scale: gaussian sigma as a fraction of the window side (MONAI's default).
    """
    ay = _axis_weights(grid.rows, grid.window[0], image_size[0], canvas_size[0], weighting, sigma_scale)
    ax = _axis_weights(grid.cols, grid.window[1], image_size[1], canvas_size[1], weighting, sigma_scale)
    scores = grid.scores.astype(np.float64)
    numerator = np.einsum("yi,ijk,xj->yxk", ay, scores, ax, optimize=True)
    denominator = np.outer(ay.sum(axis=1), ax.sum(axis=1))  # separable weights
    return (numerator / np.maximum(denominator, 1e-12)[:, :, None]).astype(np.float32)
