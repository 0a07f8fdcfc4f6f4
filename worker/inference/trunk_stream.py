"""Line-buffer streaming of the trunk: direct mode without halo recomputation.

Tiling the trunk (``worker.inference.direct``'s ``tiles`` scheme) is exact only because every tile
carries a halo of the trunk's receptive-field radius, and that halo is computed twice (1.3x
the work for VGG16 at the default budget). Streaming removes it. The image is read in
full-width row bands, top to bottom, and pushed through the trunk layer by layer; each
layer keeps the few input rows its next output row still needs (its *line buffer*: kernel
minus stride rows) and computes every output row its input allows, exactly once. Nothing is
recomputed, and memory is bounded by the band height (chosen from the budget) plus the
line buffers (a few rows per layer), not by the image height.

Each layer runs as its "valid" twin on rows padded explicitly: the padding that a 'same'
layer adds around the whole image (TensorFlow's rule: ``total = max((out - 1) * stride +
kernel - size, 0)``, ``before = total // 2``) is added to the first and last bands only, and
to both sides of every row as it arrives (rows span the whole width). Zero for convolutions, -inf for
max pooling (which ignores padding). So every output value is computed from exactly the
inputs the whole-image pass uses, and the streamed map equals it to float rounding. Each
stage's layer (with its per-pixel layers) runs as one step compiled per band shape
(``worker.inference.compiled_calls``), kept on the trunk so that later jobs reuse it.

Scope: a *chain* trunk (every layer has one input: VGG, AlexNet-like, most plain CNNs) of
convolutions (also depthwise, separable, strided, dilated), max or 'valid' average pooling,
zero padding, cropping and per-pixel layers (activations, batch normalisation, rescaling).
A trunk with skip connections (ResNet, MobileNetV2) or a 'same' average pooling (which
divides by the unpadded count) is left to the tiles scheme: ``stream_plan`` returns None.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import keras
import numpy as np

from worker.inference.compiled_calls import compiled_call
from worker.inference.receptive_field import POINTWISE_LAYERS, as_functional

layers = keras.layers

_CONVOLUTIONS = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)
# Each 'same' layer's 'valid' twin, built on first use (weights copied once, not per job).
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class StreamStage:
    """One windowed layer (and the per-pixel layers after it), seen along the row axis.

    Output row ``r`` reads input rows ``[r * stride - pad_top, r * stride - pad_top + kernel)``;
    rows outside ``[0, in_rows)`` are padding of value ``fill``. Arriving rows are padded on
    both sides first (``pad_columns``, as the layer pads the image's width), so the buffer
    holds padded rows and ``apply`` (the layer's 'valid' twin, or a column pad/crop) runs on
    a slice of it without another copy.
    """

    name: str
    kernel: int  # effective kernel height (dilation included)
    stride: int
    pad_top: int  # negative: rows cropped
    in_rows: int
    out_rows: int
    fill: float
    apply: Callable
    pad_columns: Callable | None = None
    buffer: object = None  # input rows [buffer_start, received) not yet consumed
    buffer_start: int = 0
    received: int = 0
    next_out: int = 0
    after: list = field(default_factory=list)  # per-pixel layers applied to each output
    owner: object = None  # the trunk whose compiled steps this stage uses (None: eager)

    def _compute(self, band):
        """The layer and the per-pixel layers after it on a padded band (one compiled step per shape)."""
        out = self.apply(band)
        for layer in self.after:
            out = layer(out, training=False)
        return out

    def reset(self) -> None:
        self.buffer, self.buffer_start, self.received, self.next_out = None, 0, 0, 0

    def push(self, pending: list):
        """Take the next input rows (popped from `pending`, so that the caller holds no
        reference and they are freed as soon as they are copied into the buffer); return
        every output row they complete, or None."""
        rows = pending.pop()
        if self.pad_columns is not None:
            rows = self.pad_columns(rows)
        self.received += int(rows.shape[1])
        self.buffer = rows if self.buffer is None else keras.ops.concatenate([self.buffer, rows], axis=1)
        del rows
        self._drop_unneeded()
        if self.received >= self.in_rows:
            ready = self.out_rows
        else:
            ready = min(self.out_rows, (self.received - self.kernel + self.pad_top) // self.stride + 1)
        if ready <= self.next_out:
            return None
        start = self.next_out * self.stride - self.pad_top
        stop = (ready - 1) * self.stride - self.pad_top + self.kernel
        first, last = max(start, 0) - self.buffer_start, min(stop, self.in_rows) - self.buffer_start
        band = self.buffer if (first, last) == (0, int(self.buffer.shape[1])) else self.buffer[:, first:last]
        above, below = max(0, -start), max(0, stop - self.in_rows)
        if above or below:
            band = keras.ops.pad(band, [[0, 0], [above, below], [0, 0], [0, 0]], constant_values=self.fill)
        out = self._compute(band) if self.owner is None else compiled_call(self.owner, self.name, self._compute, band)
        del band
        self.next_out = ready
        self._drop_unneeded()
        return out

    def _drop_unneeded(self) -> None:
        """Forget input rows above the next output's window (skipped rows too when kernel < stride)."""
        keep_from = max(self.buffer_start, min(self.next_out * self.stride - self.pad_top, self.received))
        if keep_from > self.buffer_start:
            self.buffer = self.buffer[:, keep_from - self.buffer_start :]
            self.buffer_start = keep_from


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow's (and XLA's) 'same' padding of one axis: ``(before, after, out_size)``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def chain_layers(trunk) -> list | None:
    """The trunk's layers from input to output when each takes one input, else None."""
    functional = as_functional(getattr(trunk, "model", trunk))
    chain = []
    tensor = functional.outputs[0]
    while True:
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return None
        op = history.operation
        if isinstance(op, layers.InputLayer):
            break
        inputs = op._inbound_nodes[history.node_index].input_tensors
        if len(inputs) != 1:
            return None
        chain.append(op)
        tensor = inputs[0]
    chain.reverse()
    return chain


def stream_plan(trunk, height: int) -> list[StreamStage] | None:
    """Stages streaming `trunk` over an image `height` rows high, or None when it cannot stream."""
    chain = chain_layers(trunk)
    if chain is None:
        return None
    stages: list[StreamStage] = []
    rows = height
    for layer in chain:
        if isinstance(layer, POINTWISE_LAYERS):
            if not stages:  # a per-pixel layer on the input: a one-row stage of its own
                apply = functools.partial(layer, training=False)
                stages.append(StreamStage(layer.name, 1, 1, 0, rows, rows, 0.0, apply, owner=trunk))
            else:
                stages[-1].after.append(layer)
            continue
        stage = _stage(layer, rows)
        if stage is None:
            return None
        stage.owner = trunk  # the warm trunk keeps each stage's compiled steps across jobs
        stages.append(stage)
        rows = stage.out_rows
        if rows <= 0:
            return None
    return stages


def _stage(layer, rows: int) -> StreamStage | None:
    """The stage of one windowed or padding layer over an input `rows` high (None: unsupported)."""
    if isinstance(layer, layers.ZeroPadding2D):
        (top, bottom), (left, right) = layer.padding
        pad = layers.ZeroPadding2D(((0, 0), (left, right)), dtype=layer.dtype_policy)
        return StreamStage(layer.name, 1, 1, top, rows, rows + top + bottom, 0.0, pad)
    if isinstance(layer, layers.Cropping2D):
        (top, bottom), (left, right) = layer.cropping
        crop = layers.Cropping2D(((0, 0), (left, right)), dtype=layer.dtype_policy)
        return StreamStage(layer.name, 1, 1, -top, rows, rows - top - bottom, 0.0, crop)
    if isinstance(layer, _CONVOLUTIONS) and not isinstance(layer, layers.Conv2DTranspose):
        kernel, stride, dilation = layer.kernel_size, layer.strides, layer.dilation_rate
        fill = 0.0
    elif isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
        kernel, stride, dilation = layer.pool_size, layer.strides, (1, 1)
        if isinstance(layer, layers.AveragePooling2D) and layer.padding == "same":
            return None  # divides by the count of real inputs: not a padded 'valid' pooling
        fill = -math.inf
    else:
        return None
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    effective = [dilation[a] * (kernel[a] - 1) + 1 for a in range(2)]
    if layer.padding == "same":
        top, _, out_rows = same_padding(rows, effective[0], stride[0])
    else:
        top, out_rows = 0, (rows - effective[0]) // stride[0] + 1
    pad_columns = _ColumnPad(effective[1], stride[1], fill) if layer.padding == "same" else None
    return StreamStage(layer.name, effective[0], stride[0], top, rows, out_rows, fill, _valid_twin(layer), pad_columns)


class _ColumnPad:
    """Pad full-width rows on both sides as a 'same' layer pads the image's width."""

    def __init__(self, kernel_cols: int, stride_cols: int, fill: float):
        self.kernel_cols, self.stride_cols, self.fill = kernel_cols, stride_cols, fill

    def __call__(self, rows):
        left, right, _ = same_padding(int(rows.shape[2]), self.kernel_cols, self.stride_cols)
        if not (left or right):
            return rows
        return keras.ops.pad(rows, [[0, 0], [0, 0], [left, right], [0, 0]], constant_values=self.fill)


def _valid_twin(layer):
    """A copy of `layer` with ``padding='valid'`` and a copy of its weights, made once per
    layer (a warm worker's jobs reuse it; it goes with the layer when the model is dropped)."""
    if layer.padding == "valid":
        return layer
    twin = _TWINS.get(layer)
    if twin is None:
        twin = _TWINS[layer] = _make_valid_twin(layer)
    return twin


def _make_valid_twin(layer):
    config = layer.get_config()
    config["padding"] = "valid"
    config["name"] = f"{layer.name}_valid"
    twin = type(layer).from_config(config)
    if layer.weights:
        twin.build(layer.input.shape)
        for mine, theirs in zip(twin.weights, layer.weights, strict=True):
            mine.assign(theirs)
    return twin


def band_rows_for_budget(bytes_per_pixel: float, width: int, memory_budget_mb: float, overhead: float, cap: int) -> int:
    """Input rows per band so that one band's widest activation (with `overhead`) fits the budget."""
    rows = int(memory_budget_mb * 2**20 / (max(1, width) * bytes_per_pixel * overhead))
    return max(1, min(rows, cap))


def stream_rows(stages: list[StreamStage], bands: Iterator) -> Iterator[np.ndarray]:
    """Push input bands ``(1, rows, W, C)`` through the stages; yield trunk rows ``(rows, cols, C)``
    as float32 as soon as they are complete (the head consumes them in order).

    Each stage's output is handed on in a list the next stage pops, so at most one stage's
    input and output (plus its padded copy while it is made) are alive at a time.
    """
    for stage in stages:
        stage.reset()
    for band in bands:
        pending = [band]
        del band
        for stage in stages:
            out = stage.push(pending)
            if out is None:
                break
            pending.append(out)
            del out
        else:
            yield np.asarray(keras.ops.convert_to_numpy(pending.pop()), dtype=np.float32)[0]
