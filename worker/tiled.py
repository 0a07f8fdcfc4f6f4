"""Tiled (sliding-window) inference: the original classifier on native-size windows.

Exactly the pretrained model's semantics per window, at one full forward per window.
Windows are cut at a chosen stride with the last row and column pulled flush with the image
border (no pixel left uncovered), batched (never one ``predict`` per window), and their
scores kept as a grid: memory is O(windows x classes), never H x W x classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

from worker.grid import ProgressFn, ScoreGrid, report


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


def tiled_inference(
    classifier: keras.Model,
    image: np.ndarray,
    preprocess: Callable[[np.ndarray], np.ndarray],
    *,
    window: tuple[int, int],
    stride: tuple[int, int] | int | None = None,
    batch_size: int = 32,
    class_indices: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
) -> ScoreGrid:
    """Run `classifier` on every window of a grid and return the score grid.

    Args:
        classifier: the original Keras classifier (input = one native window).
        image: ``(H, W, C)`` uint8 pixels; windows are preprocessed batch by batch.
        preprocess: maps uint8 windows ``(B, h, w, C)`` to the model's float32 input.
        window: native ``(h, w)`` of the classifier.
        stride: pixels between windows, ``(sy, sx)`` or one int; default half the window.
        batch_size: windows per forward call. The last batch is not padded (padding
            would compute throw-away windows); Keras' predict function relaxes its batch
            dimension after a second shape, so traces stay bounded.
        class_indices: keep only these model outputs (all when None).
        progress: ``progress(done, total)`` after each batch; may raise to stop.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    if stride is None:
        stride = (max(1, window[0] // 2), max(1, window[1] // 2))
    elif isinstance(stride, int):
        stride = (stride, stride)
    height, width = image.shape[:2]
    rows = window_origins(height, window[0], stride[0])
    cols = window_origins(width, window[1], stride[1])
    selection = None if class_indices is None else np.asarray(class_indices, dtype=np.int64)

    positions = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    batches = [positions[k : k + batch_size] for k in range(0, len(positions), batch_size)]
    scores = None
    batch = np.zeros((batch_size, window[0], window[1], image.shape[2]), dtype=np.uint8)
    for done, members in enumerate(batches, start=1):
        for slot, (i, j) in enumerate(members):
            batch[slot] = image[rows[i] : rows[i] + window[0], cols[j] : cols[j] + window[1]]
        out = keras.ops.convert_to_numpy(classifier.predict_on_batch(preprocess(batch[: len(members)])))
        if selection is not None:
            out = out[:, selection]
        if scores is None:
            scores = np.empty((len(rows), len(cols), out.shape[1]), dtype=np.float32)
        for slot, (i, j) in enumerate(members):
            scores[i, j] = out[slot]
        report(progress, done, len(batches))
    num_classes = scores.shape[2]
    return ScoreGrid(
        scores=scores,
        rows=rows,
        cols=cols,
        window=tuple(window),
        stride=tuple(stride),
        class_indices=np.arange(num_classes, dtype=np.int64) if selection is None else selection,
    )
