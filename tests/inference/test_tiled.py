"""Tiled mode (worker.inference.tiled) and blending (worker.outputs.blend): the original classifier on batched
native windows with the last row/column flush with the border; overlapping windows are
averaged (or gaussian-weighted) into a per-pixel map.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")
layers = keras.layers

from call_counter import record_call  # noqa: E402 (tests/ is on sys.path)

from worker.grid import ScoreGrid  # noqa: E402
from worker.inference.preprocess import get_preprocess  # noqa: E402
from worker.inference.tiled import tiled_inference, window_origins  # noqa: E402
from worker.outputs.blend import blend  # noqa: E402

TF = get_preprocess("tf")
WINDOW = (32, 28)


def random_image(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def classifier():
    """A small classifier with 'same' padding (so crops differ from FCN cells) and logits."""
    keras.utils.set_random_seed(11)
    return keras.Sequential(
        [
            keras.Input((*WINDOW, 3)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(4),
        ]
    )


class CountingClassifier:
    """Wraps a model; records the shape of every forward call as it runs.

    On TensorFlow the engine calls the classifier inside a compiled function, where Python
    runs only at trace time: ``call_counter.record_call`` records in the graph, so each
    execution (not each trace) is counted. Elsewhere the engine uses ``predict_on_batch``.
    """

    def __init__(self, model):
        self.model = model
        self.shapes = []

    def __call__(self, x, training=False):  # the compiled batch call (TensorFlow)
        record_call(self.shapes.append, x)
        return self.model(x, training=training)

    def predict_on_batch(self, x):  # JAX, or compiled calls switched off
        self.shapes.append(tuple(np.shape(x)))
        return self.model.predict_on_batch(x)

    def __getattr__(self, name):  # everything else (output shapes...) is the model's
        return getattr(self.model, name)


def reference_scores(model, image, rows, cols, window):
    crops = np.stack([image[r : r + window[0], c : c + window[1]] for r in rows for c in cols])
    return model.predict(TF(crops), verbose=0).reshape(len(rows), len(cols), -1)


# --------------------------------------------------------------------------- window_origins


@pytest.mark.parametrize(
    "length,window,stride",
    [
        (75, 32, 10),
        (64, 32, 32),
        (64, 32, 16),
        (33, 32, 5),
        (32, 32, 7),
        (100, 28, 1),
        (101, 28, 28),
    ],
)
def test_window_origins_cover_every_pixel_and_end_flush(length, window, stride):
    # (stride <= window, as validate_params enforces; a larger stride leaves gaps by design)
    origins = window_origins(length, window, stride)
    assert origins[0] == 0
    assert origins[-1] == length - window, "last window must end exactly at the border"
    assert np.all(np.diff(origins) > 0)
    assert np.all(np.diff(origins) <= stride)
    covered = np.zeros(length, dtype=int)
    for o in origins:
        covered[o : o + window] += 1
    assert covered.min() >= 1, "every pixel must be inside some window"
    # Regular origins except (possibly) the flush one.
    np.testing.assert_array_equal(origins[:-1], np.arange(len(origins) - 1) * stride)


@pytest.mark.parametrize("stride", [0, -1, -32])
def test_window_origins_rejects_non_positive_stride(stride):
    with pytest.raises(ValueError, match="stride"):
        window_origins(100, 32, stride)


def test_window_origins_rejects_short_axis():
    with pytest.raises(ValueError):
        window_origins(31, 32, 8)


# --------------------------------------------------------------------------- tiled_inference


def test_tiled_scores_equal_classifier_on_crops(classifier):
    image = random_image(75, 90, seed=1)
    grid = tiled_inference(classifier, image, TF, window=WINDOW, stride=(10, 12), batch_size=7)
    np.testing.assert_array_equal(grid.rows, [0, 10, 20, 30, 40, 43])
    np.testing.assert_array_equal(grid.cols, [0, 12, 24, 36, 48, 60, 62])
    expected = reference_scores(classifier, image, grid.rows, grid.cols, WINDOW)
    assert grid.scores.shape == expected.shape == (6, 7, 4)
    assert float(expected.std()) > 1e-3 * float(np.abs(expected).max())
    np.testing.assert_allclose(grid.scores, expected, atol=1e-5, rtol=1e-5)
    # The flush last row/column really is the bottom-right crop.
    last = classifier.predict(TF(image[None, -32:, -28:]), verbose=0)[0]
    np.testing.assert_allclose(grid.scores[-1, -1], last, atol=1e-5, rtol=1e-5)
    assert grid.window == WINDOW
    assert tuple(grid.stride) == (10, 12)
    np.testing.assert_array_equal(grid.class_indices, np.arange(4))


def test_default_stride_is_half_window(classifier):
    image = random_image(64, 56, seed=2)
    grid = tiled_inference(classifier, image, TF, window=WINDOW)
    np.testing.assert_array_equal(grid.rows, [0, 16, 32])
    np.testing.assert_array_equal(grid.cols, [0, 14, 28])


def test_int_stride_and_exact_window_image(classifier):
    image = random_image(32, 28, seed=3)
    grid = tiled_inference(classifier, image, TF, window=WINDOW, stride=5)
    assert grid.scores.shape == (1, 1, 4)
    np.testing.assert_allclose(
        grid.scores[0, 0], classifier.predict(TF(image[None]), verbose=0)[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("batch_size", [0, -3])
def test_non_positive_batch_size_raises(classifier, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        tiled_inference(classifier, random_image(40, 40), TF, window=WINDOW, stride=8, batch_size=batch_size)


def test_image_smaller_than_window_raises(classifier):
    with pytest.raises(ValueError):
        tiled_inference(classifier, random_image(31, 60), TF, window=WINDOW, stride=8)
    with pytest.raises(ValueError):
        tiled_inference(classifier, random_image(60, 27), TF, window=WINDOW, stride=8)


def test_results_independent_of_batch_size(classifier):
    image = random_image(70, 61, seed=4)
    results = [tiled_inference(classifier, image, TF, window=WINDOW, stride=9, batch_size=b).scores for b in (1, 3, 64)]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_classifier_called_once_per_batch(classifier, batch_size):
    image = random_image(70, 61, seed=5)
    counting = CountingClassifier(classifier)
    progress = []
    grid = tiled_inference(
        counting,
        image,
        TF,
        window=WINDOW,
        stride=9,
        batch_size=batch_size,
        progress=lambda done, total: progress.append((done, total)),
    )
    windows = len(window_origins(70, 32, 9)) * len(window_origins(61, 28, 9))
    assert grid.scores.shape[:2] == (len(window_origins(70, 32, 9)), len(window_origins(61, 28, 9)))
    batches = math.ceil(windows / batch_size)
    assert len(counting.shapes) == batches
    # Full batches, and a last one with only the windows that are left (no padding work).
    assert counting.shapes[:-1] == [(batch_size, 32, 28, 3)] * (batches - 1)
    assert counting.shapes[-1] == (windows - (batches - 1) * batch_size, 32, 28, 3)
    assert progress == [(k, batches) for k in range(1, batches + 1)]


def test_progress_exception_stops(classifier):
    class Stop(Exception):
        pass

    counting = CountingClassifier(classifier)

    def progress(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        tiled_inference(counting, random_image(70, 61), TF, window=WINDOW, stride=9, batch_size=3, progress=progress)
    assert len(counting.shapes) == 2


def test_class_indices_select_channels(classifier):
    image = random_image(50, 50, seed=6)
    full = tiled_inference(classifier, image, TF, window=WINDOW, stride=6)
    picked = tiled_inference(classifier, image, TF, window=WINDOW, stride=6, class_indices=[2, 0])
    np.testing.assert_array_equal(picked.class_indices, [2, 0])
    np.testing.assert_allclose(picked.scores, full.scores[..., [2, 0]], atol=1e-6)
    np.testing.assert_allclose(full.select([2, 0]).scores, picked.scores, atol=1e-6)


# --------------------------------------------------------------------------- blending


def brute_force_blend(grid, image_size, canvas_size):
    """Average, at each canvas pixel centre, the scores of all windows containing it."""
    height, width = image_size
    out = np.zeros((*canvas_size, grid.scores.shape[2]))
    count = np.zeros(canvas_size, dtype=int)
    for cy in range(canvas_size[0]):
        py = (cy + 0.5) * height / canvas_size[0]
        for cx in range(canvas_size[1]):
            px = (cx + 0.5) * width / canvas_size[1]
            for i, r in enumerate(grid.rows):
                if not r <= py < r + grid.window[0]:
                    continue
                for j, c in enumerate(grid.cols):
                    if c <= px < c + grid.window[1]:
                        out[cy, cx] += grid.scores[i, j]
                        count[cy, cx] += 1
    return out, count


def small_grid(image_size=(23, 19), window=(8, 6), stride=(5, 4), classes=3, seed=0):
    rows = window_origins(image_size[0], window[0], stride[0])
    cols = window_origins(image_size[1], window[1], stride[1])
    scores = np.random.RandomState(seed).normal(size=(len(rows), len(cols), classes)).astype(np.float32)
    return ScoreGrid(scores, rows, cols, window, stride, np.arange(classes))


@pytest.mark.parametrize("canvas", [(23, 19), (11, 7), (46, 38)])
def test_mean_blend_equals_brute_force(canvas):
    grid = small_grid()
    out = blend(grid, (23, 19), canvas, weighting="mean")
    expected, count = brute_force_blend(grid, (23, 19), canvas)
    assert count.min() >= 1, "every canvas pixel must be covered by a window"
    assert out.shape == (*canvas, 3)
    np.testing.assert_allclose(out, expected / count[:, :, None], atol=1e-5)


def test_mean_blend_combines_overlaps_instead_of_overwriting():
    # Two windows overlapping in x: pixels in the overlap get the average of both.
    grid = ScoreGrid(
        np.array([[[0.0], [1.0]]], np.float32), np.array([0]), np.array([0, 4]), (4, 8), (4, 4), np.array([0])
    )
    out = blend(grid, (4, 12), (4, 12), weighting="mean")[0, :, 0]
    np.testing.assert_allclose(out, [0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 1, 1, 1, 1])


def test_uncovered_border_strip_takes_nearest_window():
    # Direct-mode grid: windows at 0 and 4 (size 8) on a 15-pixel axis leave pixels 12..14.
    scores = np.array([[[1.0]], [[3.0]]], np.float32)
    grid = ScoreGrid(scores, np.array([0, 4]), np.array([0]), (8, 8), (4, 4), np.array([0]))
    out = blend(grid, (15, 8), (15, 8), weighting="mean")[:, 0, 0]
    np.testing.assert_allclose(out[:4], 1.0)
    np.testing.assert_allclose(out[4:8], 2.0)
    np.testing.assert_allclose(out[8:], 3.0)
    assert np.isfinite(out).all()


def test_gaussian_blend_within_covering_scores():
    grid = small_grid(seed=3)
    out = blend(grid, (23, 19), (23, 19), weighting="gaussian")
    mean = blend(grid, (23, 19), (23, 19), weighting="mean")
    assert np.isfinite(out).all()
    assert out.min() >= grid.scores.min() - 1e-5 and out.max() <= grid.scores.max() + 1e-5
    # Per pixel: a weighted average of the windows that cover it.
    for y in range(23):
        for x in range(19):
            covering = [
                grid.scores[i, j]
                for i, r in enumerate(grid.rows)
                for j, c in enumerate(grid.cols)
                if r <= y + 0.5 < r + 8 and c <= x + 0.5 < c + 6
            ]
            covering = np.stack(covering)
            assert np.all(out[y, x] >= covering.min(axis=0) - 1e-5)
            assert np.all(out[y, x] <= covering.max(axis=0) + 1e-5)
    assert not np.allclose(out, mean), "gaussian weighting should differ from the plain mean"


def test_blend_rejects_unknown_weighting():
    with pytest.raises(ValueError):
        blend(small_grid(), (23, 19), (23, 19), weighting="median")


def test_tiled_grid_blend_end_to_end(classifier):
    image = random_image(70, 61, seed=7)
    grid = tiled_inference(classifier, image, TF, window=WINDOW, stride=(13, 11))
    out = blend(grid, (70, 61), (35, 31), weighting="mean")
    expected, count = brute_force_blend(grid, (70, 61), (35, 31))
    assert count.min() >= 1
    np.testing.assert_allclose(out, expected / count[:, :, None], atol=1e-4)
