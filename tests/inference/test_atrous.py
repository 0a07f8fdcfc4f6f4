"""Direct mode at a finer stride (worker.inference.atrous, FullyConvolutional.at_factor).

What is checked: the cells on the native lattice equal today's native grid; for a trunk
without 'same' padding every cell equals the classifier on that window's crop; tiles with
halos (and a mask) equal the whole-image a trous pass; the job parameter accepts exactly the
native stride divided by 1, 2, 4 or 8. Real models: the bundled model and small random-weight
Keras models (pre-softmax outputs, compared relative to their own scale).
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
layers = keras.layers

from score_checks import assert_close_scaled  # noqa: E402

from shared.catalog import ModelCatalog  # noqa: E402
from shared.jobspec import ParameterError, validate_params  # noqa: E402
from worker.inference.direct import direct_inference, tile_cells_for_budget  # noqa: E402
from worker.inference.fcn import to_fully_convolutional  # noqa: E402
from worker.inference.model_registry import ModelRegistry  # noqa: E402
from worker.inference.preprocess import get_preprocess  # noqa: E402

WHOLE = 10**9
TF = get_preprocess("tf")


def random_image(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


def valid_model(head="flatten", seed=3):
    """A 'valid'-padded trunk (conv, pool x3: stride 8) with a Flatten+Dense or pooling head."""
    keras.utils.set_random_seed(seed)
    trunk = [
        keras.Input((36, 36, 3)),
        layers.Conv2D(8, 3, activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(12, 3, activation="relu"),
        layers.AveragePooling2D(2),
        layers.Conv2D(16, 3, activation="relu"),
        layers.MaxPooling2D(2),
    ]
    if head == "flatten":
        tail = [layers.Flatten(), layers.Dense(10, activation="relu"), layers.Dense(4)]
    else:
        tail = [layers.GlobalAveragePooling2D(), layers.LayerNormalization(), layers.Dense(4)]
    return keras.Sequential(trunk + tail)


def same_strided_model(seed=5):
    """'same' strided convolutions (ResNet-like: TensorFlow's padding depends on size parity)."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    y = layers.Conv2D(8, 3, padding="same")(x)
    x = layers.Activation("relu")(layers.Add()([x, y]))
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(5)(x))


def crops_predict(model, image, rows, cols, window):
    """The classifier itself on every window's crop: (rows, cols, classes). The image is
    zero-padded for the last windows, whose pixels past the border a 'valid' trunk never reads
    (its flooring poolings drop them), as on the native grid."""
    x = np.pad(TF(image), [(0, window[0]), (0, window[1]), (0, 0)])
    crops = np.stack([x[r : r + window[0], c : c + window[1]] for r in rows for c in cols])
    out = keras.ops.convert_to_numpy(model(crops, training=False))
    return out.reshape(len(rows), len(cols), -1)


@pytest.fixture(scope="module")
def shapes_fcn():
    model = keras.models.load_model("models/shapes.keras", compile=False)
    return to_fully_convolutional(model)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_native_lattice_equals_native_grid(shapes_fcn, factor):
    """Bundled model ('same' padding, stride 16): cells at multiples of 16 equal today's grid."""
    image = random_image(205, 187)
    native = direct_inference(shapes_fcn, image, TF)
    fine = direct_inference(shapes_fcn.at_factor(factor), image, TF)
    assert fine.stride == (16 // factor, 16 // factor)
    assert np.array_equal(fine.rows, np.arange(len(fine.rows)) * (16 // factor))
    assert fine.rows[-1] + 64 <= 205 and fine.cols[-1] + 64 <= 187  # every window inside the image
    assert fine.scores.shape[0] >= factor * (native.scores.shape[0] - 1) + 1
    lattice = fine.scores[::factor, ::factor]
    assert_close_scaled(lattice, native.scores, tol=1e-5)


@pytest.mark.parametrize("head", ["flatten", "pooling"])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_valid_trunk_every_cell_is_the_classifier_on_its_crop(head, factor):
    model = valid_model(head)
    fcn = to_fully_convolutional(model).at_factor(factor)
    image = random_image(71, 66, seed=factor)
    grid = direct_inference(fcn, image, TF, tile_cells=WHOLE)
    assert grid.stride == (8 // factor, 8 // factor)
    expected = crops_predict(model, image, grid.rows, grid.cols, (36, 36))
    native = direct_inference(to_fully_convolutional(model), image, TF)
    assert len(grid.rows) >= factor * (len(native.rows) - 1) + 1
    assert_close_scaled(grid.scores, expected, tol=1e-4)


@pytest.mark.parametrize("factor", [2, 4])
def test_fine_tiles_and_mask_equal_whole_pass(factor):
    """Many tiles with halos (aligned to the native stride) equal one whole-image a trous pass;
    a mask computes only its windows, with the same values."""
    fcn = to_fully_convolutional(same_strided_model()).at_factor(factor)
    image = random_image(203, 190)
    whole = direct_inference(fcn, image, TF, tile_cells=WHOLE)
    tiles = direct_inference(fcn, image, TF, tile_cells=2 * factor)
    assert tiles.tiles_read > 4
    assert_close_scaled(tiles.scores, whole.scores, tol=1e-4)

    def keep(rows, cols, window):
        return (rows[:, None] < 60) & (cols[None, :] >= 40)

    masked = direct_inference(fcn, image, TF, tile_cells=2 * factor, keep=keep)
    inside = keep(whole.rows, whole.cols, fcn.window)
    assert masked.tiles_skipped > 0
    assert np.isnan(masked.scores[~inside]).all()
    assert_close_scaled(masked.scores[inside], whole.scores[inside], tol=1e-4)


def test_same_strided_native_lattice_exact():
    """ResNet-like 'same' strided layers: the finer grid's native lattice is today's grid."""
    fcn = to_fully_convolutional(same_strided_model())
    image = random_image(157, 141)
    native = direct_inference(fcn, image, TF)
    for factor in (2, 4, 8):
        fine = direct_inference(fcn.at_factor(factor), image, TF, tile_cells=3 * factor)
        assert_close_scaled(fine.scores[::factor, ::factor], native.scores, tol=1e-4)


def test_budget_bounds_fine_tiles(shapes_fcn):
    """A finer grid holds f*f more cells in the last blocks: the budget gives smaller tiles."""
    fine = shapes_fcn.at_factor(4)
    assert fine.bytes_per_pixel >= shapes_fcn.bytes_per_pixel
    cells = tile_cells_for_budget(fine, 64)
    assert cells % 4 == 0  # whole native cells: origins stay on the native lattice
    image = random_image(900, 700)
    grid = direct_inference(fine, image, TF, memory_budget_mb=64)
    assert grid.tiles_read > 1 and grid.scheme == "tiles"


def test_rows_scheme_refuses_a_finer_grid(shapes_fcn):
    with pytest.raises(ValueError, match="rows scheme"):
        direct_inference(shapes_fcn.at_factor(2), random_image(130, 130), TF, scheme="rows")


def test_job_stride_in_direct_mode():
    info = ModelCatalog(["models"]).get("shapes")  # output stride 16
    for stride in (16, 8, 4, 2):
        assert validate_params({"mode": "direct", "stride": str(stride)}, info).stride == stride
    for stride in ("12", "1", "32"):
        with pytest.raises(ParameterError, match="2, 4 or 8"):
            validate_params({"mode": "direct", "stride": stride}, info)


def test_registry_builds_each_finer_network_once():
    loaded = ModelRegistry(["models"]).load("shapes")
    assert loaded.fcn_at(None) is loaded.fcn and loaded.fcn_at(16) is loaded.fcn
    fine = loaded.fcn_at(4)
    assert fine.stride == (4, 4) and loaded.fcn_at(4) is fine
    with pytest.raises(ParameterError):
        loaded.fcn_at(6)


def test_tiles_grow_when_the_halo_would_dominate(shapes_fcn):
    """A budget too small for the receptive field: tiles are raised so that the halo at most
    doubles a tile's side, the summary's figures say so, and the scores stay exact."""
    image = random_image(640, 600)
    budget = 0.05  # MB: by the budget alone a tile would be a few cells inside a wide halo
    assert tile_cells_for_budget(shapes_fcn, budget) < 4
    grid = direct_inference(shapes_fcn, image, TF, memory_budget_mb=budget, scheme="tiles")
    assert grid.tile_raised_for_halo and grid.tiles_read > 1
    assert 1.0 < grid.halo_overhead <= 4.5
    whole = direct_inference(shapes_fcn, image, TF, tile_cells=WHOLE)
    assert whole.halo_overhead == 1.0 and not whole.tile_raised_for_halo
    assert_close_scaled(grid.scores, whole.scores, tol=1e-4)
