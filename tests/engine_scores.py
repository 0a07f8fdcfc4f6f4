"""Scores of the bundled model on a demo scene in both modes, on whichever Keras backend this
process runs (KERAS_BACKEND). Imported by tests/test_jax_backend.py on TensorFlow and run as a
script there with KERAS_BACKEND=jax, so that the two backends' numbers can be compared:

    KERAS_BACKEND=jax python tests/engine_scores.py SCENE.png OUT.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
from PIL import Image

from shared.settings import Settings
from worker.inference.direct import direct_inference
from worker.inference.model_registry import ModelRegistry
from worker.inference.tiled import tiled_inference


def engine_scores(image: np.ndarray, precision: str = "float32") -> dict[str, np.ndarray]:
    """Direct mode whole and tiled (small tiles, so halos and stitching are exercised, with
    tiles of several shapes), and tiled mode at stride 16 with a short last batch."""
    loaded = ModelRegistry(Settings().model_dirs).load("shapes", precision)
    fcn, pre = loaded.fcn, loaded.preprocess
    return {
        "direct_whole": direct_inference(fcn, image, pre, tile_cells=10**9).scores,
        "direct_tiles": direct_inference(fcn, image, pre, tile_cells=9).scores,
        "tiled": tiled_inference(loaded.classifier, image, pre, window=loaded.window, stride=16, batch_size=48).scores,
    }


if __name__ == "__main__":
    scene, out = sys.argv[1], sys.argv[2]
    scores = engine_scores(np.asarray(Image.open(scene).convert("RGB")))
    np.savez(out, backend=keras.backend.backend(), **scores)
