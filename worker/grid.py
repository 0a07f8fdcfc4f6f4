"""The result of both inference modes: class scores on a grid of windows.

Cell ``(i, j)`` holds the classifier's scores for the native window whose top-left pixel is
``(rows[i], cols[j])``. Direct mode's grid is regular (``stride`` apart); tiled mode's last
row and column are pulled flush with the image border, so ``rows``/``cols`` are explicit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

# progress(done, total): called after every unit of work (a trunk tile or a batch of windows).
# It may raise (e.g. JobCanceled) to stop the computation between units.
ProgressFn = Callable[[int, int], None]
# keep(rows, cols, window) -> bool (len(rows), len(cols)): the windows worth computing (a mask).
KeepFn = Callable[[np.ndarray, np.ndarray, tuple[int, int]], np.ndarray]


@dataclass
class ScoreGrid:
    scores: np.ndarray  # (rows, cols, classes) float32
    rows: np.ndarray  # (rows,) int, top pixel of each window row
    cols: np.ndarray  # (cols,) int, left pixel of each window column
    window: tuple[int, int]  # (h, w) of a window in pixels
    stride: tuple[int, int]  # nominal stride between windows
    class_indices: np.ndarray  # (classes,) model output index of each score channel
    computed: np.ndarray | None = None  # (rows, cols) bool: windows computed (None: all); others NaN
    tiles_read: int = 0  # units of work done (trunk tiles or window batches)
    tiles_skipped: int = 0  # units a mask made unnecessary (never read)
    scheme: str | None = None  # direct mode: "rows" or "tiles" (worker.inference.direct); None in tiled mode
    halo_overhead: float | None = None  # direct mode: trunk pixels computed / image pixels (halos recomputed)
    tile_raised_for_halo: bool = False  # direct mode: tiles made larger than the budget so halos do not dominate

    def select(self, class_indices) -> ScoreGrid:
        """Keep only the given model output indices (in that order)."""
        wanted = np.asarray(class_indices, dtype=np.int64)
        position = {int(c): k for k, c in enumerate(self.class_indices)}
        take = [position[int(c)] for c in wanted]
        return replace(self, scores=np.ascontiguousarray(self.scores[:, :, take]), class_indices=wanted)

    def in_level0(self, scale: tuple[float, float]) -> ScoreGrid:
        """The same grid with rows, cols, window and stride in level-0 pixels."""
        if scale == (1.0, 1.0):
            return self
        sy, sx = scale
        return replace(
            self,
            rows=np.rint(self.rows * sy).astype(np.int64),
            cols=np.rint(self.cols * sx).astype(np.int64),
            window=(round(self.window[0] * sy), round(self.window[1] * sx)),
            stride=(round(self.stride[0] * sy), round(self.stride[1] * sx)),
        )

    def without_nan(self) -> ScoreGrid:
        """Masked (NaN) windows as score 0, for pictures that cannot show gaps."""
        if self.computed is None:
            return self
        return replace(self, scores=np.nan_to_num(self.scores, nan=0.0))

    def peak(self, channel: int) -> tuple[int, int, float]:
        """(y, x, score) of the best window's centre for score channel `channel`."""
        plane = self.scores[:, :, channel]
        if np.isnan(plane).all():
            return -1, -1, float("nan")
        i, j = np.unravel_index(int(np.nanargmax(plane)), plane.shape)
        y = int(self.rows[i]) + self.window[0] // 2
        x = int(self.cols[j]) + self.window[1] // 2
        return y, x, float(plane[i, j])


def report(progress: ProgressFn | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)
