"""Turn a Keras classifier into a fully convolutional network with the same weights.

A classifier = a convolutional *trunk* (image -> feature map) and a *head* (feature map ->
class scores). The head starts at the layer that destroys the spatial layout (`Flatten`,
`GlobalAveragePooling2D`, `GlobalMaxPooling2D`). We keep the trunk as it is (only its input
becomes ``(None, None, C)``) and rewrite the head as convolutions:

* Flatten + Dense: the first Dense becomes a ``Conv2D`` whose kernel is the flattened map's
  spatial size ``(fh, fw)``; Keras flattens channels-last in row-major ``(h, w, c)`` order,
  so the Dense kernel reshapes to ``(fh, fw, c, units)`` unchanged.
* Global pooling + Dense: the pooling becomes an ``AveragePooling2D`` (or max) over the
  native window's feature size with stride 1, so every output cell is the classifier's own
  global pooling over one window's features; Dense becomes a 1x1 ``Conv2D``.
* Later Dense layers become 1x1 convolutions; activations are kept (softmax acts on the
  channel axis, which is where the classes now are); Dropout-like layers are dropped.

Exactness: at the native input size the converted model returns ``model.predict`` to float
rounding. On a larger image each output cell equals the classifier applied to the matching
window *except* at the window's own border, where the classifier saw zero padding and the
FCN sees the real neighbouring pixels - the usual and intended FCN semantics. Tiled mode
(``worker.tiled``) gives the classifier's exact per-window semantics instead.

The trunk's receptive field and stride are computed from the layer graph (never from
constants), so that direct mode can cut an image into tiles with a large enough halo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import keras
import numpy as np

layers = keras.layers


class UnsupportedModelError(ValueError):
    """The model cannot be converted; the message names the offending layer."""


# Layers that do nothing at inference time (dropped from the head).
_INFERENCE_NOOPS = tuple(
    cls
    for name in (
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "ActivityRegularization",
        "Identity",
    )
    if (cls := getattr(layers, name, None)) is not None
)
# Per-element or per-position layers: they keep the spatial layout and receptive field.
_POINTWISE = tuple(
    cls
    for name in (
        "Activation",
        "ReLU",
        "LeakyReLU",
        "PReLU",
        "ELU",
        "Softmax",
        "BatchNormalization",
        "LayerNormalization",
        "Rescaling",
        "Normalization",
        "InputLayer",
        "Add",
        "Subtract",
        "Multiply",
        "Average",
        "Maximum",
        "Minimum",
        "Concatenate",
        "Dropout",
        "SpatialDropout2D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "ActivityRegularization",
        "Identity",
        "UnitNormalization",
    )
    if (cls := getattr(layers, name, None)) is not None
)
_HEAD_ACTIVATIONS = tuple(
    cls
    for name in ("Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax")
    if (cls := getattr(layers, name, None)) is not None
)


@dataclass(frozen=True)
class ReceptiveField:
    """How the cells of a tensor map to input pixels, per axis (y, x).

    Cell ``k`` is centred on input pixel coordinate ``start + k * jump`` and sees
    ``size`` pixels around that centre. ``global_layer`` names a layer whose output depends
    on the whole input (e.g. a squeeze-excitation global pooling) - then no finite halo
    makes tiling exact.
    """

    jump: tuple[int, int] = (1, 1)
    size: tuple[float, float] = (1.0, 1.0)
    start: tuple[float, float] = (0.0, 0.0)
    global_layer: str | None = None
    same_strided: tuple[str, ...] = field(default=())

    def then(self, kernel, stride, dilation=(1, 1), pad_before=(0, 0)) -> ReceptiveField:
        """Compose with a sliding-window layer applied on top of this tensor."""
        jump, size, start = [], [], []
        for axis in range(2):
            k_eff = dilation[axis] * (kernel[axis] - 1) + 1
            j = self.jump[axis]
            size.append(self.size[axis] + (k_eff - 1) * j)
            start.append(self.start[axis] + ((k_eff - 1) / 2 - pad_before[axis]) * j)
            jump.append(j * stride[axis])
        return ReceptiveField(tuple(jump), tuple(size), tuple(start), self.global_layer, self.same_strided)

    def compose(self, inner: ReceptiveField) -> ReceptiveField:
        """This field followed by a nested model whose own field (on its input) is `inner`."""
        jump = tuple(self.jump[a] * inner.jump[a] for a in range(2))
        size = tuple(self.size[a] + (inner.size[a] - 1) * self.jump[a] for a in range(2))
        start = tuple(self.start[a] + inner.start[a] * self.jump[a] for a in range(2))
        return ReceptiveField(
            jump, size, start, self.global_layer or inner.global_layer, self.same_strided + inner.same_strided
        )

    def halo(self) -> tuple[int, int]:
        """Pixels a tile needs beyond its own cells' blocks ``[k*jump, (k+1)*jump)`` on each side."""
        out = []
        for a in range(2):
            radius = (self.size[a] - 1) / 2
            before = radius - self.start[a]
            after = radius + self.start[a] - self.jump[a] + 1
            out.append(max(0, math.ceil(max(before, after) - 1e-9)))
        return tuple(out)


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return tuple(int(v) for v in value)


def _same_pad_before(kernel: int, stride: int, dilation: int) -> int:
    k_eff = dilation * (kernel - 1) + 1
    if stride == 1:
        return (k_eff - 1) // 2
    return max(k_eff - stride, 0) // 2  # TensorFlow's rule for sizes divisible by the stride


def _as_functional(op):
    """The Functional graph behind a nested model (Sequential keeps one in `_functional`)."""
    if isinstance(op, keras.Sequential):
        inner = getattr(op, "_functional", None)
        if inner is None:
            raise UnsupportedModelError(f"nested Sequential {op.name!r} is not built; build it with an Input")
        return inner
    return op


def _is_graph_model(op) -> bool:
    return isinstance(op, keras.Model) and hasattr(_as_functional(op), "_run_through_graph")


def _layer_field(op, rf: ReceptiveField) -> ReceptiveField:
    """The receptive field of `op`'s output given that of its (first) input."""
    name = f"{op.name!r} ({type(op).__name__})"
    if isinstance(op, (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)) and not isinstance(
        op, layers.Conv2DTranspose
    ):
        if getattr(op, "data_format", "channels_last") != "channels_last":
            raise UnsupportedModelError(f"layer {name} uses channels_first; only channels_last is supported")
        kernel, stride, dilation = _pair(op.kernel_size), _pair(op.strides), _pair(op.dilation_rate)
        return _windowed(op, rf, kernel, stride, dilation)
    if isinstance(op, (layers.MaxPooling2D, layers.AveragePooling2D)):
        return _windowed(op, rf, _pair(op.pool_size), _pair(op.strides), (1, 1))
    if isinstance(op, layers.ZeroPadding2D):
        (top, _), (left, _) = op.padding
        return ReceptiveField(
            rf.jump,
            rf.size,
            (rf.start[0] - top * rf.jump[0], rf.start[1] - left * rf.jump[1]),
            rf.global_layer,
            rf.same_strided,
        )
    if isinstance(op, layers.Cropping2D):
        (top, _), (left, _) = op.cropping
        return ReceptiveField(
            rf.jump,
            rf.size,
            (rf.start[0] + top * rf.jump[0], rf.start[1] + left * rf.jump[1]),
            rf.global_layer,
            rf.same_strided,
        )
    if isinstance(op, (layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D)):
        return ReceptiveField(rf.jump, rf.size, rf.start, rf.global_layer or op.name, rf.same_strided)
    if isinstance(op, (layers.Reshape, layers.Flatten, layers.Dense)):
        # Inside the trunk these only appear on a squeeze-excitation branch of shape (1, 1, C).
        return ReceptiveField(rf.jump, rf.size, rf.start, rf.global_layer or op.name, rf.same_strided)
    if isinstance(op, _POINTWISE):
        return rf
    raise UnsupportedModelError(
        f"cannot compute the receptive field of layer {name}: it is not a known convolution, pooling, "
        "padding or per-pixel layer"
    )


def _windowed(op, rf, kernel, stride, dilation) -> ReceptiveField:
    if op.padding == "same":
        pad = tuple(_same_pad_before(kernel[a], stride[a], dilation[a]) for a in range(2))
        out = rf.then(kernel, stride, dilation, pad)
        if stride != (1, 1):
            out = ReceptiveField(out.jump, out.size, out.start, out.global_layer, out.same_strided + (op.name,))
        return out
    return rf.then(kernel, stride, dilation, (0, 0))


def receptive_field(graph_model: keras.Model) -> ReceptiveField:
    """Receptive field of a single-input, single-output image model's output tensor."""
    functional = _as_functional(graph_model)

    def call(op, *args, **kwargs):
        inputs = [a for a in keras.tree.flatten((args, kwargs)) if isinstance(a, ReceptiveField)]
        if not inputs:
            raise UnsupportedModelError(f"layer {op.name!r} has no image input")
        if _is_graph_model(op):
            inner = receptive_field(op)
            return inputs[0].compose(inner)
        spatial = [f for f in inputs if f.global_layer is None] or inputs
        if len({f.jump for f in spatial}) > 1:
            raise UnsupportedModelError(f"layer {op.name!r} merges tensors of different strides")
        widest = max(inputs, key=lambda f: (f.global_layer is None, f.size))
        merged = ReceptiveField(
            widest.jump,
            widest.size,
            widest.start,
            next((f.global_layer for f in inputs if f.global_layer), None),
            tuple(dict.fromkeys(s for f in inputs for s in f.same_strided)),
        )
        return _layer_field(op, merged)

    outputs = functional._run_through_graph(ReceptiveField(), operation_fn=lambda op: op, call_fn=call)
    return keras.tree.flatten(outputs)[0]


def _replay(graph_model, inputs):
    """Call the layers of `graph_model` on new symbolic inputs (sharing weights), skipping the
    fixed input-shape check of the original model and of nested models."""
    functional = _as_functional(graph_model)

    def call(op, *args, **kwargs):
        if _is_graph_model(op):
            return _replay(op, args[0])
        return op(*args, **kwargs)

    return functional._run_through_graph(inputs, operation_fn=lambda op: op, call_fn=call)


@dataclass
class FullyConvolutional:
    """A converted classifier.

    ``model`` maps an image ``(1, H, W, C)`` to scores ``(1, rows, cols, classes)``; it is
    ``head(trunk(x))``. Direct mode runs ``trunk`` tile by tile (memory-bounded, exact with
    the halo from ``field``) and ``head`` on the stitched feature map. Output cell ``(i, j)``
    stands for the native window whose top-left pixel is ``(i * stride[0], j * stride[1])``.
    """

    model: keras.Model
    trunk: keras.Model
    head: keras.Model
    window: tuple[int, int]  # native input (h, w)
    feature_window: tuple[int, int]  # feature cells per native window (fh, fw)
    channels: int  # input channels
    field: ReceptiveField  # receptive field of one trunk cell
    head_kind: str  # "flatten" | "global_average" | "global_max"
    bytes_per_pixel: float  # largest trunk activation, float32 bytes per input pixel
    window_conv: layers.Conv2D | None = None  # the Flatten+Dense head's window-sized convolution
    head_rest: keras.Model | None = None  # the head after that convolution

    @property
    def stride(self) -> tuple[int, int]:
        return self.field.jump

    @property
    def halo(self) -> tuple[int, int]:
        return self.field.halo()

    @property
    def head_width(self) -> int:
        """Widest per-cell vector the head holds (patch length or channels), for memory bounds."""
        widths = [int(layer.output.shape[-1]) for layer in self.head.layers[1:]] or [1]
        if self.window_conv is not None:
            widths.append(self.feature_window[0] * self.feature_window[1] * int(self.head.input.shape[-1]))
        return max(widths)

    def apply_head(self, features) -> np.ndarray:
        """Scores ``(rows, cols, classes)`` for a ``(1, R, C, F)`` band of trunk features.

        Same result as ``head(features)``, but the window-sized first convolution of a
        Flatten+Dense head runs as one matrix product over gathered patches (im2col): for
        VGG16's 7x7x512->4096 convolution that measured 206 against 144 GFLOP/s for
        TensorFlow's convolution on the 2-core CPU box.
        """
        if self.window_conv is None:
            return keras.ops.convert_to_numpy(self.head(features, training=False))[0]
        conv = self.window_conv
        fh, fw = self.feature_window
        _, rows, cols, channels = features.shape
        out_rows, out_cols = rows - fh + 1, cols - fw + 1
        x = keras.ops.convert_to_tensor(features)
        patches = keras.ops.concatenate(
            [x[:, dy : dy + out_rows, dx : dx + out_cols, :] for dy in range(fh) for dx in range(fw)], axis=-1
        )
        kernel = keras.ops.reshape(conv.kernel, (fh * fw * channels, conv.filters))  # (dy, dx, c) order
        y = keras.ops.matmul(keras.ops.reshape(patches, (out_rows * out_cols, fh * fw * channels)), kernel)
        if conv.use_bias:
            y = y + conv.bias
        y = conv.activation(keras.ops.reshape(y, (1, out_rows, out_cols, conv.filters)))
        return keras.ops.convert_to_numpy(self.head_rest(y, training=False))[0]

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        cells = self.trunk_cells(height, width)
        return (cells[0] - self.feature_window[0] + 1, cells[1] - self.feature_window[1] + 1)

    def trunk_cells(self, height: int, width: int) -> tuple[int, int]:
        shape = self.trunk.compute_output_shape((1, height, width, self.channels))
        return (int(shape[1]), int(shape[2]))


def _producer(tensor):
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        raise UnsupportedModelError("the model is not a built functional or Sequential model")
    return history.operation, history.node_index


def _single_input(op, node_index):
    node = op._inbound_nodes[node_index]
    tensors = node.input_tensors
    if len(tensors) != 1:
        raise UnsupportedModelError(f"layer {op.name!r} in the classifier head has {len(tensors)} inputs")
    return tensors[0]


def to_fully_convolutional(model: keras.Model, input_size: tuple[int, int] | None = None) -> FullyConvolutional:
    """Convert a classifier with a Flatten+Dense or global-pooling+Dense head.

    Args:
        model: a built single-input single-output Keras classifier (Sequential or
            functional), channels-last, whose output is a ``(batch, classes)`` vector.
        input_size: the native ``(h, w)``; needed only when the model was built with an
            unknown spatial size.

    Raises:
        UnsupportedModelError: naming the layer that cannot be converted.
    """
    functional = _as_functional(model)
    if len(functional.inputs) != 1 or len(functional.outputs) != 1:
        raise UnsupportedModelError("only single-input, single-output classifiers are supported")
    if len(functional.outputs[0].shape) != 2:
        raise UnsupportedModelError(
            f"the model's output has shape {tuple(functional.outputs[0].shape)}; expected (batch, classes)"
        )
    in_shape = tuple(functional.inputs[0].shape)
    if len(in_shape) != 4:
        raise UnsupportedModelError(f"the model's input has shape {in_shape}; expected (batch, h, w, channels)")
    window = tuple(int(v) if v is not None else None for v in in_shape[1:3])
    if None in window:
        if input_size is None:
            raise UnsupportedModelError("the model accepts any input size: give its native input_size")
        window = tuple(int(v) for v in input_size)
    channels = int(in_shape[3])

    # Walk back from the output through the head to the layer that drops the spatial layout.
    head_ops = []
    tensor = functional.outputs[0]
    while True:
        op, node_index = _producer(tensor)
        if isinstance(op, (layers.Flatten, layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D)):
            if getattr(op, "keepdims", False):
                raise UnsupportedModelError(f"layer {op.name!r}: global pooling with keepdims=True ends no head")
            pool_layer = op
            feature_tensor = _single_input(op, node_index)
            break
        if isinstance(op, layers.InputLayer) or _is_graph_model(op):
            raise UnsupportedModelError(
                "no Flatten or global pooling layer found before the output; the head must be "
                "Flatten/GlobalAveragePooling2D/GlobalMaxPooling2D followed by Dense layers"
            )
        if not isinstance(op, (layers.Dense,) + _INFERENCE_NOOPS + _HEAD_ACTIVATIONS):
            raise UnsupportedModelError(
                f"layer {op.name!r} ({type(op).__name__}) in the classifier head is not supported; "
                "supported: Dense, activations, Dropout-like layers after Flatten or global pooling"
            )
        head_ops.append(op)
        tensor = _single_input(op, node_index)
    head_ops.reverse()
    if not any(isinstance(op, layers.Dense) for op in head_ops):
        raise UnsupportedModelError("the head has no Dense layer")
    if len(feature_tensor.shape) != 4:
        raise UnsupportedModelError(f"layer {pool_layer.name!r} does not follow a 4-D feature map")

    trunk_graph = keras.Model(functional.inputs, feature_tensor)
    field = receptive_field(trunk_graph)
    image = keras.Input((None, None, channels), name="image")
    features = keras.tree.flatten(_replay(trunk_graph, image))[0]
    trunk = keras.Model(image, features, name=f"{model.name}_trunk")
    feature_channels = int(features.shape[-1])
    feature_shape = trunk.compute_output_shape((1, *window, channels))
    feature_window = (int(feature_shape[1]), int(feature_shape[2]))

    head_input = keras.Input((None, None, feature_channels), name="features")
    x = head_input
    in_channels = feature_channels
    first_dense = True
    new_layers = []
    head_layers = []  # in order, so that the head can also be rebuilt without its first layer
    if isinstance(pool_layer, layers.GlobalAveragePooling2D):
        head_kind = "global_average"
        head_layers.append(layers.AveragePooling2D(feature_window, strides=1, padding="valid", name="window_average"))
        x = head_layers[-1](x)
    elif isinstance(pool_layer, layers.GlobalMaxPooling2D):
        head_kind = "global_max"
        head_layers.append(layers.MaxPooling2D(feature_window, strides=1, padding="valid", name="window_max"))
        x = head_layers[-1](x)
    else:
        head_kind = "flatten"
    for op in head_ops:
        if isinstance(op, _INFERENCE_NOOPS):
            continue
        if isinstance(op, layers.Dense):
            kernel_size = feature_window if (first_dense and head_kind == "flatten") else (1, 1)
            expected = kernel_size[0] * kernel_size[1] * in_channels
            if int(op.kernel.shape[0]) != expected:
                raise UnsupportedModelError(
                    f"layer {op.name!r} expects {op.kernel.shape[0]} inputs, the feature map gives {expected}"
                )
            conv = layers.Conv2D(
                op.units,
                kernel_size,
                padding="valid",
                activation=op.activation,
                use_bias=op.use_bias,
                name=f"{op.name}_conv",
                dtype=op.dtype_policy,
                kernel_initializer="zeros",
                bias_initializer="zeros",
            )
            x = conv(x)
            head_layers.append(conv)
            # Assign tensor to tensor: no numpy copy of a (VGG16: 411 MB) kernel on the way.
            conv.kernel.assign(keras.ops.reshape(op.kernel, (kernel_size[0], kernel_size[1], in_channels, op.units)))
            if op.use_bias:
                conv.bias.assign(op.bias)
            in_channels = op.units
            first_dense = False
        else:
            clone = type(op).from_config(op.get_config())
            x = clone(x)
            head_layers.append(clone)
            if op.get_weights():
                new_layers.append((clone, op.get_weights()))
    head = keras.Model(head_input, x, name=f"{model.name}_head")
    for layer, weights in new_layers:
        layer.set_weights(weights)

    window_conv, head_rest = None, None
    if head_kind == "flatten" and feature_window != (1, 1):
        window_conv = head_layers[0]
        rest_input = keras.Input((None, None, window_conv.filters), name="window_conv_output")
        y = rest_input
        for layer in head_layers[1:]:
            y = layer(y)
        head_rest = keras.Model(rest_input, y, name=f"{model.name}_head_rest")

    scores = head(trunk.output)
    fcn_model = keras.Model(trunk.input, scores, name=f"{model.name}_fcn")
    return FullyConvolutional(
        model=fcn_model,
        trunk=trunk,
        head=head,
        window=window,
        feature_window=feature_window,
        channels=channels,
        field=field,
        head_kind=head_kind,
        bytes_per_pixel=_largest_activation(trunk_graph) / (window[0] * window[1]),
        window_conv=window_conv,
        head_rest=head_rest,
    )


def _largest_activation(graph_model) -> float:
    """Bytes of the largest 4-D float32 tensor inside a model built at its native size."""
    largest = 0.0
    for nodes in _as_functional(graph_model)._nodes_by_depth.values():
        for node in nodes:
            if node.operation is not None and _is_graph_model(node.operation):
                largest = max(largest, _largest_activation(node.operation))
            for tensor in node.outputs:
                shape = tuple(tensor.shape)
                if len(shape) == 4 and None not in shape[1:]:
                    largest = max(largest, 4.0 * shape[1] * shape[2] * shape[3])
    return largest
