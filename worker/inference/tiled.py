"""Tiled (sliding-window) inference: the original classifier on native-size windows.

Exactly the pretrained model's semantics per window, at one full forward per window.
Windows are cut at a chosen stride with the last row and column pulled flush with the image
border (no pixel left uncovered), batched (never one ``predict`` per window; each batch is
one compiled call, ``worker.inference.compiled_calls``), and their scores kept as a grid:
memory is O(windows x classes), never H x W x classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

from worker.grid import KeepFn, ProgressFn, ScoreGrid, report
from worker.inference.analysis_raster import Raster, as_raster
from worker.inference.compiled_calls import compiled_call, compiled_calls_enabled


def window_origins(length: int, window: int, stride: int) -> np.ndarray:
    """Top-left coordinates along one axis; the last window ends exactly at `length`."""
    if stride <= 0:
        raise ValueError("stride must be a positive number of pixels")
    if length < window:
        raise ValueError(f"image side {length} is smaller than the window {window}")
    origins = list(range(0, length - window + 1, stride))
    if origins[-1] != length - window:
        origins.append(length - window)
    return np.asarray(origins, dtype=np.int64)


#: Width (pixels) of the column blocks windows are visited in, so one batch's windows lie
#: close together and are read as one region.
BLOCK_WIDTH = 2048


def tiled_inference(
    classifier: keras.Model,
    image: np.ndarray | Raster,
    preprocess: Callable[[np.ndarray], np.ndarray],
    *,
    window: tuple[int, int],
    stride: tuple[int, int] | int | None = None,
    batch_size: int = 32,
    class_indices: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
    keep: KeepFn | None = None,
) -> ScoreGrid:
    """Run `classifier` on every window of a grid and return the score grid.

    Args:
        classifier: the original Keras classifier (input = one native window).
        image: ``(H, W, C)`` uint8 pixels or a raster; each batch reads the one region
            that holds its windows and drops it after.
        preprocess: maps uint8 windows ``(B, h, w, C)`` to the model's float32 input.
        window: native ``(h, w)`` of the classifier.
        stride: pixels between windows, ``(sy, sx)`` or one int; default half the window.
        batch_size: windows per forward call. The last batch is not padded (padding
            would compute throw-away windows); each batch runs as a function compiled for
            its shape (``worker.inference.compiled_calls``): two shapes per job at most.
        class_indices: keep only these model outputs (all when None).
        progress: ``progress(done, total)`` after each batch; may raise to stop.
        keep: ``keep(rows, cols, window) -> bool grid``: windows to compute; the others are NaN.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    if stride is None:
        stride = (max(1, window[0] // 2), max(1, window[1] // 2))
    elif isinstance(stride, int):
        stride = (stride, stride)
    raster = as_raster(image)
    rows = window_origins(raster.height, window[0], stride[0])
    cols = window_origins(raster.width, window[1], stride[1])
    computed = None if keep is None else np.asarray(keep(rows, cols, tuple(window)), dtype=bool)
    selection = None if class_indices is None else np.asarray(class_indices, dtype=np.int64)
    positions = _visit_order(rows, cols, computed)
    batches = [positions[k : k + batch_size] for k in range(0, len(positions), batch_size)]
    scores = _score_batches(classifier, raster, preprocess, batches, (rows, cols, tuple(window)), selection, progress)
    num_classes = scores.shape[2]
    return ScoreGrid(
        scores=scores,
        rows=rows,
        cols=cols,
        window=tuple(window),
        stride=tuple(stride),
        class_indices=np.arange(num_classes, dtype=np.int64) if selection is None else selection,
        computed=computed,
        tiles_read=len(batches),
    )


def _score_batches(classifier, raster: Raster, preprocess, batches, geometry, selection, progress) -> np.ndarray:
    """(rows, cols, classes) scores, NaN where no batch computed a window."""
    rows, cols, window = geometry
    channels = raster.read(0, 1, 0, 1).shape[-1]
    outputs = int(classifier.compute_output_shape((1, *window, channels))[-1])
    width = outputs if selection is None else len(selection)
    scores = np.full((len(rows), len(cols), width), np.nan, dtype=np.float32)

    def classify(batch):
        return classifier(batch, training=False)

    for done, members in enumerate(batches, start=1):
        batch = preprocess(_read_batch(raster, members, rows, cols, window))
        if compiled_calls_enabled():
            out = keras.ops.convert_to_numpy(compiled_call(classifier, "classify", classify, batch))
        else:  # JAX (or compiled calls off): Keras' own compiled predict step
            out = keras.ops.convert_to_numpy(classifier.predict_on_batch(batch))
        scores[members[:, 0], members[:, 1]] = out if selection is None else out[:, selection]
        report(progress, done, len(batches))
    return scores


def _visit_order(rows: np.ndarray, cols: np.ndarray, computed: np.ndarray | None) -> np.ndarray:
    """(n, 2) window indices (i, j) to compute, column block by block, then row-major."""
    grid_i, grid_j = np.meshgrid(np.arange(len(rows)), np.arange(len(cols)), indexing="ij")
    block = cols[grid_j] // BLOCK_WIDTH
    order = np.lexsort((grid_j.ravel(), grid_i.ravel(), block.ravel()))
    positions = np.stack([grid_i.ravel()[order], grid_j.ravel()[order]], axis=1)
    if computed is not None:
        positions = positions[computed[positions[:, 0], positions[:, 1]]]
    return positions


def _read_batch(raster: Raster, members: np.ndarray, rows, cols, window) -> np.ndarray:
    """The batch's windows, cut from one region read around them."""
    tops, lefts = rows[members[:, 0]], cols[members[:, 1]]
    y0, x0 = int(tops.min()), int(lefts.min())
    region = raster.read(y0, int(tops.max()) + window[0], x0, int(lefts.max()) + window[1])
    batch = np.empty((len(members), window[0], window[1], region.shape[2]), dtype=np.uint8)
    for slot, (top, left) in enumerate(zip(tops - y0, lefts - x0, strict=True)):
        batch[slot] = region[top : top + window[0], left : left + window[1]]
    return batch
