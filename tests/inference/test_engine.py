"""End to end through worker.engine.run_inference with a small user model (.keras + sidecar):
artifacts, summary, overlays, class selection, parameter/image errors, atomic writes, and
preprocessing equal to keras.applications'.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

keras = pytest.importorskip("keras")
layers = keras.layers

from shared.catalog import CatalogError  # noqa: E402
from shared.image_sources.source_types import ImageError  # noqa: E402
from shared.jobspec import ParameterError, validate_params  # noqa: E402
from worker.engine import run_inference  # noqa: E402
from worker.inference.model_registry import ModelRegistry  # noqa: E402
from worker.inference.preprocess import get_preprocess  # noqa: E402
from worker.outputs.artifacts import overlay_size  # noqa: E402

CLASSES = ["apple", "banana", "cherry", "date"]
NPZ_KEYS = {"scores", "computed", "classes", "class_indices", "rows", "cols", "window", "stride", "mode", "model"}
MAX_PIXELS = 10**8


def build_model(seed=21):
    """All-'valid' layers: a direct-mode cell equals the classifier on its window exactly."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.GlobalAveragePooling2D(),
            layers.Dense(len(CLASSES)),
        ],
        name="fruit",
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    build_model().save(folder / "fruit.keras")
    (folder / "fruit.json").write_text(json.dumps({"classes": CLASSES, "preprocess": "tf"}))
    return folder


@pytest.fixture(scope="module")
def registry(model_dir):
    return ModelRegistry([model_dir])


@pytest.fixture(scope="module")
def info(registry):
    return registry.catalog.get("fruit")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.RandomState(3)
    pixels = rng.randint(0, 256, (70, 90, 3), dtype=np.uint8)
    pixels[20:45, 30:60] = (250, 40, 40)  # some structure so the windows differ
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def pixels(image_path):
    return np.asarray(Image.open(image_path).convert("RGB"))


def run(registry, info, image_path, out_dir, **raw):
    params = validate_params(raw, info)
    summary = run_inference(image_path, params, registry, out_dir, max_pixels=MAX_PIXELS)
    return params, summary


def load_npz(out_dir):
    with np.load(Path(out_dir) / "heatmap.npz") as data:
        return {key: data[key] for key in data.files}


def crops_predict(registry, pixels, rows, cols):
    loaded = registry.load("fruit")
    crops = np.stack([pixels[r : r + 32, c : c + 32] for r in rows for c in cols])
    x = loaded.preprocess(crops)
    return loaded.classifier.predict(x, verbose=0).reshape(len(rows), len(cols), -1)


# --------------------------------------------------------------------------- happy paths


def test_catalog_reads_sidecar_and_keras_input_size(info):
    assert info.classes == tuple(CLASSES)
    assert info.input_size == (32, 32)  # read from the .keras archive's config
    assert info.preprocess == "tf"


@pytest.mark.parametrize("mode", ["tiled", "direct"])
def test_artifacts_consistent(registry, info, image_path, pixels, tmp_path, mode):
    raw = {"mode": mode, "top_k": 2}
    if mode == "tiled":
        raw["stride"] = 8
    params, summary = run(registry, info, image_path, tmp_path, **raw)
    data = load_npz(tmp_path)
    assert set(data) == NPZ_KEYS
    scores = data["scores"]
    rows, cols, k = scores.shape
    assert k == 2
    assert scores.dtype == np.float32
    assert data["classes"].shape == (2,) and data["class_indices"].shape == (2,)
    assert [CLASSES[i] for i in data["class_indices"]] == list(data["classes"])
    assert data["rows"].shape == (rows,) and data["cols"].shape == (cols,)
    np.testing.assert_array_equal(data["window"], [32, 32])
    assert str(data["mode"]) == mode and str(data["model"]) == "fruit"
    if mode == "tiled":
        np.testing.assert_array_equal(data["stride"], [8, 8])
        assert data["rows"][-1] == 70 - 32 and data["cols"][-1] == 90 - 32  # flush with the border
    else:
        np.testing.assert_array_equal(data["stride"], [4, 4])
        np.testing.assert_array_equal(data["rows"], np.arange(rows) * 4)
        np.testing.assert_array_equal(data["cols"], np.arange(cols) * 4)

    # The scores are the classifier's (with its 'tf' preprocessing) on each window.
    inside_r = [i for i, r in enumerate(data["rows"]) if r + 32 <= 70]
    inside_c = [j for j, c in enumerate(data["cols"]) if c + 32 <= 90]
    expected = crops_predict(registry, pixels, data["rows"][inside_r], data["cols"][inside_c])
    got = scores[np.ix_(inside_r, inside_c)]
    scale = float(np.abs(expected).max())
    assert np.abs(got - expected[..., data["class_indices"]]).max() <= 1e-4 * scale

    # summary.json
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["image"] == {"width": 90, "height": 70}
    assert on_disk["model"] == "fruit" and on_disk["mode"] == mode
    assert on_disk["grid"]["rows"] == rows and on_disk["grid"]["cols"] == cols
    assert len(on_disk["classes"]) == 2
    for channel, entry in enumerate(on_disk["classes"]):
        plane = scores[:, :, channel]
        assert entry["name"] == str(data["classes"][channel])
        assert entry["index"] == int(data["class_indices"][channel])
        assert entry["max"] == pytest.approx(float(plane.max()), rel=1e-6, abs=1e-7)
        assert entry["mean"] == pytest.approx(float(plane.mean()), rel=1e-5, abs=1e-7)
        i, j = np.unravel_index(int(np.argmax(plane)), plane.shape)
        assert entry["peak"] == {"y": int(data["rows"][i]) + 16, "x": int(data["cols"][j]) + 16}
        assert 0 <= entry["peak"]["x"] < 90 and 0 <= entry["peak"]["y"] < 70
        overlay = tmp_path / entry["overlay"]
        assert overlay.name == f"overlay_{entry['index']}.png"
        with Image.open(overlay) as im:
            assert im.size == (90, 70)  # smaller than overlay_max_side: full size
            assert im.mode == "RGB"
    assert on_disk["overlay_size"] == {"width": 90, "height": 70}
    assert on_disk == json.loads(json.dumps(summary))
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_overlay_is_downscaled_to_max_side(registry, info, image_path, tmp_path):
    params = dataclasses.replace(
        validate_params({"mode": "tiled", "stride": 16, "top_k": 1}, info), overlay_max_side=40
    )
    summary = run_inference(image_path, params, registry, tmp_path, max_pixels=MAX_PIXELS)
    height, width = overlay_size(70, 90, 40)
    assert (height, width) == (31, 40)  # longest side = max_side, aspect kept
    assert summary["overlay_size"] == {"width": 40, "height": 31}
    with Image.open(tmp_path / summary["classes"][0]["overlay"]) as im:
        assert im.size == (40, 31)


def test_top_k_picks_highest_max(registry, info, image_path, tmp_path):
    _, everything = run(registry, info, image_path, tmp_path / "all", mode="tiled", stride=8, classes="0,1,2,3")
    all_scores = load_npz(tmp_path / "all")["scores"]
    best = all_scores.reshape(-1, 4).max(axis=0)
    assert len(set(np.round(best, 6))) == 4, "need distinct maxima for a meaningful check"
    order = list(np.argsort(-best))
    for k in (1, 2, 3):
        _, summary = run(registry, info, image_path, tmp_path / f"top{k}", mode="tiled", stride=8, top_k=k)
        assert [c["index"] for c in summary["classes"]] == order[:k]
        assert [c["name"] for c in summary["classes"]] == [CLASSES[i] for i in order[:k]]
        maxima = [c["max"] for c in summary["classes"]]
        assert maxima == sorted(maxima, reverse=True)
        assert sorted(p.name for p in (tmp_path / f"top{k}").glob("overlay_*.png")) == sorted(
            f"overlay_{i}.png" for i in order[:k]
        )


def test_explicit_classes_by_name_and_index(registry, info, image_path, tmp_path):
    params, summary = run(registry, info, image_path, tmp_path / "names", mode="direct", classes="cherry, apple")
    assert params.class_indices == (2, 0)
    assert [c["name"] for c in summary["classes"]] == ["cherry", "apple"]
    by_name = load_npz(tmp_path / "names")
    np.testing.assert_array_equal(by_name["class_indices"], [2, 0])
    params, summary = run(registry, info, image_path, tmp_path / "index", mode="direct", classes="3")
    assert params.class_indices == (3,)
    assert [c["name"] for c in summary["classes"]] == ["date"]
    params, _ = run(registry, info, image_path, tmp_path / "list", mode="direct", classes=["banana", 0])
    assert params.class_indices == (1, 0)
    full = run(registry, info, image_path, tmp_path / "full", mode="direct", classes="0,1,2,3")
    assert full[0].class_indices == (0, 1, 2, 3)
    all_scores = load_npz(tmp_path / "full")["scores"]
    np.testing.assert_allclose(by_name["scores"], all_scores[..., [2, 0]], rtol=1e-5, atol=1e-6)


def test_progress_reports_reach_total(registry, info, image_path, tmp_path):
    params = validate_params({"mode": "tiled", "stride": 4, "batch_size": 16}, info)
    calls = []
    run_inference(
        image_path,
        params,
        registry,
        tmp_path,
        max_pixels=MAX_PIXELS,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls and calls[-1][0] == calls[-1][1]
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("classes", ["kiwi", "apple,kiwi", "4", "-1", 17, "\u00b2"])
def test_unknown_class(info, classes):
    with pytest.raises((ParameterError, CatalogError)) as exc:
        validate_params({"classes": classes if not isinstance(classes, int) else [classes]}, info)
    assert exc.value.code == "unknown_class"


def test_catalog_unknown_class_direct(info):
    with pytest.raises(CatalogError) as exc:
        info.class_indices(["kiwi"])
    assert exc.value.code == "unknown_class"


@pytest.mark.parametrize(
    "raw",
    [
        {"mode": "tiled", "stride": 0},
        {"mode": "tiled", "stride": -4},
        {"mode": "tiled", "stride": "-4"},
        {"mode": "tiled", "stride": 33},  # larger than the 32-pixel window
        {"mode": "tiled", "stride": "eight"},
        {"mode": "tiled", "stride": "8.5"},
        {"mode": "tiled", "stride": True},
        {"mode": "tiled", "stride": "--5"},  # was a bare ValueError from int()
        {"mode": "tiled", "stride": "\u00b2"},  # superscript two: isdigit() but not int()-able
        {"mode": "tiled", "stride": "-"},
        {"mode": "tiled", "batch_size": 0},
        {"mode": "tiled", "batch_size": "abc"},
        {"mode": "tiled", "batch_size": 10**6},
        {"top_k": 0},
        {"top_k": "three"},
        {"top_k": -1},
        {"mode": "foo"},
        {"weighting": "median"},
        {"memory_budget_mb": "lots"},
        {"memory_budget_mb": 1},
        {"mode": "direct", "stride": 33},  # larger than the window (a divisor of the stride is checked by the worker)
        {"top_k": 2, "classes": "apple"},  # either, not both
        {"classes": " , "},
    ],
)
def test_invalid_parameters(info, raw):
    with pytest.raises(ParameterError) as exc:
        validate_params(raw, info)
    assert exc.value.code == "invalid_parameter"


def test_valid_parameters_are_normalised(info):
    params = validate_params({"mode": "tiled", "stride": "32", "batch_size": " 7 ", "top_k": "9"}, info)
    assert (params.stride, params.batch_size, params.top_k) == (32, 7, len(CLASSES))
    assert params.class_indices is None and params.model == "fruit"


def test_too_many_pixels(registry, info, image_path, tmp_path):
    params = validate_params({"mode": "direct"}, info)
    with pytest.raises(ImageError) as exc:
        run_inference(image_path, params, registry, tmp_path, max_pixels=70 * 90 - 1)
    assert exc.value.code == "too_many_pixels"
    assert list(tmp_path.iterdir()) == []


def test_image_too_small(registry, info, tmp_path):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((31, 100, 3), np.uint8)).save(small)
    params = validate_params({"mode": "tiled", "stride": 8}, info)
    out = tmp_path / "out"
    with pytest.raises(ImageError) as exc:
        run_inference(small, params, registry, out, max_pixels=MAX_PIXELS)
    assert exc.value.code == "image_too_small"
    assert not out.exists() or list(out.iterdir()) == []


def test_cancel_leaves_no_partial_files(registry, info, image_path, tmp_path):
    class Cancel(Exception):
        pass

    def progress(done, total):
        raise Cancel

    params = validate_params({"mode": "tiled", "stride": 4, "batch_size": 4}, info)
    with pytest.raises(Cancel):
        run_inference(image_path, params, registry, tmp_path, max_pixels=MAX_PIXELS, progress=progress)
    assert list(tmp_path.iterdir()) == []


def test_unknown_model(registry):
    with pytest.raises(CatalogError) as exc:
        registry.load("no-such-model")
    assert exc.value.code == "unknown_model"


# --------------------------------------------------------------------------- preprocessing


@pytest.fixture(scope="module")
def batch_uint8():
    return np.random.RandomState(9).randint(0, 256, (2, 5, 7, 3), dtype=np.uint8)


def test_caffe_equals_vgg16_preprocess_input(batch_uint8):
    expected = keras.applications.vgg16.preprocess_input(batch_uint8.astype("float32").copy())
    got = get_preprocess("caffe")(batch_uint8)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Not the naive /255: BGR with ImageNet means subtracted.
    assert got.max() > 100


def test_tf_equals_mobilenet_v2_preprocess_input(batch_uint8):
    expected = keras.applications.mobilenet_v2.preprocess_input(batch_uint8.astype("float32").copy())
    got = get_preprocess("tf")(batch_uint8)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_torch_equals_imagenet_utils_torch_mode(batch_uint8):
    expected = keras.applications.imagenet_utils.preprocess_input(batch_uint8.astype("float32").copy(), mode="torch")
    got = get_preprocess("torch")(batch_uint8)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_none_and_unknown_preprocess(batch_uint8):
    np.testing.assert_array_equal(get_preprocess("none")(batch_uint8), batch_uint8.astype(np.float32))
    with pytest.raises(ValueError, match="caffe"):
        get_preprocess("bgr")


# --------------------------------------------------------------------------- background classes (issue 19)


def test_default_top_k_skips_background_classes(registry, info, image_path, tmp_path):
    """A class the sidecar names as background never enters the default top-k (it would win
    on every image: the bundled model's first view was a wash of `background`), and the top-k
    bound leaves it out; naming it in `classes` still gives it, regions included."""
    _, everything = run(registry, info, image_path, tmp_path / "all", mode="tiled", stride=8, classes="0,1,2,3")
    best = load_npz(tmp_path / "all")["scores"].reshape(-1, 4).max(axis=0)
    order = [int(i) for i in np.argsort(-best)]
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "fruit.keras").write_bytes((Path(info.path)).read_bytes())
    sidecar = {"classes": CLASSES, "preprocess": "tf", "background_classes": [CLASSES[order[0]]]}
    (folder / "fruit.json").write_text(json.dumps(sidecar))
    with_background = ModelRegistry([folder])
    bg_info = with_background.catalog.get("fruit")
    assert bg_info.background_indices() == (order[0],)
    params, summary = run(with_background, bg_info, image_path, tmp_path / "top2", mode="tiled", stride=8, top_k=2)
    assert [c["index"] for c in summary["classes"]] == order[1:3]
    assert validate_params({"top_k": 20}, bg_info, max_top_k=20).top_k == len(CLASSES) - 1
    regions = json.loads((tmp_path / "top2" / "regions.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in regions["features"]}
    assert CLASSES[order[0]] not in names
    _, asked = run(
        with_background, bg_info, image_path, tmp_path / "asked", mode="tiled", stride=8, classes=CLASSES[order[0]],
        threshold=-1e9,
    )  # fmt: skip
    assert [c["index"] for c in asked["classes"]] == [order[0]]
    regions = json.loads((tmp_path / "asked" / "regions.geojson").read_text())
    assert {f["properties"]["classification"]["name"] for f in regions["features"]} == {CLASSES[order[0]]}


def test_unknown_class_lists_the_classes(info):
    with pytest.raises(CatalogError) as exc:
        info.class_indices(["kiwi"])
    assert "apple, banana, cherry, date" in exc.value.message


def test_overlay_png_and_viewer_share_each_class_colour_scale(registry, info, image_path, tmp_path):
    """Issue 19: the PNG and the viewer coloured the same job on different ranges (0.352-0.418
    against 0.000-0.418); both now take the class's one colour scale."""
    params = validate_params({"mode": "tiled", "stride": 8, "top_k": 4}, info)
    summary = run_inference(image_path, params, registry, tmp_path, max_pixels=MAX_PIXELS, viewer=True)
    manifest = json.loads((tmp_path / "viewer" / "viewer.json").read_text())
    png = {c["name"]: c["scale"] for c in summary["classes"]}
    for entry in manifest["classes"]:
        assert (entry["low"], entry["high"], entry["near_chance"]) == (
            png[entry["name"]]["low"],
            png[entry["name"]]["high"],
            png[entry["name"]]["near_chance"],
        )


def test_direct_mode_at_a_finer_stride_end_to_end(registry, info, image_path, pixels, tmp_path):
    """stride = output stride / 2 in direct mode: the outputs carry the finer grid, and every
    cell (an all-'valid' trunk) equals the classifier on its window."""
    params, summary = run(registry, info, image_path, tmp_path, mode="direct", stride=2, classes="apple,date")
    data = load_npz(tmp_path)
    assert list(data["stride"]) == [2, 2] and summary["grid"]["stride"] == {"y": 2, "x": 2}
    assert np.array_equal(data["rows"], np.arange(len(data["rows"])) * 2)
    assert summary["grid"]["direct_scheme"] == "tiles"
    assert summary["grid"]["halo_overhead"] == 1.0 and summary["grid"]["tile_raised_for_halo"] is False
    padded = np.pad(pixels, [(0, 32), (0, 32), (0, 0)])  # pixels a 'valid' trunk never reads
    expected = crops_predict(registry, padded, data["rows"], data["cols"])[..., list(params.class_indices)]
    np.testing.assert_allclose(data["scores"], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    run(registry, info, image_path, tmp_path / "native", mode="direct", classes="apple,date")
    native = load_npz(tmp_path / "native")
    np.testing.assert_allclose(
        data["scores"][::2, ::2][: native["scores"].shape[0]], native["scores"], rtol=1e-5, atol=1e-6
    )


def test_direct_stride_that_is_no_divisor_fails_in_the_worker(registry, info, image_path, tmp_path):
    """The sidecar gives no output_stride, so the API cannot check it: the worker refuses it."""
    with pytest.raises(ParameterError, match="2, 4 or 8"):
        run(registry, info, image_path, tmp_path, mode="direct", stride=3)
