"""The classifiers people bring: every classifying keras.applications family, random weights
(``weights=None``: no download), at a small input size.

For each: tiled mode equals ``model(crops)``; direct mode is either a clear refusal naming
the layer (squeeze-excitation trunks: EfficientNet, EfficientNetV2, MobileNetV3) or exact
(native size == the classifier; a whole image == the classifier on every crop where the
trunk is 'valid', == the whole-image pass when tiled with halos; the a trous grid's native
lattice == the native grid). Scores are pre-softmax logits (``classifier_activation=None``),
compared relative to their own scale. A few families run by default, all under ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
apps = keras.applications

import score_checks  # noqa: E402

from worker.inference.direct import direct_inference  # noqa: E402
from worker.inference.fcn import GlobalContextError, to_fully_convolutional  # noqa: E402
from worker.inference.preprocess import get_preprocess  # noqa: E402
from worker.inference.tiled import tiled_inference  # noqa: E402

TF = get_preprocess("tf")
WHOLE = 10**9

# family: (constructor, input side, refused in direct mode, stitched test image side or None)
ZOO = {
    "VGG16": (apps.VGG16, 32, False, 260),
    "VGG19": (apps.VGG19, 32, False, None),
    "ResNet50": (apps.ResNet50, 32, False, None),
    "ResNet50V2": (apps.ResNet50V2, 32, False, None),
    "MobileNet": (apps.MobileNet, 32, False, None),
    "MobileNetV2": (apps.MobileNetV2, 32, False, None),
    "MobileNetV3Small": (apps.MobileNetV3Small, 32, True, None),
    "MobileNetV3Large": (apps.MobileNetV3Large, 32, True, None),
    "EfficientNetB0": (apps.EfficientNetB0, 32, True, None),
    "EfficientNetV2B0": (apps.EfficientNetV2B0, 32, True, None),
    "DenseNet121": (apps.DenseNet121, 32, False, None),
    "ConvNeXtTiny": (apps.ConvNeXtTiny, 32, False, None),
    "Xception": (apps.Xception, 71, False, None),
    "InceptionV3": (apps.InceptionV3, 75, False, None),
    "InceptionResNetV2": (apps.InceptionResNetV2, 75, False, None),
    "NASNetMobile": (apps.NASNetMobile, 224, False, None),
}
# Keras' NASNet itself cannot run on sizes that are not multiples of 32 (its cells merge a
# cropped-and-pooled branch of another size), natively as well: it gets such an image.
EVEN_ONLY = ("NASNetMobile",)
DEFAULT_RUN = ("VGG16", "ResNet50", "MobileNetV3Small", "MobileNetV2")


def assert_close_scaled(actual, expected, tol=1e-4):
    """Random-weight zoo models give narrow spreads: the reference must vary by 1e-4 of its scale."""
    score_checks.assert_close_scaled(actual, expected, tol, min_spread=1e-4)


def build(name):
    constructor, side, _, _ = ZOO[name]
    keras.utils.set_random_seed(0)
    kwargs = {"weights": None, "input_shape": (side, side, 3), "classes": 7, "classifier_activation": None}
    if name.startswith(("MobileNetV3", "EfficientNetV2", "ConvNeXt")):
        kwargs["include_preprocessing"] = False
    return constructor(**kwargs)


def image(side, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (side, side, 3), dtype=np.uint8)


def crops(model, pixels, rows, cols, side):
    x = TF(pixels)
    batch = np.stack([x[r : r + side, c : c + side] for r in rows for c in cols])
    return keras.ops.convert_to_numpy(model(batch, training=False)).reshape(len(rows), len(cols), -1)


def params():
    return [pytest.param(name, id=name, marks=() if name in DEFAULT_RUN else pytest.mark.slow) for name in ZOO]


@pytest.mark.parametrize("name", params())
def test_zoo_family(name):
    model = build(name)
    side = ZOO[name][1]
    pixels = image(side + side // 2 + 3)
    stride = max(1, side // 2)
    tiled = tiled_inference(model, pixels, TF, window=(side, side), stride=stride)
    assert_close_scaled(tiled.scores, crops(model, pixels, tiled.rows, tiled.cols, side))

    if ZOO[name][2]:
        with pytest.raises(GlobalContextError, match="mode=tiled"):
            to_fully_convolutional(model)
        return
    fcn = to_fully_convolutional(model)
    native = TF(image(side, seed=1))[None]
    assert_close_scaled(
        keras.ops.convert_to_numpy(fcn.model(native, training=False))[:, 0, 0],
        keras.ops.convert_to_numpy(model(native, training=False)),
    )
    big = image(2 * side + fcn.stride[0] + (0 if name in EVEN_ONLY else 5), seed=2)
    whole = direct_inference(fcn, big, TF, tile_cells=WHOLE)
    fine = direct_inference(fcn.at_factor(2), big, TF, tile_cells=WHOLE)
    assert_close_scaled(fine.scores[::2, ::2][: len(whole.rows), : len(whole.cols)], whole.scores)
    stitched_side = ZOO[name][3]
    if stitched_side is not None:  # halos small enough for a multi-tile image on a CPU
        large = image(stitched_side, seed=3)
        reference = direct_inference(fcn, large, TF, tile_cells=WHOLE)
        tiles = direct_inference(fcn, large, TF, tile_cells=2, scheme="tiles")
        assert tiles.tiles_read > 1
        assert_close_scaled(tiles.scores, reference.scores)
