"""Checks on the bundled ``shapes`` model (models/shapes.keras + shapes.json).

Why this file exists: the service's offline tests and demo rely on this committed model
producing heatmaps that mean something.  These tests verify, with the ORIGINAL classifier
and plain numpy only (no FCN conversion, no service code), that the artifact is consistent
with its sidecar, that it classifies fresh synthetic crops, and that a sliding-window pass
over a synthetic scene peaks on each object.  If they fail after a change to
``shapes/scenes.py``, retrain with ``python -m shapes.train --out models``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from shapes.scenes import OBJECT_CLASSES, SHAPE_CLASSES, WINDOW, generate_scene, make_crop, textured_background

keras = pytest.importorskip("keras")

ROOT = Path(__file__).resolve().parents[2]
MODEL_PATH = ROOT / "models" / "shapes.keras"
SIDECAR_PATH = ROOT / "models" / "shapes.json"


def _preprocess(x: np.ndarray) -> np.ndarray:
    """The sidecar's "tf" preprocessing: [0, 255] -> [-1, 1]."""
    return np.asarray(x, dtype=np.float32) / 127.5 - 1.0


def _predict(model, x_uint8: np.ndarray, batch: int = 256) -> np.ndarray:
    out = [
        np.asarray(model(_preprocess(x_uint8[i : i + batch]), training=False)) for i in range(0, len(x_uint8), batch)
    ]
    return np.concatenate(out)


@pytest.fixture(scope="module")
def sidecar() -> dict:
    return json.loads(SIDECAR_PATH.read_text())


@pytest.fixture(scope="module")
def model():
    return keras.saving.load_model(MODEL_PATH, compile=False)


def test_sidecar_matches_model(sidecar, model):
    assert MODEL_PATH.stat().st_size < 3 * 1024 * 1024
    assert sidecar["name"] == "shapes"
    assert tuple(sidecar["classes"]) == SHAPE_CLASSES
    assert sidecar["preprocess"] == "tf"
    assert model.output_shape[-1] == len(sidecar["classes"])
    assert list(model.input_shape[1:3]) == list(sidecar["input_size"]) == [WINDOW, WINDOW]
    assert model.input_shape[-1] == 3
    # The FCN converter relies on a plain conv trunk and a Flatten + Dense head.
    kinds = {type(layer).__name__ for layer in model.layers}
    assert kinds <= {"Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dropout", "InputLayer"}, kinds
    assert not any("Rescaling" in k or "BatchNormalization" in k for k in kinds)
    assert sidecar["training"]["heldout_accuracy"] >= 0.95


def test_heldout_accuracy(model):
    rng = np.random.default_rng(20240607)
    n_per_class = 60  # 300 crops
    y = np.repeat(np.arange(len(SHAPE_CLASSES)), n_per_class)
    x = np.stack([make_crop(SHAPE_CLASSES[k], WINDOW, rng) for k in y])
    pred = _predict(model, x).argmax(axis=1)
    acc = float((pred == y).mean())
    per_class = {name: float((pred[y == k] == k).mean()) for k, name in enumerate(SHAPE_CLASSES)}
    assert acc >= 0.9, per_class
    assert min(per_class.values()) >= 0.8, per_class


def _sliding_scores(model, image: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class scores of every WINDOW x WINDOW window at ``stride``: (rows, cols, classes),
    plus the window-centre x and y coordinates of columns and rows."""
    views = np.lib.stride_tricks.sliding_window_view(image, (WINDOW, WINDOW, 3))[::stride, ::stride, 0]
    rows, cols = views.shape[:2]
    windows = views.reshape(rows * cols, WINDOW, WINDOW, 3)
    scores = np.empty((rows * cols, len(SHAPE_CLASSES)), np.float32)
    for i in range(0, len(windows), 256):
        batch = np.ascontiguousarray(windows[i : i + 256])
        scores[i : i + 256] = np.asarray(model.predict_on_batch(_preprocess(batch)))
    xs = np.arange(cols) * stride + (WINDOW - 1) / 2
    ys = np.arange(rows) * stride + (WINDOW - 1) / 2
    return scores.reshape(rows, cols, -1), xs, ys


@pytest.mark.parametrize("seed", [7, 2024])
def test_sliding_window_peaks_on_objects(model, seed):
    t0 = time.perf_counter()
    image, objects = generate_scene(640, 480, n_objects=4, seed=seed, labels=OBJECT_CLASSES)
    assert sorted(o.label for o in objects) == sorted(OBJECT_CLASSES)
    scores, xs, ys = _sliding_scores(model, image, stride=8)

    for obj in objects:
        k = SHAPE_CLASSES.index(obj.label)
        r, c = np.unravel_index(np.argmax(scores[:, :, k]), scores.shape[:2])
        assert obj.contains(xs[c], ys[r], margin=4), (obj, (xs[c], ys[r]), float(scores[r, c, k]))
        assert scores[r, c, k] > 0.5, (obj, float(scores[r, c, k]))

    # Far from every object the windows should mostly be called background.
    cx, cy = np.meshgrid(xs, ys)
    far = np.ones(cx.shape, bool)
    for obj in objects:
        far &= np.hypot(cx - obj.center[0], cy - obj.center[1]) > WINDOW
    false_pos = (scores.argmax(axis=2) != 0) & far
    assert false_pos.sum() <= 0.02 * far.sum(), int(false_pos.sum())
    assert time.perf_counter() - t0 < 60


def test_scene_generator_contract():
    image, objects = generate_scene(640, 480, n_objects=5, seed=11)
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    assert len(objects) == 5
    for i, a in enumerate(objects):
        x0, y0, x1, y1 = a.bbox
        assert x0 >= 32 and y0 >= 32 and x1 <= 640 - 32 and y1 <= 480 - 32, a
        assert a.contains(*a.center) and not a.contains(x1 + 10, y1 + 10, margin=4)
        for b in objects[i + 1 :]:
            assert np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1]) >= 1.5 * WINDOW
    # Deterministic for a given seed.
    again, objects2 = generate_scene(640, 480, n_objects=5, seed=11)
    assert objects2 == objects and np.array_equal(again, image)
    with pytest.raises(ValueError):
        generate_scene(200, 200, n_objects=30, seed=1)

    rng = np.random.default_rng(0)
    assert textured_background(37, 53, rng).shape == (37, 53, 3)
    for label in SHAPE_CLASSES:
        crop = make_crop(label, WINDOW, rng)
        assert crop.shape == (WINDOW, WINDOW, 3) and crop.dtype == np.uint8
