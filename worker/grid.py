"""The result of both inference modes: class scores on a grid of windows.

Cell ``(i, j)`` holds the classifier's scores for the native window whose top-left pixel is
``(rows[i], cols[j])``. Direct mode's grid is regular (``stride`` apart); tiled mode's last
row and column are pulled flush with the image border, so ``rows``/``cols`` are explicit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# progress(done, total): called after every unit of work (a trunk tile or a batch of windows).
# It may raise (e.g. JobCanceled) to stop the computation between units.
ProgressFn = Callable[[int, int], None]


@dataclass
class ScoreGrid:
    scores: np.ndarray  # (rows, cols, classes) float32
    rows: np.ndarray  # (rows,) int, top pixel of each window row
    cols: np.ndarray  # (cols,) int, left pixel of each window column
    window: tuple[int, int]  # (h, w) of a window in pixels
    stride: tuple[int, int]  # nominal stride between windows
    class_indices: np.ndarray  # (classes,) model output index of each score channel

    def select(self, class_indices) -> ScoreGrid:
        """Keep only the given model output indices (in that order)."""
        wanted = np.asarray(class_indices, dtype=np.int64)
        position = {int(c): k for k, c in enumerate(self.class_indices)}
        take = [position[int(c)] for c in wanted]
        return ScoreGrid(
            np.ascontiguousarray(self.scores[:, :, take]), self.rows, self.cols, self.window, self.stride, wanted
        )

    def peak(self, channel: int) -> tuple[int, int, float]:
        """(y, x, score) of the best window's centre for score channel `channel`."""
        plane = self.scores[:, :, channel]
        i, j = np.unravel_index(int(np.argmax(plane)), plane.shape)
        y = int(self.rows[i]) + self.window[0] // 2
        x = int(self.cols[j]) + self.window[1] // 2
        return y, x, float(plane[i, j])


def report(progress: ProgressFn | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)
