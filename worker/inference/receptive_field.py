"""Receptive field and stride of an image model's output, computed from its layer graph.

Direct mode (``worker.inference.direct``) cuts an image into tiles; each tile needs a halo of at least
the trunk's receptive-field radius for its cells to equal the whole-image pass. The field is
derived layer by layer from the Keras graph (never from constants), following nested models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

layers = keras.layers


class UnsupportedModelError(ValueError):
    """The model cannot be converted; the message names the offending layer."""


class GlobalContextError(UnsupportedModelError):
    """The trunk has a layer that sees the whole image (squeeze-excitation): no finite halo
    makes direct mode's tiles exact, so such a model runs in tiled mode only."""


# Per-element or per-position layers: they keep the spatial layout and receptive field.
POINTWISE_LAYERS = tuple(
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

    def then(self, kernel, stride, dilation=(1, 1), pad_before=(0, 0)) -> ReceptiveField:
        """Compose with a sliding-window layer applied on top of this tensor."""
        jump, size, start = [], [], []
        for axis in range(2):
            k_eff = dilation[axis] * (kernel[axis] - 1) + 1
            j = self.jump[axis]
            size.append(self.size[axis] + (k_eff - 1) * j)
            start.append(self.start[axis] + ((k_eff - 1) / 2 - pad_before[axis]) * j)
            jump.append(j * stride[axis])
        return ReceptiveField(tuple(jump), tuple(size), tuple(start), self.global_layer)

    def compose(self, inner: ReceptiveField) -> ReceptiveField:
        """This field followed by a nested model whose own field (on its input) is `inner`."""
        jump = tuple(self.jump[a] * inner.jump[a] for a in range(2))
        size = tuple(self.size[a] + (inner.size[a] - 1) * self.jump[a] for a in range(2))
        start = tuple(self.start[a] + inner.start[a] * self.jump[a] for a in range(2))
        return ReceptiveField(jump, size, start, self.global_layer or inner.global_layer)

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


def as_functional(op):
    """The Functional graph behind a nested model (Sequential keeps one in `_functional`)."""
    if isinstance(op, keras.Sequential):
        inner = getattr(op, "_functional", None)
        if inner is None:
            raise UnsupportedModelError(f"nested Sequential {op.name!r} is not built; build it with an Input")
        return inner
    return op


def is_graph_model(op) -> bool:
    """Whether `op` is a (nested) model with a layer graph of its own."""
    return isinstance(op, keras.Model) and hasattr(as_functional(op), "_run_through_graph")


def _shifted(rf: ReceptiveField, rows: int, cols: int) -> ReceptiveField:
    """`rf` with its first cell moved by ``(rows, cols)`` cells (padding: negative, cropping: positive)."""
    start = (rf.start[0] + rows * rf.jump[0], rf.start[1] + cols * rf.jump[1])
    return ReceptiveField(rf.jump, rf.size, start, rf.global_layer)


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
        return _shifted(rf, -top, -left)
    if isinstance(op, layers.Cropping2D):
        (top, _), (left, _) = op.cropping
        return _shifted(rf, top, left)
    if isinstance(op, (layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D)):
        return ReceptiveField(rf.jump, rf.size, rf.start, rf.global_layer or op.name)
    if isinstance(op, layers.Dense) and _input_rank(op) == 4:
        return rf  # a Dense over the channels of a map (ConvNeXt's pointwise layers) is per-position
    if isinstance(op, (layers.Reshape, layers.Flatten, layers.Dense)):
        # Inside the trunk these only appear on a squeeze-excitation branch of shape (1, 1, C).
        return ReceptiveField(rf.jump, rf.size, rf.start, rf.global_layer or op.name)
    if isinstance(op, POINTWISE_LAYERS) or _is_elementwise(op):
        return rf
    raise UnsupportedModelError(
        f"cannot compute the receptive field of layer {name}: it is not a known convolution, pooling, "
        "padding or per-pixel layer"
    )


# Keras operations recorded in a graph when a model applies ``x + 3.0``, ``keras.ops.relu6``
# ... to a tensor (MobileNetV3's hard-sigmoid), and keras.applications' per-channel layers.
_ELEMENTWISE_OPS = frozenset(
    (
        "Add",
        "Subtract",
        "Multiply",
        "Divide",
        "TrueDivide",
        "Maximum",
        "Minimum",
        "Negative",
        "Square",
        "Sqrt",
        "Relu",
        "Relu6",
        "Sigmoid",
        "HardSigmoid",
        "HardSilu",
        "Silu",
        "Gelu",
        "Tanh",
        "Exp",
        "Clip",
        "Cast",
    )
)
_APPLICATION_LAYERS = frozenset(("LayerScale", "StochasticDepth", "CustomScaleLayer"))


def _is_elementwise(op) -> bool:
    """A per-element Keras operation, or a per-channel layer of keras.applications (ConvNeXt)."""
    module = type(op).__module__
    name = type(op).__name__
    if module.startswith("keras.src.ops.") and not isinstance(op, keras.layers.Layer):
        return name in _ELEMENTWISE_OPS
    return module.startswith("keras.src.applications.") and name in _APPLICATION_LAYERS


def _input_rank(op) -> int | None:
    try:
        return len(op.input.shape)
    except (AttributeError, ValueError):  # a layer used more than once has no single input
        return None


def _windowed(op, rf, kernel, stride, dilation) -> ReceptiveField:
    if op.padding == "same":
        pad = tuple(_same_pad_before(kernel[a], stride[a], dilation[a]) for a in range(2))
        return rf.then(kernel, stride, dilation, pad)
    return rf.then(kernel, stride, dilation, (0, 0))


def receptive_field(graph_model: keras.Model) -> ReceptiveField:
    """Receptive field of a single-input, single-output image model's output tensor."""
    functional = as_functional(graph_model)

    def call(op, *args, **kwargs):
        inputs = [a for a in keras.tree.flatten((args, kwargs)) if isinstance(a, ReceptiveField)]
        if not inputs:
            raise UnsupportedModelError(f"layer {op.name!r} has no image input")
        if is_graph_model(op):
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
        )
        return _layer_field(op, merged)

    outputs = functional._run_through_graph(ReceptiveField(), operation_fn=lambda op: op, call_fn=call)
    return keras.tree.flatten(outputs)[0]
