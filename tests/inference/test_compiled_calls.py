"""Compiled network calls (worker.inference.compiled_calls): a second job of the same shape
reuses the traced functions kept on the warm model (no retrace), compiled and eager calls
give the same scores, and the per-site shape cache stays bounded.

Uses the bundled model (models/shapes.keras) through the worker's registry, as a job does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from shared.settings import get_settings  # noqa: E402
from worker.inference import compiled_calls  # noqa: E402
from worker.inference.compiled_calls import compiled_call, trace_count  # noqa: E402
from worker.inference.direct import direct_inference  # noqa: E402
from worker.inference.model_registry import ModelRegistry  # noqa: E402
from worker.inference.tiled import tiled_inference  # noqa: E402

BUILTIN = Path(__file__).resolve().parents[2] / "models"

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="compiled calls are TensorFlow's tf.function"
)


def scene(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def shapes_model():
    return ModelRegistry([BUILTIN]).load("shapes")


def run_direct(model, image, scheme):
    return direct_inference(model.fcn, image, model.preprocess, scheme=scheme, memory_budget_mb=4, band_rows=48)


@pytest.mark.parametrize("scheme", ["rows", "tiles"])
def test_second_job_of_same_shape_does_not_retrace(shapes_model, scheme):
    image = scene(320, 288)
    first = run_direct(shapes_model, image, scheme)
    assert first.scheme == scheme
    traced = trace_count()
    second = run_direct(shapes_model, scene(320, 288, seed=1), scheme)
    assert trace_count() == traced, "the second job of the same shape traced again"
    again = run_direct(shapes_model, image, scheme)
    np.testing.assert_array_equal(again.scores, first.scores)
    assert not np.array_equal(second.scores, first.scores)
    run_direct(shapes_model, scene(352, 288), scheme)  # a new height is a new band/tile shape
    assert trace_count() > traced


def test_tiled_second_job_does_not_retrace(shapes_model):
    def job(seed):
        return tiled_inference(
            shapes_model.classifier,
            scene(200, 180, seed),
            shapes_model.preprocess,
            window=shapes_model.window,
            stride=24,
            batch_size=8,
        )

    job(0)
    traced = trace_count()
    job(1)
    assert trace_count() == traced


@pytest.mark.parametrize("scheme", ["rows", "tiles"])
def test_compiled_scores_equal_eager_scores(shapes_model, scheme, monkeypatch):
    image = scene(300, 260, seed=3)
    compiled = run_direct(shapes_model, image, scheme)
    monkeypatch.setenv("COMPILED_CALLS", "false")
    get_settings.cache_clear()
    try:
        traced = trace_count()
        eager = run_direct(shapes_model, image, scheme)
        assert trace_count() == traced, "COMPILED_CALLS=false still traced"
    finally:
        monkeypatch.delenv("COMPILED_CALLS")
        get_settings.cache_clear()
    np.testing.assert_allclose(compiled.scores, eager.scores, rtol=1e-5, atol=1e-5 * np.abs(eager.scores).max())


def test_tiled_compiled_equals_predict(shapes_model):
    image = scene(160, 150, seed=4)
    grid = tiled_inference(
        shapes_model.classifier, image, shapes_model.preprocess, window=shapes_model.window, stride=40, batch_size=3
    )
    h, w = shapes_model.window
    windows = np.stack([image[y : y + h, x : x + w] for y in grid.rows for x in grid.cols])
    expected = shapes_model.classifier.predict(shapes_model.preprocess(windows), verbose=0)
    np.testing.assert_allclose(grid.scores.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)


def test_shapes_per_site_are_bounded(monkeypatch):
    monkeypatch.setattr(compiled_calls, "MAX_SHAPES_PER_SITE", 3)

    class Owner:
        pass

    owner = Owner()
    for n in range(1, 7):
        out = compiled_call(owner, "double", lambda t: t * 2.0, np.ones((1, n), np.float32))
        np.testing.assert_array_equal(np.asarray(out), np.full((1, n), 2.0, np.float32))
    cache = owner.__dict__["_compiled_calls"]
    assert sorted(key[1] for key in cache) == [(1, 4), (1, 5), (1, 6)]
    traced = trace_count()
    compiled_call(owner, "double", lambda t: t * 2.0, np.ones((1, 1), np.float32))  # evicted: traced again
    assert trace_count() == traced + 1
