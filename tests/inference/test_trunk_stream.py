"""Direct mode's ``rows`` scheme (worker.inference.trunk_stream): the trunk streamed over full-width row
bands, each layer keeping only the rows its next output needs, equals the whole-image pass;
every layer computes each of its output rows exactly once (no halo recomputation); line
buffers stay a few rows; trunks that cannot stream are left to the tiles scheme.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
layers = keras.layers

from test_direct import (  # noqa: E402
    WHOLE,
    assert_close_scaled,
    random_image,
    same_padded_model,
    stride4_model,
    vgg_like_model,
    whole_fcn_pass,
)

from worker.inference.direct import MIN_READ_ROWS, direct_inference  # noqa: E402
from worker.inference.fcn import to_fully_convolutional  # noqa: E402
from worker.inference.preprocess import get_preprocess  # noqa: E402
from worker.inference.trunk_stream import chain_layers, same_padding, stream_plan, stream_rows  # noqa: E402

TF = get_preprocess("tf")


def assorted_model(seed=4):
    """Every kind of layer the stream supports, with odd strides, kernels and paddings."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((40, 40, 3)),
            layers.Rescaling(0.5, offset=0.1),  # a per-pixel layer first
            layers.ZeroPadding2D(((2, 1), (1, 3))),
            layers.Conv2D(6, 3, strides=2, padding="same", activation="relu"),
            layers.BatchNormalization(),
            layers.DepthwiseConv2D(3, padding="same", dilation_rate=2),
            layers.ReLU(),
            layers.Cropping2D(((1, 0), (0, 1))),
            layers.SeparableConv2D(8, 3, strides=2, padding="same", activation="relu"),
            layers.Conv2D(8, 2, strides=3, padding="valid", activation="relu"),  # kernel < stride: rows skipped
            layers.AveragePooling2D(2, strides=1, padding="valid"),
            layers.MaxPooling2D(3, strides=1, padding="same"),
            layers.Flatten(),
            layers.Dense(7),
        ]
    )


def _set_batchnorm_statistics(model):
    """Non-trivial moving statistics so that BatchNormalization does something at inference."""
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            rng = np.random.RandomState(0)
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma * 1.5, beta + 0.2, rng.normal(size=mean.shape), 0.5 + rng.uniform(size=var.shape)])


MODELS = {
    "valid": (stride4_model, (203, 157)),
    "same_strided": (same_padded_model, (197, 131)),
    "vgg_like": (vgg_like_model, (517, 459)),
    "assorted": (assorted_model, (223, 181)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    build, (height, width) = MODELS[request.param]
    model = build()
    _set_batchnorm_statistics(model)
    fcn = to_fully_convolutional(model)
    image = random_image(height, width, seed=height)
    whole = direct_inference(fcn, image, TF, tile_cells=WHOLE)
    assert whole.scheme == "tiles" and whole.tiles_read == 1
    assert_close_scaled(whole.scores, whole_fcn_pass(fcn, image, TF), 1e-5)
    return request.param, fcn, image, whole


@pytest.mark.parametrize("band_rows", [1, 5, 32, 1000])
def test_streamed_equals_whole_image(case, band_rows):
    _, fcn, image, whole = case
    calls = []
    streamed = direct_inference(
        fcn, image, TF, scheme="rows", band_rows=band_rows, progress=lambda d, t: calls.append((d, t))
    )
    assert streamed.scheme == "rows"
    chunks = -(-image.shape[0] // max(band_rows, MIN_READ_ROWS))  # one read of >= 256 rows, fed band by band
    assert calls == [(k, chunks) for k in range(1, chunks + 1)]  # progress once per read
    assert streamed.tiles_read == chunks
    assert streamed.scores.shape == whole.scores.shape
    assert_close_scaled(streamed.scores, whole.scores, 1e-4)


def test_every_layer_computes_each_row_once_with_small_line_buffers(case):
    """No halo recomputation: each stage emits each of its output rows exactly once, and
    between pushes it holds fewer input rows than its kernel (its line buffer)."""
    name, fcn, image, _ = case
    height, width = image.shape[:2]
    stages = stream_plan(fcn.trunk, height)
    assert stages is not None, name
    emitted = {id(s): 0 for s in stages}
    held = {id(s): 0 for s in stages}
    for stage in stages:
        original = stage.push

        def push(pending, stage=stage, original=original):
            out = original(pending)
            if out is not None:
                emitted[id(stage)] += int(out.shape[1])
            if stage.received < stage.in_rows:
                held[id(stage)] = max(held[id(stage)], int(stage.buffer.shape[1]))
            return out

        stage.push = push
    bands = (TF(image[y : y + 7])[None] for y in range(0, height, 7))
    rows = np.concatenate(list(stream_rows(stages, bands)), axis=0)
    assert rows.shape[:2] == fcn.trunk_cells(height, width)
    for stage in stages:
        assert emitted[id(stage)] == stage.out_rows, stage.name
        assert held[id(stage)] < stage.kernel, stage.name
    whole = keras.ops.convert_to_numpy(fcn.trunk(TF(image)[None], training=False))[0]
    assert_close_scaled(rows, whole, 1e-4)


def test_budget_picks_bands_and_auto_streams(case):
    """Under ``auto`` a budget too small for one tile streams (chain trunk, no mask; on JAX, the
    GPU path, it takes uniform tiles), exactly."""
    _, fcn, image, whole = case
    calls = []
    result = direct_inference(fcn, image, TF, memory_budget_mb=0.05, progress=lambda d, t: calls.append(t))
    assert result.scheme == ("tiles" if keras.backend.backend() == "jax" else "rows")
    assert calls[-1] > 2, "the budget should force several bands"
    assert_close_scaled(result.scores, whole.scores, 1e-4)
    # A budget that holds the whole image: one pass, whatever the scheme.
    assert direct_inference(fcn, image, TF, memory_budget_mb=4096).scheme == "tiles"


def test_same_padding_rule_matches_the_layers():
    for size in range(5, 40):
        for kernel in (1, 2, 3, 5, 7):
            for stride in (1, 2, 3):
                conv = layers.Conv2D(1, kernel, strides=stride, padding="same")
                expected = conv.compute_output_shape((1, size, size, 1))[1]
                assert same_padding(size, kernel, stride)[2] == expected


def test_trunks_that_cannot_stream_use_tiles():
    keras.utils.set_random_seed(6)
    mobile = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35)
    fcn = to_fully_convolutional(mobile)
    assert chain_layers(fcn.trunk) is None  # skip connections (Add)
    image = random_image(300, 260, seed=2)
    with pytest.raises(ValueError, match="cannot stream"):
        direct_inference(fcn, image, TF, scheme="rows")
    assert direct_inference(fcn, image, TF, memory_budget_mb=1).scheme == "tiles"

    keras.utils.set_random_seed(7)
    average_same = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(4, 3),
            layers.AveragePooling2D(2, padding="same"),
            layers.Flatten(),
            layers.Dense(2),
        ]
    )
    assert stream_plan(to_fully_convolutional(average_same).trunk, 100) is None


def test_mask_needs_tiles(case):
    _, fcn, image, whole = case

    def keep(rows, cols, window):
        return np.add.outer(rows, cols) % 3 == 0

    with pytest.raises(ValueError, match="mask"):
        direct_inference(fcn, image, TF, scheme="rows", keep=keep)
    masked = direct_inference(fcn, image, TF, memory_budget_mb=0.05, keep=keep)
    assert masked.scheme == "tiles"
    kept = masked.computed
    assert_close_scaled(masked.scores[kept], whole.scores[kept], 1e-4)


def test_unknown_scheme_is_refused(case):
    _, fcn, image, _ = case
    with pytest.raises(ValueError, match="scheme"):
        direct_inference(fcn, image, TF, scheme="diagonal")
