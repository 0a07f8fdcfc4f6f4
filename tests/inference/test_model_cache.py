"""Disk cache of loaded models (worker.inference.model_cache): a second start loads from the
entry without parsing the model file, a changed model file is never served from its old entry,
and a corrupt entry is rebuilt, never trusted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
layers = keras.layers

from shared.settings import Settings  # noqa: E402
from worker.inference.direct import direct_inference  # noqa: E402
from worker.inference.model_cache import entry_dir, load_through_cache  # noqa: E402
from worker.inference.model_registry import ModelRegistry  # noqa: E402

BUILTIN = Path(__file__).resolve().parents[2] / "models"


def small_classifier(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((24, 24, 3)),
            layers.Conv2D(6, 3, activation="relu", padding="same"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(4),
        ]
    )


def saved(tmp_path, seed, name="m.keras"):
    model = small_classifier(seed)
    # Non-default batch-norm statistics: non-trainable weights must come back too.
    bn = model.layers[1]
    bn.moving_mean.assign(np.linspace(-1, 1, 6).astype(np.float32) * (seed + 1))
    path = tmp_path / name
    model.save(path)
    return path


class CountingLoad:
    """The ordinary load (keras.models.load_model), counting how often it runs."""

    def __init__(self, path):
        self.path, self.calls = path, 0

    def __call__(self):
        self.calls += 1
        return keras.models.load_model(self.path, compile=False)


def batch(seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (3, 24, 24, 3)).astype(np.float32)


def test_second_load_comes_from_the_entry_with_the_same_outputs(tmp_path):
    path = saved(tmp_path, seed=1)
    expected = keras.models.load_model(path).predict(batch(), verbose=0)
    cache = tmp_path / "cache"
    first = CountingLoad(path)
    load_through_cache(cache, path, first)
    assert first.calls == 1 and (entry_dir(cache, path) / "manifest.json").exists()
    second = CountingLoad(path)
    model = load_through_cache(cache, path, second)
    assert second.calls == 0, "the cached entry was not used"
    np.testing.assert_array_equal(model.predict(batch(), verbose=0), expected)


def test_changed_model_file_is_not_served_from_its_old_entry(tmp_path):
    path = saved(tmp_path, seed=1)
    cache = tmp_path / "cache"
    load_through_cache(cache, path, CountingLoad(path))
    old_entry = entry_dir(cache, path)
    saved(tmp_path, seed=2)  # the same file name, other weights
    assert entry_dir(cache, path) != old_entry
    load = CountingLoad(path)
    model = load_through_cache(cache, path, load)
    assert load.calls == 1
    expected = keras.models.load_model(path).predict(batch(), verbose=0)
    np.testing.assert_array_equal(model.predict(batch(), verbose=0), expected)
    again = CountingLoad(path)
    np.testing.assert_array_equal(load_through_cache(cache, path, again).predict(batch(), verbose=0), expected)
    assert again.calls == 0


@pytest.mark.parametrize("damage", ["truncated_weight", "bad_manifest", "missing_config", "wrong_shape"])
def test_corrupt_entry_is_rebuilt_not_trusted(tmp_path, damage):
    path = saved(tmp_path, seed=3)
    expected = keras.models.load_model(path).predict(batch(), verbose=0)
    cache = tmp_path / "cache"
    load_through_cache(cache, path, CountingLoad(path))
    entry = entry_dir(cache, path)
    if damage == "truncated_weight":
        data = (entry / "w0.npy").read_bytes()
        (entry / "w0.npy").write_bytes(data[: len(data) // 2])
    elif damage == "bad_manifest":
        (entry / "manifest.json").write_text("{not json")
    elif damage == "missing_config":
        (entry / "config.json").unlink()
    else:
        np.save(entry / "w0.npy", np.zeros((2, 2), np.float32))
    load = CountingLoad(path)
    model = load_through_cache(cache, path, load)
    assert load.calls == 1
    np.testing.assert_array_equal(model.predict(batch(), verbose=0), expected)
    fresh = CountingLoad(path)
    load_through_cache(cache, path, fresh)
    assert fresh.calls == 0, "the rebuilt entry was not written"


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_registry_through_the_cache_gives_the_same_scores(tmp_path, precision):
    image = np.random.RandomState(5).randint(0, 256, (200, 180, 3), dtype=np.uint8)
    plain = ModelRegistry([BUILTIN]).load("shapes", precision)
    cache = tmp_path / "cache"
    ModelRegistry([BUILTIN], cache_dir=cache).load("shapes", precision)  # writes the entry
    cached = ModelRegistry([BUILTIN], cache_dir=cache).load("shapes", precision)  # a new process: reads it
    assert len(list(cache.iterdir())) == 1
    assert cached.classifier.layers[0].dtype_policy.name == plain.classifier.layers[0].dtype_policy.name
    expected = direct_inference(plain.fcn, image, plain.preprocess).scores
    np.testing.assert_array_equal(direct_inference(cached.fcn, image, cached.preprocess).scores, expected)


def test_cache_folder_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    assert Settings().resolved_model_cache_dir == tmp_path / "model-cache"
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert Settings().resolved_model_cache_dir == tmp_path / "elsewhere"
    monkeypatch.setenv("MODEL_CACHE", "false")
    assert Settings().resolved_model_cache_dir is None
