"""The bundled model through the real engine finds the objects of a generated scene: the
peak of each object's class map falls inside that object, in both modes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shapes.scenes import generate_scene
from shared.jobspec import JobParams
from shared.settings import Settings
from worker.engine import run_inference
from worker.inference.model_registry import ModelRegistry

LABELS = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry(Settings().model_dirs)


@pytest.mark.parametrize("mode, stride", [("direct", None), ("tiled", 16)])
@pytest.mark.parametrize("seed", [3, 17])
def test_peaks_fall_inside_the_objects(registry, tmp_path, mode, stride, seed):
    image, objects = generate_scene(1024, 768, n_objects=4, seed=seed, labels=LABELS)
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    info = registry.info("shapes")
    params = JobParams(
        model="shapes",
        mode=mode,
        stride=stride,
        batch_size=64,
        top_k=None,
        class_indices=tuple(info.class_indices(LABELS)),
    )
    summary = run_inference(path, params, registry, tmp_path / "out", max_pixels=10**8)
    peaks = {entry["name"]: entry for entry in summary["classes"]}
    for obj in objects:
        entry = peaks[obj.label]
        assert entry["max"] > 0.5, (obj, entry)
        assert obj.contains(entry["peak"]["x"], entry["peak"]["y"], margin=4), (mode, obj, entry["peak"])
    with np.load(tmp_path / "out" / "heatmap.npz") as data:
        assert list(data["classes"]) == LABELS


@pytest.mark.parametrize("name", ["shapes"])
def test_sidecar_output_stride_matches_the_model(registry, name):
    """The catalogue (read by the API without TensorFlow) states what the converter computes."""
    loaded = registry.load(name)
    assert loaded.info.output_stride == loaded.fcn.stride[0] == loaded.fcn.stride[1]
