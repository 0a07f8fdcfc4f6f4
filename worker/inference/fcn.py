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
(``worker.inference.tiled``) gives the classifier's exact per-window semantics instead.

The trunk's receptive field and stride come from ``worker.inference.receptive_field``, so that direct
mode can cut an image into tiles with a large enough halo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import keras
import numpy as np

from worker.inference.atrous import AtrousTrunk
from worker.inference.compiled_calls import compiled_call
from worker.inference.receptive_field import (
    GlobalContextError,
    ReceptiveField,
    UnsupportedModelError,
    as_functional,
    is_graph_model,
    receptive_field,
)

__all__ = ["FullyConvolutional", "GlobalContextError", "UnsupportedModelError", "to_fully_convolutional"]

layers = keras.layers


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
_HEAD_ACTIVATIONS = tuple(
    cls
    for name in ("Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax")
    if (cls := getattr(layers, name, None)) is not None
)


def _replay(graph_model, inputs):
    """Call the layers of `graph_model` on new symbolic inputs (sharing weights), skipping the
    fixed input-shape check of the original model and of nested models."""
    functional = as_functional(graph_model)

    def call(op, *args, **kwargs):
        if is_graph_model(op):
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
    trunk: keras.Model  # on JAX a JaxCompiledTrunk wrapping it (same attributes, one XLA program per call)
    head: keras.Model
    window: tuple[int, int]  # native input (h, w)
    feature_window: tuple[int, int]  # feature cells per native window (fh, fw)
    channels: int  # input channels
    field: ReceptiveField  # receptive field of one trunk cell
    head_kind: str  # "flatten" | "global_average" | "global_max"
    bytes_per_pixel: float  # largest trunk activation, float32 bytes per input pixel
    window_conv: layers.Conv2D | None = None  # the Flatten+Dense head's window-sized convolution
    head_rest: keras.Model | None = None  # the head after its window-sized first layer (convolution or pooling)
    dilation: int = 1  # a trous factor: native stride / this grid's stride (worker.inference.atrous)
    native_stride: tuple[int, int] | None = None  # tiles align to it (None: the stride itself)

    @property
    def align(self) -> tuple[int, int]:
        """Tile origins and sizes keep this modulus (TensorFlow's 'same' padding depends on it)."""
        return self.native_stride or self.stride

    @property
    def head_span(self) -> tuple[int, int]:
        """Trunk cells one output cell reads per axis (the feature window, dilated)."""
        return tuple((k - 1) * self.dilation + 1 for k in self.feature_window)

    @property
    def feature_channels(self) -> int:
        return int(self.trunk.output.shape[-1])

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
        Flatten+Dense head runs as one matrix product over gathered patches (im2col): with a
        window-sized kernel and few output positions the convolution is one large matrix
        product, which runs faster as a plain matmul than through TensorFlow's convolution
        (bench/README.md and ``bench/results/direct_im2col.*`` give the measurements). The
        whole head runs as one function compiled per band shape (``worker.inference.compiled_calls``).
        """
        return _as_float32(compiled_call(self, "head", self._head_scores, features))[0]

    def _head_scores(self, features):
        """The head's computation on a ``(1, R, C, F)`` band, as a tensor (traced once per shape)."""
        if self.window_conv is None and (self.dilation == 1 or self.head_rest is None):
            return self.head(features, training=False)
        if self.window_conv is None:
            pooled = _dilated_window_pool(features, self.feature_window, self.dilation, self.head_kind)
            return self.head_rest(pooled, training=False)
        conv = self.window_conv
        fh, fw = self.feature_window
        step = self.dilation
        _, rows, cols, channels = features.shape
        out_rows, out_cols = rows - (fh - 1) * step, cols - (fw - 1) * step
        # The layer's compute dtype (bfloat16 under a mixed policy): the same casts Keras applies
        # when the layer runs itself, so that both paths give the same numbers.
        dtype = conv.compute_dtype
        x = keras.ops.cast(keras.ops.convert_to_tensor(features), dtype)
        patches = keras.ops.concatenate(
            [
                x[:, dy * step : dy * step + out_rows, dx * step : dx * step + out_cols, :]
                for dy in range(fh)
                for dx in range(fw)
            ],
            axis=-1,
        )
        kernel = keras.ops.cast(keras.ops.reshape(conv.kernel, (fh * fw * channels, conv.filters)), dtype)
        y = keras.ops.matmul(keras.ops.reshape(patches, (out_rows * out_cols, fh * fw * channels)), kernel)
        if conv.use_bias:
            y = y + keras.ops.cast(conv.bias, dtype)
        y = conv.activation(keras.ops.reshape(y, (1, out_rows, out_cols, conv.filters)))
        return self.head_rest(y, training=False)

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """Output cells per axis: on a finer grid, every cell of the native grid's span plus
        the finer origins whose window still fits the image (the last native cell's phases)."""
        cells = self.trunk_cells(height, width)
        shape = tuple(cells[a] - self.head_span[a] + 1 for a in range(2))
        if self.dilation == 1:
            return shape
        out = []
        for a, length in enumerate((height, width)):
            native = cells[a] // self.dilation - self.feature_window[a] + 1
            fitting = (length - self.window[a]) // self.stride[a]
            out.append(min(shape[a], max((native - 1) * self.dilation, fitting) + 1))
        return tuple(out)

    def at_factor(self, factor: int) -> FullyConvolutional:
        """This network with output stride ``stride / factor`` (a trous; ``worker.inference.atrous``)."""
        if factor == 1:
            return self
        if self.dilation != 1:
            raise ValueError("convert the native network, not an already finer one")
        trunk = AtrousTrunk(self.trunk, self.stride, factor)
        trunk(np.zeros((1, *self.window, self.channels), np.float32))  # builds the twins, measures memory
        field = ReceptiveField(trunk.cut, self.field.size, self.field.start, self.field.global_layer)
        return replace(
            self,
            trunk=trunk,
            field=field,
            dilation=factor,
            native_stride=self.stride,
            bytes_per_pixel=max(self.bytes_per_pixel, trunk.largest_bytes / (self.window[0] * self.window[1])),
        )

    def trunk_cells(self, height: int, width: int) -> tuple[int, int]:
        shape = self.trunk.compute_output_shape((1, height, width, self.channels))
        return (int(shape[1]), int(shape[2]))


def _dilated_window_pool(features, window, dilation: int, kind: str):
    """The head's window pooling with its taps ``dilation`` cells apart (mean or max)."""
    x = keras.ops.convert_to_tensor(features)
    rows = int(x.shape[1]) - (window[0] - 1) * dilation
    cols = int(x.shape[2]) - (window[1] - 1) * dilation
    total = None
    for dy in range(window[0]):
        for dx in range(window[1]):
            tap = x[:, dy * dilation : dy * dilation + rows, dx * dilation : dx * dilation + cols]
            if total is None:
                total = tap
            else:
                total = keras.ops.maximum(total, tap) if kind == "global_max" else total + tap
    return total if kind == "global_max" else total / float(window[0] * window[1])


def _as_float32(tensor) -> np.ndarray:
    """Scores leave the engine as float32 whatever the compute precision."""
    return np.asarray(keras.ops.convert_to_numpy(tensor), dtype=np.float32)


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
    functional = as_functional(model)
    window, channels = _native_input(functional, input_size)
    pool_layer, feature_tensor, head_ops = _find_head(functional)

    trunk_graph = keras.Model(functional.inputs, feature_tensor)
    field = receptive_field(trunk_graph)
    if field.global_layer is not None:
        raise GlobalContextError(
            f"layer {field.global_layer!r} pools over the whole image inside the trunk (squeeze-excitation): "
            "direct mode cannot tile it exactly; use mode=tiled"
        )
    trunk = compiled_trunk(_build_trunk(trunk_graph, channels, model.name))
    feature_shape = trunk.compute_output_shape((1, *window, channels))
    feature_window = (int(feature_shape[1]), int(feature_shape[2]))

    head_kind, head_layers, head = _convert_head(
        pool_layer, head_ops, int(trunk.output.shape[-1]), feature_window, model.name
    )
    window_conv, head_rest = None, None
    if head_kind == "flatten" and feature_window != (1, 1):
        window_conv = head_layers[0]
        head_rest = _head_without_first_layer(head_layers, head_layers[0].filters, model.name)
    elif head_kind != "flatten":  # a finer grid pools with dilated taps, then runs the rest
        head_rest = _head_without_first_layer(head_layers, int(trunk.output.shape[-1]), model.name)

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


class JaxCompiledTrunk:
    """The trunk as one XLA program on the JAX backend (the GPU path).

    Calling a Keras model eagerly on JAX dispatches layer by layer; this wrapper runs the
    whole trunk as one ``jax.jit``-compiled function of (weights, image), so XLA fuses it and
    the weights are arguments (not constants baked into the program). XLA compiles once per
    input shape and caches the program: direct mode's tiles take at most a few distinct
    shapes (first, middle and last tile per axis), and repeated image sizes reuse them.
    Everything else (``layers``, ``output``, ``compute_output_shape``, ``predict``...) is the
    Keras model's own.
    """

    def __init__(self, model: keras.Model):
        import jax

        self.model = model
        self._run = jax.jit(lambda trainable, fixed, x: model.stateless_call(trainable, fixed, x, training=False)[0])

    def __call__(self, x, training: bool = False):
        trainable = [v.value for v in self.model.trainable_variables]
        fixed = [v.value for v in self.model.non_trainable_variables]
        return self._run(trainable, fixed, keras.ops.convert_to_tensor(x))

    def __getattr__(self, name):
        return getattr(self.model, name)


def compiled_trunk(trunk: keras.Model):
    """The trunk, compiled as one program where the backend does that per call (JAX)."""
    if keras.backend.backend() == "jax":
        return JaxCompiledTrunk(trunk)
    return trunk


def _native_input(functional, input_size) -> tuple[tuple[int, int], int]:
    """The classifier's native window ``(h, w)`` and input channels, after checking its input and output."""
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
    return window, int(in_shape[3])


def _find_head(functional):
    """Walk back from the output through the head to the layer that drops the spatial layout.

    Returns that layer (Flatten or global pooling), the 4-D feature tensor it consumes, and
    the head layers after it in order. A Flatten or Reshape of a 1x1 map after a global
    pooling (MobileNet's heads) is a per-position layer of the head, not its start.
    """
    head_ops = []
    tensor = functional.outputs[0]
    while True:
        op, node_index = _producer(tensor)
        if isinstance(op, _SPATIAL_ENDS) and not (
            isinstance(op, layers.Flatten) and _after_global_pooling(op, node_index)
        ):
            pool_layer = op
            feature_tensor = _single_input(op, node_index)
            break
        _check_head_layer(op, node_index)
        head_ops.append(op)
        tensor = _single_input(op, node_index)
    head_ops.reverse()
    if len(feature_tensor.shape) != 4:
        _check_head_layer(*_producer(feature_tensor))  # names a layer that reshaped the head's vectors
        raise UnsupportedModelError(f"layer {pool_layer.name!r} does not follow a 4-D feature map")
    return pool_layer, feature_tensor, head_ops


_SPATIAL_ENDS = (layers.Flatten, layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D)


def _after_global_pooling(op, node_index) -> bool:
    """Whether the input of `op` comes, through single-input head layers, from a global pooling."""
    tensor = _single_input(op, node_index)
    for _ in range(64):
        producer, index = _producer(tensor)
        if isinstance(producer, (layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D)):
            return True
        if isinstance(producer, layers.InputLayer) or is_graph_model(producer) or not _is_head_layer(producer, index):
            return False
        nodes = producer._inbound_nodes[index].input_tensors
        if len(nodes) != 1:
            return False
        tensor = nodes[0]
    return False


def _is_head_layer(op, node_index) -> bool:
    """Per-position layers a converted head keeps (or drops, for the no-ops)."""
    if isinstance(op, (layers.Dense, layers.Rescaling) + _INFERENCE_NOOPS + _HEAD_ACTIVATIONS):
        return True
    if isinstance(op, (layers.LayerNormalization, layers.BatchNormalization)):
        rank = len(_single_input(op, node_index).shape)
        axes = op.axis if isinstance(op.axis, (list, tuple)) else [op.axis]
        return [a % rank for a in axes] == [rank - 1]
    if isinstance(op, layers.Conv2D) and not isinstance(op, (layers.Conv2DTranspose, layers.DepthwiseConv2D)):
        one = (1, 1)
        return tuple(op.kernel_size) == one and tuple(op.strides) == one and op.groups == 1
    if isinstance(op, (layers.Reshape, layers.Flatten)):
        node = op._inbound_nodes[node_index]
        shapes = [tuple(node.input_tensors[0].shape[1:]), tuple(node.output_tensors[0].shape[1:])]
        return all(len(shape) == 1 or shape[:-1] == (1, 1) for shape in shapes)
    return False


def _check_head_layer(op, node_index) -> None:
    """Raise unless `op` may appear between the Flatten/global pooling layer and the output."""
    if isinstance(op, layers.InputLayer) or is_graph_model(op):
        raise UnsupportedModelError(
            "no Flatten or global pooling layer found before the output; the head must be "
            "Flatten/GlobalAveragePooling2D/GlobalMaxPooling2D followed by per-position layers"
        )
    if not _is_head_layer(op, node_index):
        raise UnsupportedModelError(
            f"layer {op.name!r} ({type(op).__name__}) in the classifier head is not supported; "
            "supported after Flatten or global pooling: Dense, 1x1 Conv2D, LayerNormalization and "
            "BatchNormalization over channels, Reshape/Flatten of a 1x1 map, activations, Rescaling, Dropout"
        )


def _build_trunk(trunk_graph, channels: int, name: str) -> keras.Model:
    """The trunk's layers (shared weights) on an input of any spatial size."""
    image = keras.Input((None, None, channels), name="image")
    features = keras.tree.flatten(_replay(trunk_graph, image))[0]
    return keras.Model(image, features, name=f"{name}_trunk")


def _convert_head(pool_layer, head_ops, feature_channels: int, feature_window, name: str):
    """The head rewritten as convolutions over a feature map of any size.

    Returns ``(head_kind, head_layers, head)``: the kind of head, its new layers in order
    (so that it can be rebuilt without its first layer), and the head model.
    """
    head_input = keras.Input((None, None, feature_channels), name="features")
    x = head_input
    in_channels = feature_channels
    head_kind, pooling = _window_pooling(pool_layer, feature_window)
    head_layers = []
    if pooling is not None:
        head_layers.append(pooling)
        x = pooling(x)
    new_weights = []
    first_dense = True
    for op in head_ops:
        if isinstance(op, _INFERENCE_NOOPS + (layers.Reshape, layers.Flatten)):
            continue  # no-ops at inference, or a reshape of a 1x1 map: the cell is the vector
        if head_kind == "flatten" and first_dense and feature_window != (1, 1) and not isinstance(op, layers.Dense):
            raise UnsupportedModelError(
                f"layer {op.name!r} ({type(op).__name__}) acts on the whole flattened map before the first Dense"
            )
        if isinstance(op, layers.Dense):
            kernel_size = feature_window if (first_dense and head_kind == "flatten") else (1, 1)
            layer = _dense_as_conv(op, kernel_size, in_channels)
            x = layer(x)
            _copy_dense_weights(op, layer, kernel_size, in_channels)
            in_channels = op.units
            first_dense = False
        else:
            layer = _per_position_twin(op)
            x = layer(x)
            in_channels = int(x.shape[-1])
            if op.get_weights():
                new_weights.append((layer, op.get_weights()))
        head_layers.append(layer)
    head = keras.Model(head_input, x, name=f"{name}_head")
    for layer, weights in new_weights:
        layer.set_weights(weights)
    return head_kind, head_layers, head


def _per_position_twin(op):
    """`op` rebuilt for a map of cells: normalisations over the last axis, a 1x1 convolution 'valid'."""
    config = op.get_config()
    if isinstance(op, (layers.LayerNormalization, layers.BatchNormalization)):
        config["axis"] = -1
    elif isinstance(op, layers.Conv2D):
        config["padding"] = "valid"
    return type(op).from_config(config)


def _window_pooling(pool_layer, feature_window):
    """The head's kind and the window-sized pooling that replaces a global pooling (None for Flatten)."""
    if isinstance(pool_layer, layers.GlobalAveragePooling2D):
        return "global_average", layers.AveragePooling2D(
            feature_window, strides=1, padding="valid", name="window_average"
        )
    if isinstance(pool_layer, layers.GlobalMaxPooling2D):
        return "global_max", layers.MaxPooling2D(feature_window, strides=1, padding="valid", name="window_max")
    return "flatten", None


def _dense_as_conv(op, kernel_size, in_channels: int):
    """An unbuilt ``Conv2D`` standing for Dense layer `op` over ``kernel_size`` cells of ``in_channels``."""
    expected = kernel_size[0] * kernel_size[1] * in_channels
    if int(op.kernel.shape[0]) != expected:
        raise UnsupportedModelError(
            f"layer {op.name!r} expects {op.kernel.shape[0]} inputs, the feature map gives {expected}"
        )
    return layers.Conv2D(
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


def _copy_dense_weights(op, conv, kernel_size, in_channels: int) -> None:
    # Assign tensor to tensor: no numpy copy of a (VGG16: 411 MB) kernel on the way.
    conv.kernel.assign(keras.ops.reshape(op.kernel, (kernel_size[0], kernel_size[1], in_channels, op.units)))
    if op.use_bias:
        conv.bias.assign(op.bias)


def _head_without_first_layer(head_layers, channels: int, name: str) -> keras.Model:
    """The head after its window-sized first layer (see `FullyConvolutional.apply_head`)."""
    rest_input = keras.Input((None, None, channels), name="window_output")
    y = rest_input
    for layer in head_layers[1:]:
        y = layer(y)
    return keras.Model(rest_input, y, name=f"{name}_head_rest")


def _largest_activation(graph_model) -> float:
    """Bytes of the largest 4-D float32 tensor inside a model built at its native size."""
    largest = 0.0
    for nodes in as_functional(graph_model)._nodes_by_depth.values():
        for node in nodes:
            if node.operation is not None and is_graph_model(node.operation):
                largest = max(largest, _largest_activation(node.operation))
            for tensor in node.outputs:
                shape = tuple(tensor.shape)
                if len(shape) == 4 and None not in shape[1:]:
                    largest = max(largest, 4.0 * shape[1] * shape[2] * shape[3])
    return largest
