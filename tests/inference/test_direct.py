"""Direct mode (worker.inference.direct): tile-by-tile trunk with halos, stitched, equals the whole-image
pass; tile planning, memory budget, score-grid coordinates, progress and cancellation.

Comparisons use pre-softmax scores (final Dense without activation) relative to their own
scale, so that a wrong cell, a missing halo or a shifted tile would show.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")
layers = keras.layers

from call_counter import record_call  # noqa: E402 (tests/ is on sys.path)
from score_checks import assert_close_scaled  # noqa: E402

from worker.inference import direct  # noqa: E402
from worker.inference.direct import Span, direct_inference, plan_axis, tile_cells_for_budget  # noqa: E402
from worker.inference.fcn import to_fully_convolutional  # noqa: E402
from worker.inference.preprocess import get_preprocess  # noqa: E402

WHOLE = 10**9  # tile_cells covering any image: one whole-image pass
TF = get_preprocess("tf")


# --------------------------------------------------------------------------- helpers


def random_image(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


def count_tiles(fcn, height, width, tile_cells):
    cy, cx = fcn.trunk_cells(height, width)
    return (
        len(plan_axis(height, fcn.stride[0], fcn.halo[0], cy, tile_cells)),
        len(plan_axis(width, fcn.stride[1], fcn.halo[1], cx, tile_cells)),
    )


def whole_fcn_pass(fcn, image, preprocess):
    """Independent reference: the converted model on the whole preprocessed image."""
    return keras.ops.convert_to_numpy(fcn.model(preprocess(image)[None], training=False))[0]


def stride4_model(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(12, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(5),  # logits
        ]
    )


def same_padded_model(seed=2):
    """'same'-padded strided convolutions (TensorFlow pads them depending on the input size)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((24, 24, 3)),
            layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.Conv2D(12, 5, strides=2, padding="same", activation="relu"),
            layers.MaxPooling2D(2, padding="same"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(4),
        ]
    )


def vgg_like_model(seed=3):
    """VGG16's exact layer layout (13 'same' conv3x3, 5 maxpool, Flatten head) with few filters."""
    keras.utils.set_random_seed(seed)
    model = [keras.Input((224, 224, 3))]
    for filters, convs in ((4, 2), (6, 2), (8, 3), (8, 3), (8, 3)):
        model += [layers.Conv2D(filters, 3, padding="same", activation="relu") for _ in range(convs)]
        model.append(layers.MaxPooling2D(2))
    model += [layers.Flatten(), layers.Dense(16, activation="relu"), layers.Dense(6)]
    return keras.Sequential(model)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def toy():
    return to_fully_convolutional(stride4_model())


@pytest.fixture(scope="module")
def toy_whole(toy):
    image = random_image(203, 157, seed=1)
    return image, direct_inference(toy, image, TF, tile_cells=WHOLE)


# --------------------------------------------------------------------------- exactness


def test_toy_stitched_equals_whole_image(toy, toy_whole):
    image, whole = toy_whole
    assert toy.stride == (4, 4)
    # The single-pass result is the converted model on the whole image.
    assert_close_scaled(whole.scores, whole_fcn_pass(toy, image, TF), 1e-5)
    for tile_cells in (5, 7, 13):
        tiles = count_tiles(toy, 203, 157, tile_cells)
        assert tiles[0] >= 3 and tiles[1] >= 3, tiles
        calls = []
        stitched = direct_inference(
            toy, image, TF, tile_cells=tile_cells, progress=lambda d, t, calls=calls: calls.append(t)
        )
        assert len(calls) == tiles[0] * tiles[1]
        assert stitched.scores.shape == whole.scores.shape == (*toy.output_shape(203, 157), 5)
        assert_close_scaled(stitched.scores, whole.scores, 1e-4)


def test_toy_head_in_many_bands_is_exact(toy, toy_whole):
    """A tiny memory budget makes the head run a few rows at a time; still exact."""
    image, whole = toy_whole
    stitched = direct_inference(toy, image, TF, tile_cells=6, memory_budget_mb=0.001)
    assert_close_scaled(stitched.scores, whole.scores, 1e-4)


def test_budget_chosen_tiles_are_exact(toy, toy_whole):
    """Without tile_cells, a small budget splits the image, and the result is unchanged."""
    image, whole = toy_whole
    calls = []
    result = direct_inference(toy, image, TF, memory_budget_mb=0.2, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][1] > 1, "the budget should force several tiles"
    assert_close_scaled(result.scores, whole.scores, 1e-4)


@pytest.mark.parametrize("height,width", [(97, 131), (100, 75), (61, 64)])
def test_same_padding_strided_model_exact(height, width):
    fcn = to_fully_convolutional(same_padded_model())
    image = random_image(height, width, seed=height)
    whole = direct_inference(fcn, image, TF, tile_cells=WHOLE)
    assert_close_scaled(whole.scores, whole_fcn_pass(fcn, image, TF), 1e-5)
    tile_cells = 2
    tiles = count_tiles(fcn, height, width, tile_cells)
    assert tiles[0] >= 2 and tiles[1] >= 2
    stitched = direct_inference(fcn, image, TF, tile_cells=tile_cells)
    assert_close_scaled(stitched.scores, whole.scores, 1e-4)


def test_vgg_like_517x459_exact():
    fcn = to_fully_convolutional(vgg_like_model())
    assert fcn.stride == (32, 32)
    assert fcn.field.size == (212.0, 212.0)
    image = random_image(517, 459, seed=4)
    caffe = get_preprocess("caffe")
    whole = direct_inference(fcn, image, caffe, tile_cells=WHOLE)
    assert whole.scores.shape == ((517 - 224) // 32 + 1, (459 - 224) // 32 + 1, 6)
    assert_close_scaled(whole.scores, whole_fcn_pass(fcn, image, caffe), 1e-5)
    tiles = count_tiles(fcn, 517, 459, 3)
    assert tiles[0] >= 3 and tiles[1] >= 3
    stitched = direct_inference(fcn, image, caffe, tile_cells=3)
    assert_close_scaled(stitched.scores, whole.scores, 1e-4)


def test_mobilenetv2_odd_image_exact():
    """MobileNetV2 has a 'same'-padded stride-2 first convolution and ZeroPadding layers."""
    keras.utils.set_random_seed(6)
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(96, 96, 3), alpha=0.35, classifier_activation=None
    )
    fcn = to_fully_convolutional(model)
    height, width, tile_cells = 1003, 941, 6  # larger than one 6-cell tile plus its 256 px halos
    cy, cx = fcn.trunk_cells(height, width)
    spans = (plan_axis(height, 32, fcn.halo[0], cy, tile_cells), plan_axis(width, 32, fcn.halo[1], cx, tile_cells))
    for axis_spans, length in zip(spans, (height, width), strict=True):
        # Some tiles start inside the image and some end inside it: halos are exercised.
        assert any(s.pixel_start > 0 for s in axis_spans)
        assert any(s.pixel_stop < length for s in axis_spans)
    image = random_image(height, width, seed=6)
    preprocess = get_preprocess("tf")
    whole = direct_inference(fcn, image, preprocess, tile_cells=WHOLE)
    assert_close_scaled(whole.scores, whole_fcn_pass(fcn, image, preprocess), 1e-5)
    stitched = direct_inference(fcn, image, preprocess, tile_cells=tile_cells)
    assert_close_scaled(stitched.scores, whole.scores, 1e-4)


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize(
    "length,jump,halo,cells_per_tile",
    [
        (203, 4, 6, 5),
        (157, 4, 6, 7),
        (517, 32, 90, 3),
        (459, 32, 90, 1),
        (419, 32, 245, 3),
        (1003, 32, 245, 6),
        (4096, 32, 90, 30),
        (100, 8, 0, 2),
        (33, 1, 3, 4),
        (1000, 16, 100, 1000),
    ],
)
def test_plan_axis_covers_every_cell_once(length, jump, halo, cells_per_tile):
    cells_total = length // jump
    spans = plan_axis(length, jump, halo, cells_total, cells_per_tile)
    covered = [c for s in spans for c in range(s.cell_start, s.cell_stop)]
    assert covered == list(range(cells_total))  # each cell exactly once, in order
    halo_px = math.ceil(halo / jump) * jump
    if len(spans) == 1:  # only when the whole axis is no bigger than one tile with its halo
        assert cells_per_tile >= cells_total or length <= cells_per_tile * jump + 2 * halo_px
        assert (spans[0].pixel_start, spans[0].pixel_stop) == (0, length)
        return
    sizes = [s.cell_stop - s.cell_start for s in spans]
    assert len(spans) == math.ceil(cells_total / cells_per_tile)  # the fewest tiles
    assert max(sizes) - min(sizes) < len(spans)  # balanced: no thin sliver at the end
    for s in spans:
        assert isinstance(s, Span)
        assert 0 < s.cell_stop - s.cell_start <= cells_per_tile
        assert s.pixel_start % jump == 0, "tile origins must be multiples of the stride"
        assert 0 <= s.pixel_start < s.pixel_stop <= length
        # The tile includes its own cells' pixels plus the halo (clipped at the image border).
        assert s.pixel_start <= max(0, s.cell_start * jump - halo)
        assert s.pixel_stop >= min(length, s.cell_stop * jump + halo)
        assert s.pixel_start == max(0, s.cell_start * jump - halo_px)
        # Same remainder modulo the stride as the image ('same' padding stays identical).
        assert (s.pixel_stop - s.pixel_start) % jump == length % jump
        assert s.offset(jump) == s.pixel_start // jump


@pytest.mark.parametrize(
    "length,jump,halo,cells_per_tile",
    [(203, 4, 6, 5), (517, 32, 90, 3), (1003, 32, 245, 6), (4096, 32, 90, 30), (4100, 16, 100, 37), (33, 1, 3, 4)],
)
def test_uniform_plan_gives_every_tile_one_shape(length, jump, halo, cells_per_tile):
    """For a compiled trunk (JAX): one tile shape, each tile still holding its cells and halo."""
    cells_total = length // jump
    plain = plan_axis(length, jump, halo, cells_total, cells_per_tile)
    spans = plan_axis(length, jump, halo, cells_total, cells_per_tile, uniform=True)
    assert len({s.pixel_stop - s.pixel_start for s in spans}) == 1
    assert max(s.pixel_stop - s.pixel_start for s in plain) == spans[0].pixel_stop - spans[0].pixel_start
    for p, s in zip(plain, spans, strict=True):
        assert (p.cell_start, p.cell_stop) == (s.cell_start, s.cell_stop)
        assert 0 <= s.pixel_start <= p.pixel_start and p.pixel_stop <= s.pixel_stop <= length
        assert s.pixel_start % jump == 0
        assert (s.pixel_stop - s.pixel_start) % jump == length % jump


def test_uniform_tiles_are_exact(toy, toy_whole, monkeypatch):
    """The engine with one tile shape (as on JAX, forced here) still equals the whole pass."""
    image, whole = toy_whole
    cy = toy.trunk_cells(*image.shape[:2])[0]
    spans = plan_axis(image.shape[0], 4, toy.halo[0], cy, 7, uniform=True)
    assert len(spans) >= 3 and spans[-1].pixel_start < spans[-2].pixel_stop - 2 * toy.halo[0]  # shifted back
    monkeypatch.setattr(direct, "_uniform_tiles", lambda: True)
    shapes, original = [], direct._trunk_tile

    def recording_tile(fcn, crop, span_y, span_x):
        shapes.append(crop.shape)
        return original(fcn, crop, span_y, span_x)

    monkeypatch.setattr(direct, "_trunk_tile", recording_tile)
    grid = direct_inference(toy, image, TF, tile_cells=7)
    assert grid.tiles_read >= 9 and len(set(shapes)) == 1
    assert_close_scaled(grid.scores, whole.scores, 1e-4)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the compiled trunk is the JAX path")
def test_jax_trunk_compiles_once_for_all_tiles(toy_whole):
    """On JAX every tile has one shape, so XLA compiles the trunk once for a many-tile image."""
    fcn = to_fully_convolutional(stride4_model(seed=9))  # a fresh compiled trunk (empty cache)
    image, _ = toy_whole
    grid = direct_inference(fcn, image, TF, tile_cells=7)
    assert grid.scheme == "tiles" and grid.tiles_read >= 9
    assert fcn.trunk._run._cache_size() == 1


def test_plan_axis_rejects_non_positive_tile():
    with pytest.raises(ValueError):
        plan_axis(100, 4, 6, 25, 0)


def test_tile_cells_for_budget_grows_with_budget_and_fits(toy):
    values = [tile_cells_for_budget(toy, mb, max_tile_pixels=10**12) for mb in (0.05, 0.5, 5, 50)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values
    for mb, cells in zip((0.5, 5, 50), values[1:], strict=True):
        side = cells * toy.stride[0] + 2 * math.ceil(max(toy.halo) / toy.stride[0]) * toy.stride[0]
        assert side * side * toy.bytes_per_pixel * 3.0 <= mb * 2**20 * 1.0001
    # The pixel cap bounds the tile regardless of the budget; without it (a GPU) the budget alone does.
    capped = tile_cells_for_budget(toy, 10**6, max_tile_pixels=200 * 200)
    assert capped * toy.stride[0] <= 200
    assert tile_cells_for_budget(toy, 10**6, max_tile_pixels=None) > tile_cells_for_budget(toy, 10**6)
    assert tile_cells_for_budget(toy, 1e-9) == 1


# --------------------------------------------------------------------------- grid, progress, errors


def test_score_grid_coordinates(toy, toy_whole):
    _, grid = toy_whole
    rows, cols, _ = grid.scores.shape
    np.testing.assert_array_equal(grid.rows, np.arange(rows) * 4)
    np.testing.assert_array_equal(grid.cols, np.arange(cols) * 4)
    assert grid.window == (32, 32)
    assert tuple(grid.stride) == (4, 4)
    np.testing.assert_array_equal(grid.class_indices, np.arange(5))
    assert grid.scores.dtype == np.float32


def test_progress_called_once_per_tile(toy):
    image = random_image(203, 157, seed=1)
    tiles = count_tiles(toy, 203, 157, 7)
    calls = []
    direct_inference(toy, image, TF, tile_cells=7, progress=lambda done, total: calls.append((done, total)))
    total = tiles[0] * tiles[1]
    assert calls == [(k, total) for k in range(1, total + 1)]


def test_progress_exception_stops_computation(toy):
    class Stop(Exception):
        pass

    image = random_image(203, 157, seed=1)
    crops, computed = [], []

    class CountingTrunk:
        def __call__(self, x, training=False):
            record_call(computed.append, x)  # each execution, also inside a compiled call
            return toy.trunk(x, training=training)

        def __getattr__(self, name):
            return getattr(toy.trunk, name)

    def counting_preprocess(crop):
        crops.append(crop.shape)
        return TF(crop)

    def progress(done, total):
        assert total > 3
        if done == 2:
            raise Stop

    counted = dataclasses.replace(toy, trunk=CountingTrunk())
    with pytest.raises(Stop):
        direct_inference(counted, image, counting_preprocess, tile_cells=5, progress=progress)
    assert len(computed) == 2, "no tile may be computed after the callback raised"
    assert len(crops) <= 3, "at most the next tile is read ahead (prefetch)"


@pytest.mark.parametrize("height,width", [(31, 100), (100, 31), (20, 20)])
def test_image_smaller_than_window_raises(toy, height, width):
    with pytest.raises(ValueError, match="smaller"):
        direct_inference(toy, random_image(height, width), TF)


def test_exactly_window_sized_image(toy):
    image = random_image(32, 32, seed=8)
    grid = direct_inference(toy, image, TF, tile_cells=1)
    assert grid.scores.shape == (1, 1, 5)
    model_out = keras.ops.convert_to_numpy(toy.model(TF(image)[None], training=False))[0, 0, 0]
    np.testing.assert_allclose(grid.scores[0, 0], model_out, rtol=1e-5, atol=1e-6)


def test_class_indices_select_channels(toy, toy_whole):
    image, whole = toy_whole
    picked = direct_inference(toy, image, TF, tile_cells=6, class_indices=[3, 0])
    np.testing.assert_array_equal(picked.class_indices, [3, 0])
    assert picked.scores.shape == (*whole.scores.shape[:2], 2)
    assert_close_scaled(picked.scores, whole.scores[..., [3, 0]], 1e-4)
