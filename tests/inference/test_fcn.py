"""FCN conversion (worker.inference.fcn, worker.inference.receptive_field): exactness at the native
size, supported/unsupported heads,
receptive field and stride computed from the layer graph, output shapes on larger inputs.

All models use random weights (no downloads). Random-weight softmax outputs are nearly
uniform, so exactness is also checked on pre-softmax scores (last Dense without activation)
and with a tolerance relative to the scores' own scale (random MobileNetV2 logits are ~1e-10).
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
layers = keras.layers

from score_checks import assert_close_scaled  # noqa: E402

from worker.inference.fcn import GlobalContextError, UnsupportedModelError, to_fully_convolutional  # noqa: E402
from worker.inference.receptive_field import receptive_field  # noqa: E402

# --------------------------------------------------------------------------- helpers


def fcn_cell(fcn, x, i=0, j=0):
    out = keras.ops.convert_to_numpy(fcn.model(x, training=False))
    return out[:, i, j, :]


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def small_sequential(activation="softmax", classes=5, size=32, seed=1):
    """Conv/MaxPool/Flatten/Dropout/Dense(relu)/Dense head, all 'valid' (stride 4)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((size, size, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(24, activation="relu"),
            layers.Dropout(0.25),
            layers.Dense(classes, activation=activation),
        ],
        name=f"small_{activation}",
    )


def rand(shape, low=-1.0, high=1.0, seed=0):
    return np.random.RandomState(seed).uniform(low, high, shape).astype("float32")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vgg16_logits():
    """Keras' VGG16 architecture (Flatten + fc1 + fc2 + predictions), random weights, no softmax."""
    keras.utils.set_random_seed(0)
    return keras.applications.VGG16(weights=None, classifier_activation=None)


@pytest.fixture(scope="module")
def vgg16_fcn(vgg16_logits):
    return to_fully_convolutional(vgg16_logits)


@pytest.fixture(scope="module")
def mobilenet_pair():
    """MobileNetV2 (GAP head) in a softmax and a logits variant with the same weights."""
    keras.utils.set_random_seed(0)
    soft = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35)
    logits = keras.applications.MobileNetV2(
        weights=None, input_shape=(96, 96, 3), alpha=0.35, classifier_activation=None
    )
    logits.set_weights(soft.get_weights())
    return soft, logits


# --------------------------------------------------------------------------- exactness


def test_vgg16_logits_exact_at_native_size(vgg16_logits, vgg16_fcn):
    x = rand((2, 224, 224, 3), -120, 130)
    expected = vgg16_logits.predict(x, verbose=0)
    out = vgg16_fcn.model.predict(x, verbose=0)
    assert out.shape == (2, 1, 1, 1000)
    assert vgg16_fcn.head_kind == "flatten"
    assert vgg16_fcn.feature_window == (7, 7)
    assert vgg16_fcn.window == (224, 224)
    np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-5, rtol=0)
    assert_close_scaled(out[:, 0, 0], expected, 1e-5)
    # Softmax of both (the real VGG16's last layer) agrees as well.
    soft = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(soft(out[:, 0, 0]), soft(expected), rtol=1e-4, atol=1e-9)


def test_vgg16_trunk_matches_block5_pool(vgg16_logits, vgg16_fcn):
    x = rand((1, 224, 224, 3), -120, 130, seed=3)
    block5 = keras.Model(vgg16_logits.input, vgg16_logits.get_layer("block5_pool").output)
    assert_close_scaled(predict(vgg16_fcn.trunk, x), predict(block5, x), 1e-5)


def test_vgg16_receptive_field_and_stride(vgg16_fcn):
    # Analytic: 13 conv3x3 (s1) and 5 maxpool2x2 (s2) -> stride 32, receptive field 212.
    assert vgg16_fcn.stride == (32, 32)
    assert vgg16_fcn.field.size == (212.0, 212.0)
    # A halo at least the receptive-field radius.
    assert min(vgg16_fcn.halo) >= (212 - 1) // 2 - 32


@pytest.mark.parametrize("height,width", [(224, 224), (288, 320), (517, 459)])
def test_vgg16_output_shape_formula(vgg16_fcn, height, width):
    expected = ((height - 224) // 32 + 1, (width - 224) // 32 + 1)
    assert vgg16_fcn.output_shape(height, width) == expected


def test_vgg16_fcn_runs_on_larger_input(vgg16_fcn):
    out = vgg16_fcn.model.predict(np.zeros((1, 288, 320, 3), "float32"), verbose=0)
    assert out.shape == (1, (288 - 224) // 32 + 1, (320 - 224) // 32 + 1, 1000)


def test_mobilenetv2_gap_head_exact(mobilenet_pair):
    soft, logits = mobilenet_pair
    x = rand((2, 96, 96, 3))
    for model in (logits, soft):
        fcn = to_fully_convolutional(model)
        assert fcn.head_kind == "global_average"
        assert fcn.window == (96, 96)
        assert fcn.stride == (32, 32)
        out = fcn.model.predict(x, verbose=0)
        assert out.shape == (2, 1, 1, 1000)
        expected = model.predict(x, verbose=0)
        np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-5, rtol=0)
        if model is logits:
            # Random MobileNetV2 activations shrink layer by layer (logits ~1e-10) and its
            # softmax is exactly uniform: compare the logits relative to their own scale.
            assert_close_scaled(out[:, 0, 0], expected, 1e-5)


@pytest.mark.parametrize("activation", ["softmax", None])
def test_small_sequential_exact(activation):
    model = small_sequential(activation)
    fcn = to_fully_convolutional(model)
    x = rand((4, 32, 32, 3), seed=5)
    expected = model.predict(x, verbose=0)
    out = fcn.model.predict(x, verbose=0)
    assert out.shape == (4, 1, 1, 5)
    np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-5, rtol=0)
    if activation is None:
        assert_close_scaled(out[:, 0, 0], expected, 1e-5)
    else:
        np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)  # softmax on the class axis


def test_small_sequential_receptive_field_hand_computed():
    fcn = to_fully_convolutional(small_sequential(None))
    # conv3 (valid): size 3, jump 1, centre 1
    # pool2:         size 3+1*1=4,  jump 2, centre 1 + 0.5*1 = 1.5
    # conv3:         size 4+2*2=8,  jump 2, centre 1.5 + 1*2 = 3.5
    # pool2:         size 8+1*2=10, jump 4, centre 3.5 + 0.5*2 = 4.5
    assert fcn.stride == (4, 4)
    assert fcn.field.size == (10.0, 10.0)
    assert fcn.field.start == (4.5, 4.5)
    # Cell k sees pixels [4k, 4k + 10): it needs 6 pixels beyond its own block [4k, 4k+4).
    assert fcn.halo == (6, 6)
    # 32 -> 30 -> 15 -> 13 -> 6
    assert fcn.feature_window == (6, 6)
    for h, w in [(32, 32), (33, 47), (203, 157)]:
        cells = fcn.trunk_cells(h, w)
        assert cells == ((((h - 2) // 2) - 2) // 2, (((w - 2) // 2) - 2) // 2)
    # 203 -> 201 -> 100 -> 98 -> 49 cells -> 49 - 6 + 1 = 44 windows; 157 -> ... -> 37 -> 32.
    # (Not (203 - 32) // 4 + 1 = 43: this classifier never looks at the last 2 pixels of its
    # window - the floor of its pooling drops them - so one more window fits.)
    assert fcn.output_shape(203, 157) == (44, 32)


def test_small_model_fcn_cells_equal_classifier_on_crops():
    """With only 'valid' layers the FCN cell (i, j) is the classifier on the crop at (4i, 4j)."""
    model = small_sequential(None)
    fcn = to_fully_convolutional(model)
    image = rand((1, 61, 54, 3), seed=7)
    out = predict(fcn.model, image)[0]
    assert out.shape[:2] == fcn.output_shape(61, 54)
    crops, where = [], []
    for i in range((61 - 32) // 4 + 1):  # the windows that lie inside the image
        for j in range((54 - 32) // 4 + 1):
            crops.append(image[0, 4 * i : 4 * i + 32, 4 * j : 4 * j + 32])
            where.append((i, j))
    expected = model.predict(np.stack(crops), verbose=0)
    got = np.stack([out[i, j] for i, j in where])
    assert_close_scaled(got, expected, 1e-5)


def test_global_max_pooling_head_exact():
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((24, 24, 3)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(12, 3, activation="relu"),
            layers.GlobalMaxPooling2D(),
            layers.Dense(10, activation="relu"),
            layers.Dense(4),
        ]
    )
    fcn = to_fully_convolutional(model)
    assert fcn.head_kind == "global_max"
    assert fcn.stride == (2, 2)
    x = rand((3, 24, 24, 3), seed=9)
    assert_close_scaled(fcn_cell(fcn, x), model.predict(x, verbose=0), 1e-5)
    # On a larger image a cell is the max over one window's features, not over all of them.
    big = rand((1, 40, 30, 3), seed=10)
    assert fcn.model.predict(big, verbose=0).shape == (1, (40 - 24) // 2 + 1, (30 - 24) // 2 + 1, 4)


def _vgg_like_base(size=32, name="base"):
    return keras.Sequential(
        [
            keras.Input((size, size, 3)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
        ],
        name=name,
    )


def test_nested_sequential_base_gap_head_exact():
    keras.utils.set_random_seed(3)
    base = _vgg_like_base()
    model = keras.Sequential([keras.Input((32, 32, 3)), base, layers.GlobalAveragePooling2D(), layers.Dense(6)])
    fcn = to_fully_convolutional(model)
    assert fcn.head_kind == "global_average"
    assert fcn.stride == (8, 8)
    # conv3, conv3 (size 5), pool (6, j2), conv3 (10), pool (12, j4), conv3 (20), pool (24, j8)
    assert fcn.field.size == (24.0, 24.0)
    x = rand((3, 32, 32, 3), seed=11)
    assert_close_scaled(fcn_cell(fcn, x), model.predict(x, verbose=0), 1e-5)
    for h, w in [(72, 48), (75, 53), (101, 39)]:
        assert fcn.output_shape(h, w) == ((h - 32) // 8 + 1, (w - 32) // 8 + 1)
    assert predict(fcn.model, rand((1, 72, 48, 3))).shape == (1, 6, 3, 6)


def test_nested_functional_base_flatten_head_exact():
    keras.utils.set_random_seed(4)
    inner_in = keras.Input((32, 32, 3))
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(inner_in)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    h = layers.MaxPooling2D(2)(h)
    base = keras.Model(inner_in, h, name="functional_base")
    inputs = keras.Input((32, 32, 3))
    x = base(inputs)
    x = layers.Flatten()(x)
    x = layers.Dense(16, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(3)(x)
    model = keras.Model(inputs, outputs)
    fcn = to_fully_convolutional(model)
    assert fcn.head_kind == "flatten"
    assert fcn.stride == (4, 4)
    assert fcn.feature_window == (8, 8)
    x = rand((3, 32, 32, 3), seed=12)
    assert_close_scaled(fcn_cell(fcn, x), model.predict(x, verbose=0), 1e-5)


def test_transfer_learning_mobilenet_base_in_sequential_exact():
    """The common transfer-learning shape: an application without top inside a Sequential."""
    keras.utils.set_random_seed(5)
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(96, 96, 3), alpha=0.35)
    model = keras.Sequential(
        [
            keras.Input((96, 96, 3)),
            base,
            layers.GlobalAveragePooling2D(),
            layers.Dense(8, activation="relu"),
            layers.Dense(3),
        ]
    )
    fcn = to_fully_convolutional(model)
    assert fcn.stride == (32, 32)
    x = rand((2, 96, 96, 3), seed=13)
    assert_close_scaled(fcn_cell(fcn, x), model.predict(x, verbose=0), 1e-5)


# --------------------------------------------------------------------------- unsupported models


def _trunk(size=16):
    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    return inputs, x


@pytest.mark.parametrize("bad", ["batchnorm", "reshape", "lambda"])
def test_unsupported_head_layer_is_named(bad):
    inputs, x = _trunk()
    x = layers.Flatten()(x)
    if bad == "batchnorm":
        x = layers.BatchNormalization(name="head_bn")(x)
        x = layers.Dense(3, name="out")(x)
        expected = "head_bn"
    elif bad == "reshape":
        x = layers.Dense(8, name="fc")(x)
        x = layers.Reshape((2, 4), name="head_reshape")(x)  # not a 1x1 map: the cell is no longer a vector
        x = layers.Flatten()(x)
        x = layers.Dense(3, name="out")(x)
        expected = "head_reshape"
    else:
        x = layers.Dense(3, name="out")(x)
        x = layers.Lambda(lambda t: t * 2.0, name="head_lambda")(x)
        expected = "head_lambda"
    model = keras.Model(inputs, x)
    with pytest.raises(UnsupportedModelError) as info:
        to_fully_convolutional(model)
    assert expected in str(info.value)


def test_spatial_output_is_rejected():
    inputs, x = _trunk()
    model = keras.Model(inputs, layers.Conv2D(3, 1)(x))
    with pytest.raises(UnsupportedModelError, match=r"expected \(batch, classes\)"):
        to_fully_convolutional(model)


def test_head_without_flatten_or_pooling_is_rejected():
    inputs = keras.Input((16,))
    model = keras.Model(inputs, layers.Dense(3)(layers.Dense(4)(inputs)))
    with pytest.raises(UnsupportedModelError):
        to_fully_convolutional(model)


def test_head_of_only_global_pooling_converts_exactly():
    """Global pooling alone is per-position after the window pooling: no Dense needed."""
    keras.utils.set_random_seed(21)
    inputs, x = _trunk()
    model = keras.Model(inputs, layers.GlobalAveragePooling2D(name="gap")(x))
    fcn = to_fully_convolutional(model)
    x = rand((2, 16, 16, 3), seed=21)
    assert_close_scaled(fcn_cell(fcn, x), model.predict(x, verbose=0), 1e-5)


def _per_position_head(kind, x):
    """Heads of keras.applications families and of user models, on a global pooling."""
    if kind == "mobilenetv3":  # GAP(keepdims) -> 1x1 conv -> hard-swish -> dropout -> 1x1 conv -> Flatten
        x = layers.GlobalAveragePooling2D(keepdims=True)(x)
        x = layers.Conv2D(12, 1, padding="same")(x)
        x = layers.Activation("hard_swish")(x)
        x = layers.Dropout(0.2)(x)
        x = layers.Conv2D(4, 1, padding="same")(x)
        return layers.Flatten()(x)
    if kind == "mobilenet":  # GAP(keepdims) -> dropout -> 1x1 conv -> Reshape((classes,))
        x = layers.GlobalAveragePooling2D(keepdims=True)(x)
        x = layers.Conv2D(4, 1)(layers.Dropout(0.1)(x))
        return layers.Reshape((4,))(x)
    if kind == "convnext":  # GAP -> LayerNormalization -> Dense
        x = layers.LayerNormalization(epsilon=1e-6)(layers.GlobalAveragePooling2D()(x))
        return layers.Dense(4)(x)
    # GAP -> Reshape (1, 1, C) -> BatchNorm -> Rescaling -> Flatten -> Dense -> LayerNorm -> Dense
    x = layers.Reshape((1, 1, 8))(layers.GlobalMaxPooling2D()(x))
    x = layers.BatchNormalization(beta_initializer="random_normal", moving_mean_initializer="random_normal")(x)
    x = layers.Flatten()(layers.Rescaling(0.5, offset=0.1)(x))
    x = layers.LayerNormalization()(layers.Dense(6, activation="relu")(x))
    return layers.Dense(4)(x)


@pytest.mark.parametrize("kind", ["mobilenetv3", "mobilenet", "convnext", "mixed"])
def test_per_position_heads_convert_exactly(kind):
    """Native size == predict; on a larger image every cell == the classifier on its crop
    (a 'valid' trunk, so the crops see exactly the FCN's pixels)."""
    keras.utils.set_random_seed(22)
    inputs = keras.Input((24, 24, 3))
    x = layers.Conv2D(8, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    model = keras.Model(inputs, _per_position_head(kind, x))
    fcn = to_fully_convolutional(model)
    x = rand((2, 24, 24, 3), seed=22)
    assert_close_scaled(fcn_cell(fcn, x), model.predict(x, verbose=0), 1e-5)
    big = rand((1, 30, 28, 3), seed=23)
    out = predict(fcn.model, big)[0]
    assert out.shape[:2] == (4, 3)
    crops = np.stack([big[0, 2 * i : 2 * i + 24, 2 * j : 2 * j + 24] for i in range(4) for j in range(3)])
    assert_close_scaled(out.reshape(12, -1), predict(model, crops), 1e-5)


def test_squeeze_excitation_trunk_is_refused_naming_the_layer():
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    se = layers.GlobalAveragePooling2D(name="block_se_squeeze")(x)
    se = layers.Reshape((1, 1, 8))(layers.Dense(8, activation="sigmoid")(se))
    x = layers.Multiply()([x, se])
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(8, 3, strides=2)(x))
    model = keras.Model(inputs, layers.Dense(3)(x))
    with pytest.raises(GlobalContextError, match="block_se_squeeze.*mode=tiled"):
        to_fully_convolutional(model)


def test_unsupported_trunk_layer_is_named():
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3)(inputs)
    x = layers.UpSampling2D(2, name="trunk_upsample")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(2)(x))
    with pytest.raises(UnsupportedModelError, match="trunk_upsample"):
        to_fully_convolutional(model)


def test_any_size_model_needs_input_size():
    keras.utils.set_random_seed(6)
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(2)(x))
    with pytest.raises(UnsupportedModelError, match="input_size"):
        to_fully_convolutional(model)
    fcn = to_fully_convolutional(model, input_size=(20, 20))
    assert fcn.window == (20, 20)
    x = rand((2, 20, 20, 3), seed=14)
    assert_close_scaled(fcn_cell(fcn, x), model.predict(x, verbose=0), 1e-5)


def test_receptive_field_function_on_trunk_graph():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(4, 5, strides=1, padding="valid")(inputs)  # size 5, j1
    x = layers.Conv2D(4, 3, strides=2, padding="valid")(x)  # size 7, j2
    x = layers.Conv2D(4, 3, dilation_rate=2, padding="valid")(x)  # k_eff 5 -> size 7+4*2=15, j2
    rf = receptive_field(keras.Model(inputs, x))
    assert rf.jump == (2, 2)
    assert rf.size == (15.0, 15.0)
    # centres: 2 -> 2 + 1*1 = 3 -> 3 + 2*2 = 7
    assert rf.start == (7.0, 7.0)
