"""The GPU path (Keras on JAX) is tested on CPU: the engine's exactness tests run in a child
process with KERAS_BACKEND=jax (the backend is fixed per process), and the engine's scores on
JAX equal TensorFlow's within 1e-4 on the bundled model, in both modes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

keras = pytest.importorskip("keras")
pytest.importorskip("jax")

from shapes.scenes import generate_scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# The engine's exactness tests: direct mode's stitched == whole (odd sizes, strided 'same'
# padding, a VGG-like trunk, budget-chosen tiles), tiled mode == the classifier on the crops
# and independent of the batch size; the uniform tile plan compiles the trunk once; the
# line-buffer stream equals the whole pass. Left out here: MobileNetV2 (XLA compiles its 150-layer
# trunk once per tile shape, over 10 minutes on a busy 2-core CPU) and the planning,
# progress and argument tests, which do not depend on the backend; all run on TensorFlow.
EXACTNESS_TESTS = [
    "tests/inference/test_direct.py",
    "tests/inference/test_tiled.py",
    "tests/inference/test_trunk_stream.py",
    "-k",
    "stitched or budget_chosen or vgg_like or same_padding or equal_classifier or independent_of_batch"
    " or uniform or compiles_once or streamed_equals",
]


def jax_env() -> dict:
    return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_engine_exactness_tests_pass_on_jax():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EXACTNESS_TESTS],
        cwd=ROOT,
        env=jax_env(),
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="compares JAX against TensorFlow")
def test_jax_scores_equal_tensorflow(tmp_path):
    from engine_scores import engine_scores  # tests/ is on sys.path (pytest rootdir-less import mode)

    image, _ = generate_scene(421, 347, n_objects=3, seed=11, labels=["circle", "square", "cross"])
    scene = tmp_path / "scene.png"
    Image.fromarray(image).save(scene)
    out = tmp_path / "jax.npz"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "engine_scores.py"), str(scene), str(out)],
        cwd=ROOT,
        env=jax_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = engine_scores(image)
    with np.load(out) as got:
        assert str(got["backend"]) == "jax"
        for name, scores in expected.items():
            assert got[name].shape == scores.shape, name
            assert float(scores.std()) > 0.05, name  # not a constant map
            assert float(np.abs(got[name] - scores).max()) <= 1e-4, name
