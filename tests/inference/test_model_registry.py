"""Model catalogue and registry (shared.catalog, worker.inference.model_registry): VGG16 weight resolution
without downloads, the built-in catalogue entry, sidecar validation, user-model checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")
layers = keras.layers

from shared.catalog import CatalogError, ModelCatalog  # noqa: E402
from worker.inference.model_registry import (  # noqa: E402
    VGG16_WEIGHTS_FILE,
    ModelRegistry,
    ModelUnavailableError,
    resolve_vgg16_weights,
)

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = ROOT / "models"


def tiny_model(outputs=3, size=16):
    return keras.Sequential(
        [
            keras.Input((size, size, 3)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(outputs),
        ]
    )


@pytest.fixture
def empty_keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.delenv("VGG16_WEIGHTS", raising=False)
    return home


# --------------------------------------------------------------------------- VGG16 weights


def test_vgg16_without_weights_explains_how_to_provide_them(empty_keras_home):
    registry = ModelRegistry([BUILTIN])
    with pytest.raises(ModelUnavailableError) as exc:
        registry.load("vgg16")
    message = str(exc.value)
    assert str(empty_keras_home / "models" / VGG16_WEIGHTS_FILE) in message
    assert "VGG16_WEIGHTS" in message
    assert exc.value.code == "model_unavailable"


def test_vgg16_configured_path_missing_is_reported(empty_keras_home, tmp_path):
    missing = tmp_path / "elsewhere" / VGG16_WEIGHTS_FILE
    with pytest.raises(ModelUnavailableError) as exc:
        ModelRegistry([BUILTIN], vgg16_weights=missing).load("vgg16")
    assert str(missing) in str(exc.value)


def test_resolve_prefers_configured_file_then_cache(empty_keras_home, tmp_path):
    cached = empty_keras_home / "models" / VGG16_WEIGHTS_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    explicit = tmp_path / "mine.h5"
    explicit.write_bytes(b"y")
    assert resolve_vgg16_weights(explicit) == explicit
    assert resolve_vgg16_weights(None) == cached
    assert resolve_vgg16_weights(tmp_path / "absent.h5") == cached  # falls back to the cache


def test_settings_read_vgg16_weights_from_environment(monkeypatch, tmp_path):
    from shared.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VGG16_WEIGHTS", str(tmp_path / "w.h5"))
    assert Settings().vgg16_weights == tmp_path / "w.h5"


def test_vgg16_loads_weights_from_keras_cache(empty_keras_home):
    """A legacy-format weights file in KERAS_HOME/models is found and loaded (no download)."""
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(41)
    reference = keras.applications.VGG16(weights=None)
    # Distinctive values, so that a model that merely re-initialised with the same seed differs.
    weights = reference.get_weights()
    weights[-1] = np.arange(1000, dtype=np.float32) / 1000.0
    weights[0] = weights[0] + 0.5
    reference.set_weights(weights)
    target = empty_keras_home / "models" / VGG16_WEIGHTS_FILE
    target.parent.mkdir()
    with h5py.File(target, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, reference)
    del reference

    keras.utils.set_random_seed(41)
    registry = ModelRegistry([BUILTIN])
    try:
        loaded = registry.load("vgg16")
    finally:
        target.unlink()  # 528 MB: do not leave it in pytest's kept temporary folders
    assert loaded.name == "vgg16"
    assert loaded.window == (224, 224)
    got = loaded.classifier.get_weights()
    assert len(got) == len(weights)
    for mine, theirs in zip(got, weights, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert registry.load("vgg16") is loaded  # loaded once per process
    # caffe preprocessing is wired in for it.
    pixel = np.array([[[0, 0, 0]]], np.uint8)
    np.testing.assert_allclose(loaded.preprocess(pixel)[0, 0], [-103.939, -116.779, -123.68], atol=1e-4)


# --------------------------------------------------------------------------- catalogue


def test_catalog_lists_vgg16():
    catalog = ModelCatalog([BUILTIN])
    assert "vgg16" in catalog.names()
    info = catalog.get("vgg16")
    assert info.kind == "keras_applications_vgg16"
    assert len(info.classes) == 1000 and len(set(info.classes)) == 1000
    assert info.classes[0] == "tench"
    assert info.preprocess == "caffe"
    assert info.input_size == (224, 224)
    public = info.public()
    assert public["num_classes"] == 1000
    assert public["input_size"] == {"height": 224, "width": 224}
    assert public["output_stride"] == 32  # what test_fcn computes for VGG16 from its layers
    assert not any("vgg16" in key for key in catalog.problems)


def test_get_unknown_model():
    with pytest.raises(CatalogError) as exc:
        ModelCatalog([BUILTIN]).get("nope")
    assert exc.value.code == "unknown_model"
    assert "vgg16" in exc.value.message  # lists what is available


def _write(folder: Path, name: str, sidecar, model_bytes: bytes | None = b"not a real model"):
    text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
    (folder / f"{name}.json").write_text(text)
    if model_bytes is not None:
        (folder / f"{name}.keras").write_bytes(model_bytes)


def test_sidecar_problems_are_reported_not_raised(tmp_path):
    tiny_model().save(tmp_path / "good.keras")
    (tmp_path / "good.json").write_text(json.dumps({"classes": ["a", "b", "c"], "preprocess": "none"}))
    size = [16, 16]
    _write(tmp_path, "noclasses", {"preprocess": "tf", "input_size": size})
    _write(tmp_path, "emptyclasses", {"classes": [], "preprocess": "tf", "input_size": size})
    _write(tmp_path, "badpre", {"classes": ["a"], "preprocess": "bgr", "input_size": size})
    _write(tmp_path, "nofile", {"classes": ["a"], "preprocess": "tf", "input_size": size}, model_bytes=None)
    _write(tmp_path, "dupes", {"classes": ["a", "b", "a"], "preprocess": "tf", "input_size": size})
    _write(tmp_path, "notjson", "{classes: [")
    _write(tmp_path, "nosize", {"classes": ["a"], "preprocess": "tf"})  # not a readable .keras: no size
    _write(tmp_path, "badkind", {"classes": ["a"], "preprocess": "tf", "input_size": size, "kind": "magic"})
    catalog = ModelCatalog([tmp_path])
    assert catalog.names() == ["good"]
    problems = {Path(k).stem: v for k, v in catalog.problems.items()}
    assert set(problems) == {"noclasses", "emptyclasses", "badpre", "nofile", "dupes", "notjson", "nosize", "badkind"}
    assert "classes" in problems["noclasses"]
    assert "preprocess" in problems["badpre"]
    assert "nofile.keras" in problems["nofile"]
    assert "unique" in problems["dupes"]
    assert "input_size" in problems["nosize"]
    assert "magic" in problems["badkind"]
    assert catalog.get("good").input_size == (16, 16)
    for name in problems:
        with pytest.raises(CatalogError) as exc:
            catalog.get(name)
        assert exc.value.code == "model_unavailable"  # with the reason, not "unknown"
        assert problems[name] in exc.value.message


def test_first_folder_wins(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, classes in ((first, ["x"]), (second, ["y", "z"])):
        folder.mkdir()
        _write(folder, "same", {"classes": classes, "preprocess": "tf", "input_size": [8, 8]})
    catalog = ModelCatalog([first, second, tmp_path / "missing-folder"])
    assert catalog.get("same").classes == ("x",)


def test_user_model_output_count_mismatch(tmp_path):
    """A .keras file: refused by the catalogue (at submission); an .h5 file, whose config the
    catalogue does not read: refused by the worker when it loads the model."""
    tiny_model(outputs=3).save(tmp_path / "mismatch.keras")
    (tmp_path / "mismatch.json").write_text(json.dumps({"classes": ["a", "b"], "preprocess": "tf"}))
    tiny_model(outputs=3).save(tmp_path / "legacy.h5")
    (tmp_path / "legacy.json").write_text(
        json.dumps({"classes": ["a", "b"], "preprocess": "tf", "input_size": [16, 16]})
    )
    registry = ModelRegistry([tmp_path])
    with pytest.raises(CatalogError) as refused:
        registry.load("mismatch")
    assert refused.value.code == "model_unavailable"
    assert "2 classes" in refused.value.message and "3 outputs" in refused.value.message
    with pytest.raises(ModelUnavailableError) as exc:
        registry.load("legacy")
    assert "3 outputs" in str(exc.value) and "2 classes" in str(exc.value)


def test_broken_user_model_file(tmp_path):
    _write(tmp_path, "broken", {"classes": ["a"], "preprocess": "tf", "input_size": [16, 16]})
    with pytest.raises(ModelUnavailableError) as exc:
        ModelRegistry([tmp_path]).load("broken")
    assert "broken.keras" in str(exc.value)


def test_user_model_loads_and_converts(tmp_path):
    keras.utils.set_random_seed(42)
    model = tiny_model(outputs=2)
    model.save(tmp_path / "ok.keras")
    (tmp_path / "ok.json").write_text(json.dumps({"classes": ["a", "b"], "preprocess": "torch"}))
    registry = ModelRegistry([tmp_path])
    loaded = registry.load("ok")
    assert loaded.window == (16, 16)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded.classifier.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert loaded.fcn is loaded.fcn  # converted once
    assert loaded.fcn.stride == (1, 1)
    # By path (the CLI's way) with the sidecar beside it.
    assert registry.info(str(tmp_path / "ok.keras")).name == "ok"


def test_model_path_without_sidecar(tmp_path):
    tiny_model().save(tmp_path / "lonely.keras")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(CatalogError) as exc:
        ModelRegistry([other]).info(str(tmp_path / "lonely.keras"))
    assert exc.value.code == "invalid_model"


# --------------------------------------------------------------------------- issue 19: problems a newcomer hits


def test_bundled_model_names_its_background_class():
    info = ModelCatalog([BUILTIN]).get("shapes")
    assert info.background_classes == ("background",)
    assert info.public()["background_classes"] == ["background"]


def test_model_file_without_sidecar_is_a_problem(tmp_path):
    tiny_model().save(tmp_path / "lonely.keras")
    (tmp_path / "old.h5").write_bytes(b"not read")
    catalog = ModelCatalog([tmp_path])
    assert catalog.names() == []
    assert "no sidecar lonely.json" in catalog.problems["lonely.keras"]
    assert "no sidecar old.json" in catalog.problems["old.h5"]
    with pytest.raises(CatalogError) as exc:
        catalog.get("lonely")
    assert exc.value.code == "model_unavailable" and "no sidecar" in exc.value.message


def test_sidecar_that_disagrees_with_its_model_is_a_problem(tmp_path):
    """Issue 19: a 5-class sidecar on a 3-output model was listed as available and failed in
    the worker; the catalogue reads the head's units and the input size from the .keras file."""
    tiny_model(outputs=3).save(tmp_path / "five.keras")
    (tmp_path / "five.json").write_text(json.dumps({"classes": list("abcde"), "preprocess": "tf"}))
    tiny_model(outputs=2, size=16).save(tmp_path / "size.keras")
    (tmp_path / "size.json").write_text(json.dumps({"classes": ["a", "b"], "preprocess": "tf", "input_size": [32, 32]}))
    tiny_model(outputs=2).save(tmp_path / "fine.keras")
    (tmp_path / "fine.json").write_text(json.dumps({"classes": ["a", "b"], "preprocess": "tf", "input_size": [16, 16]}))
    _write(tmp_path, "badbg", {"classes": ["a"], "preprocess": "tf", "input_size": [8, 8], "background_classes": ["z"]})
    catalog = ModelCatalog([tmp_path])
    assert catalog.names() == ["fine"]
    assert "lists 5 classes but the model's head has 3 outputs" in catalog.problems["five.json"]
    assert "input_size [32, 32] differs from the model's input [16, 16]" in catalog.problems["size.json"]
    assert "background_classes" in catalog.problems["badbg.json"]
    with pytest.raises(CatalogError) as exc:
        catalog.get("five")
    assert exc.value.code == "model_unavailable" and "3 outputs" in exc.value.message
