"""A trunk at a finer output stride, "a trous" (DeepLab's conversion), with the same weights.

Direct mode gives one cell per native output stride ``S`` (VGG16: 32 px). For ``S / f``
(``f`` in 2, 4, 8) the strides of the last downsampling layers (those whose input is already
at ``S / f`` px per cell or coarser) are removed, and every layer after them is dilated by
the stride removed before it: a layer that read coarse cells ``i*s - p + [0, k)`` now reads
fine cells ``D*(i*s - p) + D*[0, k)`` (dilation ``D``, padding ``D*p``), so fine cell
``D*i`` is computed from exactly the values the native pass uses (the native lattice equals
today's grid to float rounding) and fine cell ``D*i + a`` is the same computation shifted by
``a`` fine cells. The layers before the cut are called unchanged (they are shared: the extra
work is only the last block(s) and the head, on ``f**2`` more positions).

'same' padding is made explicit per call from the coarse size (TensorFlow's rule, as
``worker.inference.trunk_stream.same_padding``), scaled by ``D``: zeros for convolutions,
-inf for max pooling, the real-input count for a 'same' average pooling. With a trunk
without 'same' padding every fine cell therefore equals the classifier on its own window's
crop; with 'same' padding the cells whose field reaches the image border see that border's
padding where the classifier on a crop would see its own (as on the native grid).

Pooling has no dilation in Keras, so a dilated pooling is the max/mean of its ``k*k``
shifted slices. Any layer the receptive-field pass accepts as per-pixel is called as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np

from worker.inference.receptive_field import UnsupportedModelError, as_functional, is_graph_model
from worker.inference.trunk_stream import same_padding

layers = keras.layers

_CONVOLUTIONS = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)
_POOLINGS = (layers.MaxPooling2D, layers.AveragePooling2D)


@dataclass(frozen=True)
class _Fine:
    """A tensor of the converted trunk: ``value`` holds ``dilation`` fine cells per cell of
    the native tensor (``coarse`` cells long, ``jump`` input pixels per native cell)."""

    value: object
    dilation: tuple[int, int]
    coarse: tuple[int, int]
    jump: tuple[int, int]


class AtrousTrunk:
    """``trunk`` with output stride ``native_stride / factor``: call it like the trunk.

    ``compute_output_shape`` and every other attribute are the native trunk's, except that
    the output has ``factor`` times the cells per axis (the extra phases of the last native
    cell included; direct mode crops what no window needs).
    """

    def __init__(self, trunk: keras.Model, native_stride: tuple[int, int], factor: int):
        if any(s % factor for s in native_stride):
            raise UnsupportedModelError(f"the output stride {native_stride} is not divisible by {factor}")
        self.trunk = trunk
        self.factor = factor
        self.cut = tuple(s // factor for s in native_stride)
        self._twins: dict = {}
        self.largest_bytes = 0.0

    def __getattr__(self, name):
        return getattr(self.trunk, name)

    def compute_output_shape(self, shape):
        native = self.trunk.compute_output_shape(shape)
        return (native[0], native[1] * self.factor, native[2] * self.factor, native[3])

    def __call__(self, x, training: bool = False):
        x = keras.ops.convert_to_tensor(x)
        shape = tuple(int(v) for v in x.shape[1:3])
        start = _Fine(x, (1, 1), shape, (1, 1))
        out = _replay(self, self.trunk, start)
        if out.dilation != (self.factor, self.factor):
            raise UnsupportedModelError(f"the trunk's last strides do not give a factor {self.factor}")
        return out.value

    def layer(self, op, fine: _Fine):
        """`op` applied to a converted tensor (a new `_Fine`)."""
        name = f"{op.name!r} ({type(op).__name__})"
        if isinstance(op, _CONVOLUTIONS + _POOLINGS) and not isinstance(op, layers.Conv2DTranspose):
            return self._windowed(op, fine)
        if isinstance(op, (layers.ZeroPadding2D, layers.Cropping2D)):
            return _pad_or_crop(op, fine)
        if isinstance(op, layers.Dense) and len(fine.value.shape) == 4:
            return None  # a Dense over a map's channels (ConvNeXt's pointwise layers) is per-pixel
        if isinstance(op, (layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D, layers.Reshape, layers.Dense)):
            raise UnsupportedModelError(f"layer {name} needs the whole image: no finer stride in direct mode")
        return None  # per-pixel: the caller applies it as it is

    def _windowed(self, op, fine: _Fine) -> _Fine:
        kernel, stride, dilation = _geometry(op)
        geo = [_axis(fine, a, kernel[a], stride[a], dilation[a], op.padding, self.cut[a]) for a in range(2)]
        dil = tuple(g["dilation"] for g in geo)
        new_stride = tuple(g["stride"] for g in geo)
        if fine.dilation == (1, 1) and new_stride == stride:
            value = op(fine.value, training=False)  # before the cut: the layer as it is
        else:
            padded = _pad(fine.value, geo, _fill(op))
            if isinstance(op, _POOLINGS):
                value = _dilated_pool(op, padded, fine.value, geo, kernel, dil, new_stride)
            else:
                value = self._twin(op, dil, new_stride, padded.shape)(padded, training=False)
            value = value[:, : geo[0]["out_fine"], : geo[1]["out_fine"]]
        self._measure(value)
        return _Fine(
            value,
            tuple(g["out_dilation"] for g in geo),
            tuple(g["out_coarse"] for g in geo),
            tuple(g["jump"] for g in geo),
        )

    def _twin(self, op, dilation, stride, shape):
        """`op` as a 'valid' layer with the given dilation and stride, sharing its weights (built once)."""
        key = (id(op), dilation, stride)
        twin = self._twins.get(key)
        if twin is None:
            if any(s > 1 for s in stride) and any(d > 1 for d in dilation):
                raise UnsupportedModelError(f"layer {op.name!r} would need a stride and a dilation at once")
            config = op.get_config() | {"padding": "valid", "strides": stride, "dilation_rate": dilation}
            config["name"] = f"{op.name}_atrous"
            twin = type(op).from_config(config)
            twin.build(tuple(shape))
            for target, source in zip(twin.weights, op.weights, strict=True):
                target.assign(source)
            self._twins[key] = twin
        return twin

    def _measure(self, value) -> None:
        shape = tuple(int(v) for v in value.shape)
        self.largest_bytes = max(self.largest_bytes, 4.0 * float(np.prod(shape)))


def _replay(atrous: AtrousTrunk, graph_model, start: _Fine) -> _Fine:
    """Run `graph_model`'s graph on a `_Fine` input, each layer converted by `atrous`."""
    functional = as_functional(graph_model)

    def call(op, *args, **kwargs):
        if is_graph_model(op):
            return _replay(atrous, op, args[0])
        fines = [a for a in keras.tree.flatten((args, kwargs)) if isinstance(a, _Fine)]
        if not fines:
            raise UnsupportedModelError(f"layer {op.name!r} has no image input")
        if len({(f.dilation, f.coarse, tuple(f.value.shape[1:3])) for f in fines}) > 1:
            raise UnsupportedModelError(
                f"layer {op.name!r} merges tensors of different sizes at a finer stride; use the native stride"
            )
        if len(fines) == 1:
            converted = atrous.layer(op, fines[0])
            if converted is not None:
                return converted
        unwrap = lambda v: v.value if isinstance(v, _Fine) else v  # noqa: E731
        args, kwargs = keras.tree.map_structure(unwrap, (args, kwargs))
        value = op(*args, **kwargs)
        return _Fine(value, fines[0].dilation, fines[0].coarse, fines[0].jump)

    outputs = functional._run_through_graph(start, operation_fn=lambda op: op, call_fn=call)
    return keras.tree.flatten(outputs)[0]


def _geometry(op):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(int(x) for x in v)  # noqa: E731
    if isinstance(op, _POOLINGS):
        return pair(op.pool_size), pair(op.strides), (1, 1)
    if getattr(op, "data_format", "channels_last") != "channels_last":
        raise UnsupportedModelError(f"layer {op.name!r} uses channels_first")
    return pair(op.kernel_size), pair(op.strides), pair(op.dilation_rate)


def _axis(fine: _Fine, a: int, kernel: int, stride: int, dilation: int, padding: str, cut: int) -> dict:
    """One axis of a windowed layer on a converted tensor: paddings, dilation, stride, sizes."""
    n_coarse, d_in, jump = fine.coarse[a], fine.dilation[a], fine.jump[a]
    k_eff = dilation * (kernel - 1) + 1
    if padding == "same":
        before, _, out_coarse = same_padding(n_coarse, k_eff, stride)
    else:
        before, out_coarse = 0, (n_coarse - k_eff) // stride + 1
    fine_in, fine_out = min(jump, cut), min(jump * stride, cut)
    if fine_out % fine_in:
        raise UnsupportedModelError(f"a stride {stride} layer does not divide the finer stride {cut}")
    new_stride = fine_out // fine_in
    out_dilation = d_in * stride // new_stride
    out_fine = out_dilation * out_coarse
    n_fine = d_in * n_coarse
    span = d_in * (k_eff - 1) + 1
    after = max(0, (out_fine - 1) * new_stride + span - (n_fine + d_in * before))
    return {
        "before": d_in * before,
        "after": after,
        "dilation": d_in * dilation,
        "stride": new_stride,
        "out_dilation": out_dilation,
        "out_coarse": out_coarse,
        "out_fine": out_fine,
        "jump": jump * stride,
    }


def _fill(op) -> float:
    return -math.inf if isinstance(op, layers.MaxPooling2D) else 0.0


def _pad(value, geo, fill: float):
    pads = [[0, 0], [geo[0]["before"], geo[0]["after"]], [geo[1]["before"], geo[1]["after"]], [0, 0]]
    if not any(p for pair in pads for p in pair):
        return value
    return keras.ops.pad(value, pads, constant_values=fill)


def _dilated_pool(op, padded, original, geo, kernel, dilation, stride):
    """Max or average over the ``k*k`` dilated taps of each window (the real-input count for
    a 'same' average, as Keras divides)."""
    rows, cols = geo[0]["out_fine"], geo[1]["out_fine"]

    def taps(x):
        for dy in range(kernel[0]):
            for dx in range(kernel[1]):
                y0, x0 = dy * dilation[0], dx * dilation[1]
                yield x[
                    :,
                    y0 : y0 + (rows - 1) * stride[0] + 1 : stride[0],
                    x0 : x0 + (cols - 1) * stride[1] + 1 : stride[1],
                ]

    combine = keras.ops.maximum if isinstance(op, layers.MaxPooling2D) else keras.ops.add
    total = None
    for tap in taps(padded):
        total = tap if total is None else combine(total, tap)
    if isinstance(op, layers.MaxPooling2D):
        return total
    if op.padding != "same":
        return total / float(kernel[0] * kernel[1])
    ones = keras.ops.ones_like(original[..., :1])
    count = None
    for tap in taps(_pad(ones, geo, 0.0)):
        count = tap if count is None else count + tap
    return total / count


def _pad_or_crop(op, fine: _Fine) -> _Fine:
    """ZeroPadding2D / Cropping2D on a converted tensor: the same cells, ``dilation`` times."""
    padding = isinstance(op, layers.ZeroPadding2D)
    (top, bottom), (left, right) = op.padding if padding else op.cropping
    dy, dx = fine.dilation
    if fine.dilation == (1, 1):
        value = op(fine.value)
    elif padding:
        value = keras.ops.pad(fine.value, [[0, 0], [dy * top, dy * bottom], [dx * left, dx * right], [0, 0]])
    else:
        h, w = int(fine.value.shape[1]), int(fine.value.shape[2])
        value = fine.value[:, dy * top : h - dy * bottom, dx * left : w - dx * right]
    sign = 1 if padding else -1
    coarse = (fine.coarse[0] + sign * (top + bottom), fine.coarse[1] + sign * (left + right))
    return _Fine(value, fine.dilation, coarse, fine.jump)
