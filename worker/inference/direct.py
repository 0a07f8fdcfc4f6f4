"""Direct (fully convolutional) inference, exact and memory-bounded.

One forward pass of the converted network over the whole image gives every window's scores
at the network's output stride, but its activations grow with the image (VGG16's first block
at 8192x8192 is 17 GB per tensor). So the trunk runs tile by tile:

* tile origins are multiples of the trunk stride, so every tile's cell grid lines up with
  the whole image's grid;
* each tile carries a halo of at least the trunk's receptive-field radius (rounded up to
  the stride), except at the real image border, and its size keeps the image size's
  remainder modulo the stride (this keeps TensorFlow's "same" padding of strided layers
  identical to the whole-image pass);
* only each tile's interior cells are kept and stitched into row bands of the feature map;
* the head (a few convolutions over ``feature_window`` cells) runs on each band as soon as
  enough feature rows exist, and rows no longer needed are dropped.

The stitched result equals the whole-image pass to float rounding, while peak memory
depends on the tile size, which comes from the memory budget.

Two schemes compute the trunk (``scheme``):

* ``rows`` (``worker.inference.trunk_stream``): full-width row bands streamed layer by layer, each
  layer keeping the rows its successor still needs. No halo is recomputed; the band height
  comes from the budget. Chain trunks only (VGG-like), no mask.
* ``tiles``: tiles with halos as above. Any trunk; a mask skips the tiles no kept window
  needs; on JAX every tile has one shape (``uniform``), so XLA compiles the trunk once per
  job instead of once per distinct tile size.

``auto`` streams when it can on TensorFlow/PyTorch (an image that fits one tile is one pass
either way), and uses tiles on JAX (the GPU path: one compiled program over large tiles),
with a mask, with an explicit ``tile_cells``, or for trunks with skip connections. The next
tile or band is read and preprocessed on a thread while the current one computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import keras
import numpy as np

from shared.jobspec import DIRECT_SCHEMES
from worker.grid import KeepFn, ProgressFn, ScoreGrid, report
from worker.inference.analysis_raster import Raster, as_raster
from worker.inference.compiled_calls import compiled_call
from worker.inference.compute_precision import compute_device
from worker.inference.fcn import FullyConvolutional
from worker.inference.trunk_stream import band_rows_for_budget, stream_plan, stream_rows

# Cap on a tile's size on a CPU even when the memory budget allows more: in
# the tile sweep (bench/bench_engine.py --only sweep --tile-sweep) a few cache-friendly tiles
# beat one huge pass despite the halo recomputation, and larger tiles only cost memory. Not
# applied on a GPU, where the largest tile the budget allows is fastest.
DEFAULT_MAX_TILE_PIXELS = 1600 * 1600
# Cap on a row band's pixels (rows scheme), a speed/memory trade measured on VGG16 (bench/README.md,
# bench/results/band_sweep*): at 4096 px wide in float32, 128-row bands (0.5 MP) took 84.8 s
# at 2.25 GB peak, 256-row bands 76.7 s at 2.92 GB, 64-row bands 91.2 s; at 2048 px, 32-row
# bands were 1.27x slower than 512-row ones. 0.5 MP keeps a 4096-wide job under 2.5 GB.
DEFAULT_MAX_BAND_PIXELS = 2**19
# Rows scheme: the source is read at least this many rows at a time (a slide's tiles are
# 256-1024 px high; a band of a few rows per read would decode each tile row many times).
MIN_READ_ROWS = 256
# Bytes of working memory per byte of the largest activation (input + output of the widest
# layer plus the convolution library's scratch space).
ACTIVATION_OVERHEAD = 3.0


@dataclass(frozen=True)
class Span:
    """One tile along one axis: trunk cells [cell_start, cell_stop) computed from pixels
    [pixel_start, pixel_stop); the tile's own cell k is the image's cell k + offset."""

    cell_start: int
    cell_stop: int
    pixel_start: int
    pixel_stop: int

    def offset(self, jump: int) -> int:
        return self.pixel_start // jump


def plan_axis(
    length: int,
    jump: int,
    halo: int,
    cells_total: int,
    cells_per_tile: int,
    uniform: bool = False,
    align: int | None = None,
) -> list[Span]:
    """Cut one axis of `length` pixels into tiles of at most `cells_per_tile` trunk cells.

    One tile when the whole axis is no larger than a tile with its halo (same memory, no
    recomputation); otherwise the fewest tiles, balanced so no thin sliver is left at the end.
    With `uniform`, every tile gets the largest tile's pixel size (the first one extends
    down, the others start earlier): more context never changes a cell, and a compiled
    trunk (JAX/XLA) then sees one shape instead of recompiling for the edge tiles.
    `align` (a multiple of `jump`; default `jump`): tile origins and the remainder of their
    sizes follow this modulus, the native stride of an a trous network (finer cells, same
    'same' padding as the whole image).
    """
    if cells_per_tile <= 0:
        raise ValueError("cells_per_tile must be positive")
    align = align or jump
    step = align // jump  # cells per alignment unit
    halo_px = math.ceil(halo / align) * align
    if cells_per_tile >= cells_total or length <= cells_per_tile * jump + 2 * halo_px:
        return [Span(0, cells_total, 0, length)]
    count = math.ceil(cells_total / cells_per_tile)
    size = math.ceil(math.ceil(cells_total / count) / step) * step
    spans = []
    for cell_start in range(0, cells_total, size):
        cell_stop = min(cells_total, cell_start + size)
        pixel_start = max(0, cell_start * jump - halo_px)
        pixel_stop = cell_stop * jump + halo_px
        if pixel_stop < length:
            pixel_stop += (length - pixel_stop) % align  # same remainder mod stride as the image
        spans.append(Span(cell_start, cell_stop, pixel_start, min(pixel_stop, length)))
    if uniform:
        # Every size has the image's remainder mod the stride, so length - common is a multiple of it.
        common = max(s.pixel_stop - s.pixel_start for s in spans)
        spans = [
            Span(s.cell_start, s.cell_stop, start, start + common)
            for s in spans
            for start in [min(s.pixel_start, length - common)]
        ]
    return spans


def tile_cells_for_budget(
    fcn: FullyConvolutional, memory_budget_mb: float, max_tile_pixels: int | None = DEFAULT_MAX_TILE_PIXELS
) -> int:
    """Cells per tile side so that one tile's trunk activations fit the budget (and the
    pixel cap, None for none)."""
    budget_pixels = memory_budget_mb * 2**20 / (fcn.bytes_per_pixel * ACTIVATION_OVERHEAD)
    side = math.sqrt(budget_pixels if max_tile_pixels is None else min(budget_pixels, max_tile_pixels))
    halo = max(fcn.halo)
    jump = max(fcn.stride)
    align = max(fcn.align)
    halo_px = math.ceil(halo / align) * align
    cells = int((side - 2 * halo_px) // jump)
    step = align // jump
    return max(step, cells // step * step)


def direct_inference(
    fcn: FullyConvolutional,
    image: np.ndarray | Raster,
    preprocess: Callable[[np.ndarray], np.ndarray],
    *,
    memory_budget_mb: float = 1024,
    tile_cells: int | None = None,
    class_indices: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
    keep: KeepFn | None = None,
    scheme: str = "auto",
    band_rows: int | None = None,
    head_rows: tuple[int, int] | None = None,
) -> ScoreGrid:
    """Scores of every native window at the network's output stride.

    Args:
        fcn: the converted classifier (``worker.inference.fcn.to_fully_convolutional``).
        image: ``(H, W, C)`` uint8 pixels or a raster read tile by tile (each tile with its
            halo is read when needed and dropped after); preprocessing is applied per tile.
        preprocess: maps a uint8 crop to the model's float32 input.
        memory_budget_mb: bound for one tile's (or band's) activations; decides its size.
        tile_cells: trunk cells per tile side, overriding the budget (whole image: one pass);
            implies the ``tiles`` scheme under ``auto``.
        class_indices: keep only these model outputs (all when None).
        progress: ``progress(done, total)`` after each trunk tile or row band; may raise to stop.
        keep: ``keep(rows, cols, window) -> bool grid`` (a mask): other windows are NaN, and
            trunk tiles no kept window needs are never read (``tiles`` scheme).
        scheme: ``auto``, ``rows`` (line-buffer streaming; ValueError where the trunk or a
            mask rules it out) or ``tiles`` (module docstring).
        band_rows: input rows per band in the ``rows`` scheme, overriding the budget.
        head_rows: the head only for output rows ``[start, stop)`` (others NaN), scheme unchanged:
            a shard's strip keeps its band's rows alone (``worker.inference.shard_bands``).
    Returns a ScoreGrid with ``rows[i] = i * stride_y`` and ``cols[j] = j * stride_x``;
    ``scheme`` says which scheme ran.
    """
    raster = as_raster(image)
    rows, cols = _window_origins(fcn, raster, scheme)
    computed = None if keep is None else np.asarray(keep(rows, cols, fcn.window), dtype=bool)
    selection = None if class_indices is None else np.asarray(class_indices, dtype=np.int64)
    head_cells = _head_cells(computed, head_rows, (len(rows), len(cols)))
    stream = _HeadStream.for_grid(fcn, (len(rows), len(cols)), memory_budget_mb, selection, head_cells)
    stages = _streaming_stages(fcn, raster.height, raster.width, memory_budget_mb, scheme, tile_cells, computed)
    if stages is not None:
        work = _stream_trunk(fcn, raster, preprocess, stages, band_rows, memory_budget_mb, stream, progress)
    else:
        work = _tile_trunk(fcn, raster, preprocess, tile_cells, memory_budget_mb, computed, stream, progress)
    if computed is not None:  # cells computed only as neighbours of kept ones
        stream.scores[~computed] = np.nan
    return ScoreGrid(
        stream.scores,
        rows=rows,
        cols=cols,
        window=fcn.window,
        stride=fcn.stride,
        class_indices=np.arange(stream.scores.shape[2], dtype=np.int64) if selection is None else selection,
        computed=computed,
        scheme="tiles" if stages is None else "rows",
        **dict(zip(("tiles_read", "tiles_skipped", "halo_overhead", "tile_raised_for_halo"), work, strict=True)),
    )


def _head_cells(computed: np.ndarray | None, head_rows: tuple[int, int] | None, shape) -> np.ndarray | None:
    """Output cells the head computes: the kept ones (all without a mask) within `head_rows`."""
    if head_rows is None:
        return computed
    wanted = np.zeros(shape, dtype=bool)
    wanted[head_rows[0] : head_rows[1]] = True
    return wanted if computed is None else computed & wanted


def _window_origins(fcn: FullyConvolutional, raster: Raster, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Top and left pixel of every output row and column, after checking the arguments."""
    if scheme not in DIRECT_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(DIRECT_SCHEMES)}")
    height, width = raster.height, raster.width
    window = fcn.window
    if height < window[0] or width < window[1]:
        raise ValueError(f"image {width}x{height} is smaller than the model window {window[1]}x{window[0]}")
    out_rows, out_cols = fcn.output_shape(height, width)
    return np.arange(out_rows, dtype=np.int64) * fcn.stride[0], np.arange(out_cols, dtype=np.int64) * fcn.stride[1]


def _stream_trunk(fcn: FullyConvolutional, raster: Raster, preprocess, stages, band_rows, budget_mb, stream, progress):
    """The ``rows`` scheme: full-width bands through the stages into the head.

    The source is read in chunks of at least ``MIN_READ_ROWS`` rows (one read per chunk, on
    the prefetch thread) and fed to the stages band by band: thin full-width reads would
    decode every row of a tiled slide's tiles many times. Returns (chunks read, 0).
    """
    height, width = raster.height, raster.width
    if band_rows is None:
        cap = max(1, DEFAULT_MAX_BAND_PIXELS // width)
        band_rows = band_rows_for_budget(fcn.bytes_per_pixel, width, budget_mb, ACTIVATION_OVERHEAD, cap)
    # A chunk costs 5 bytes per value (uint8 read + float32 input): keep it under a quarter of the budget.
    affordable = int(budget_mb * 2**20 / (4 * width * fcn.channels * 5))
    read_rows = max(band_rows, min(MIN_READ_ROWS, affordable))
    chunks = [(y, min(height, y + read_rows), 0, width) for y in range(0, height, read_rows)]

    def bands():
        for chunk in _prefetched(raster, preprocess, chunks, [0, len(chunks), progress]):
            for y in range(0, chunk.shape[1], band_rows):
                yield chunk[:, y : y + band_rows]

    for features in stream_rows(stages, bands()):
        stream.add(features)
    return len(chunks), 0, 1.0, False  # every pixel through the trunk once: no halo


def _tile_trunk(fcn: FullyConvolutional, raster: Raster, preprocess, tile_cells, budget_mb, computed, stream, progress):
    """The ``tiles`` scheme: tiles with halos, stitched into the head; returns (tiles read, tiles skipped)."""
    cells_y, cells_x = fcn.trunk_cells(raster.height, raster.width)
    raised = False
    if tile_cells is None:
        tile_cells = _default_tile_cells(fcn, budget_mb)
        floor = halo_floor_cells(fcn)
        raised = tile_cells < floor and max(raster.height, raster.width) > tile_cells * max(fcn.stride)
        tile_cells = max(tile_cells, floor)
    uniform = _uniform_tiles()
    spans_y = plan_axis(raster.height, fcn.stride[0], fcn.halo[0], cells_y, tile_cells, uniform, fcn.align[0])
    spans_x = plan_axis(raster.width, fcn.stride[1], fcn.halo[1], cells_x, tile_cells, uniform, fcn.align[1])
    plan = _TilePlan(spans_y, spans_x, _needed_cells(computed, fcn.head_span, (cells_y, cells_x)))
    for band in _trunk_bands(fcn, raster, preprocess, spans_y, plan, cells_x, progress):
        stream.add(band)
    computed = sum(
        (sy.pixel_stop - sy.pixel_start) * (sx.pixel_stop - sx.pixel_start)
        for sy in spans_y
        for sx in spans_x
        if plan.wanted(sy, sx)
    )
    needed = raster.height * raster.width
    overhead = computed / needed if plan.needed is None else None  # under a mask: tiles_skipped says more
    return plan.total, len(spans_y) * len(spans_x) - plan.total, overhead, raised


def halo_floor_cells(fcn: FullyConvolutional) -> int:
    """Fewest cells per tile side so that a tile's halo at most doubles its side (at most 4x
    the pixels of its own cells): below that the halo dominates and the image is recomputed
    many times (a receptive field far larger than the tile the budget allows)."""
    align, jump = max(fcn.align), max(fcn.stride)
    halo_px = math.ceil(max(fcn.halo) / align) * align
    step = align // jump
    return max(step, math.ceil(2 * halo_px / jump / step) * step)


def _uniform_tiles() -> bool:
    """Whether every tile gets one shape: for a trunk compiled per input shape (JAX/XLA)."""
    return keras.backend.backend() == "jax"


def _default_tile_cells(fcn: FullyConvolutional, budget_mb: float) -> int:
    """Tile size from the budget; the pixel cap is a CPU cache effect, so a GPU gets the
    largest tiles its budget allows."""
    cap = None if compute_device()["kind"] == "gpu" else DEFAULT_MAX_TILE_PIXELS
    return tile_cells_for_budget(fcn, budget_mb, cap)


def resolve_scheme(fcn: FullyConvolutional, height: int, width: int, memory_budget_mb: float, masked: bool) -> str:
    """The scheme ``auto`` runs for a whole image of this size ("rows" or "tiles"): what
    every shard of a sharded job runs on its strip, so that the assembled grid is the one the
    unsharded job computes."""
    computed = np.ones((1, 1), dtype=bool) if masked else None
    stages = _streaming_stages(fcn, height, width, memory_budget_mb, "auto", None, computed)
    return "tiles" if stages is None else "rows"


def _streaming_stages(fcn: FullyConvolutional, height, width, memory_budget_mb, scheme, tile_cells, computed):
    """The trunk's stream stages when the ``rows`` scheme runs, None for ``tiles`` (see the module docstring)."""
    if scheme == "rows" and fcn.dilation > 1:
        raise ValueError("the rows scheme runs the native stride only; a finer stride needs the tiles scheme")
    if scheme == "tiles" or (scheme == "auto" and (tile_cells is not None or computed is not None)):
        return None
    if fcn.dilation > 1:
        return None  # a trous trunk (worker.inference.atrous): tiles only
    if scheme == "auto":
        if keras.backend.backend() == "jax":
            return None
        cells = _default_tile_cells(fcn, memory_budget_mb)
        cells_y, cells_x = fcn.trunk_cells(height, width)
        one_y = len(plan_axis(height, fcn.stride[0], fcn.halo[0], cells_y, cells)) == 1
        if one_y and len(plan_axis(width, fcn.stride[1], fcn.halo[1], cells_x, cells)) == 1:
            return None  # one whole-image pass: nothing to recompute, no per-band overhead
    elif computed is not None:
        raise ValueError("the rows scheme computes every window; a mask needs the tiles scheme")
    stages = stream_plan(fcn.trunk, height)
    if stages is None and scheme == "rows":
        raise ValueError("this trunk cannot stream (skip connections or a 'same' average pooling)")
    return stages


def _prefetched(raster: Raster, preprocess, boxes: list[tuple[int, int, int, int]], counter) -> Iterator:
    """Yield preprocessed crops ``(1, h, w, C)`` of `boxes` (y0, y1, x0, x1), reading and
    preprocessing the next one on a thread while the caller computes the current one.

    After the caller is done with a crop (it asks for the next), progress is reported;
    ``counter`` is ``[done, total, progress callback]``. A callback that raises stops the
    loop; at most the one crop already being read is wasted.
    """

    def load(box):
        crop = raster.read(*box)
        return preprocess(crop)[None]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = pool.submit(load, boxes[0]) if boxes else None
        try:
            for index in range(len(boxes)):
                current = pending.result()
                pending = pool.submit(load, boxes[index + 1]) if index + 1 < len(boxes) else None
                yield current
                del current
                counter[0] += 1
                report(counter[2], counter[0], counter[1])
        finally:  # stopped early (a raising callback, a closed generator): drop the read ahead
            if pending is not None:
                pending.cancel()


class _TilePlan:
    """Which trunk tiles hold a trunk cell some kept window needs (all when no mask)."""

    def __init__(self, spans_y: list[Span], spans_x: list[Span], needed: np.ndarray | None) -> None:
        self.spans_x = spans_x
        self.needed = needed
        self.total = sum(self.wanted(sy, sx) for sy in spans_y for sx in spans_x)

    def wanted(self, span_y: Span, span_x: Span) -> bool:
        if self.needed is None:
            return True
        return bool(self.needed[span_y.cell_start : span_y.cell_stop, span_x.cell_start : span_x.cell_stop].any())


def _needed_cells(computed: np.ndarray | None, feature_window: tuple[int, int], cells: tuple[int, int]):
    """Trunk cells under the head span (`feature_window`) of any computed output cell (a box dilation)."""
    if computed is None:
        return None
    fh, fw = feature_window
    padded = np.zeros((computed.shape[0] + 1, computed.shape[1] + 1), dtype=np.int64)
    padded[1:, 1:] = computed.astype(np.int64).cumsum(0).cumsum(1)
    ys = np.arange(cells[0])
    xs = np.arange(cells[1])
    y0, y1 = np.clip(ys - fh + 1, 0, computed.shape[0]), np.clip(ys + 1, 0, computed.shape[0])
    x0, x1 = np.clip(xs - fw + 1, 0, computed.shape[1]), np.clip(xs + 1, 0, computed.shape[1])
    count = padded[y1][:, x1] - padded[y0][:, x1] - padded[y1][:, x0] + padded[y0][:, x0]
    return count > 0


def _trunk_bands(fcn: FullyConvolutional, raster: Raster, preprocess, spans_y, plan: _TilePlan, cells_x, progress):
    """Trunk features of each row of tiles, stitched: ``(cells in span_y, cells_x, channels)`` per row.

    Tiles no kept window needs are neither read nor computed (their cells stay zero).
    """
    channels = fcn.feature_channels
    tiles = [(sy, sx) for sy in spans_y for sx in plan.spans_x if plan.wanted(sy, sx)]
    boxes = [(sy.pixel_start, sy.pixel_stop, sx.pixel_start, sx.pixel_stop) for sy, sx in tiles]
    crops = _prefetched(raster, preprocess, boxes, [0, plan.total, progress])
    for span_y in spans_y:
        band = np.zeros((span_y.cell_stop - span_y.cell_start, cells_x, channels), np.float32)
        for span_x in plan.spans_x:
            if plan.wanted(span_y, span_x):
                band[:, span_x.cell_start : span_x.cell_stop] = _trunk_tile(fcn, next(crops), span_y, span_x)
        yield band
    for _ in crops:  # no crop is left: this reports the last tile's progress
        pass


def _trunk_tile(fcn: FullyConvolutional, crop, span_y: Span, span_x: Span) -> np.ndarray:
    """Trunk features of one tile's interior cells (its halo cells cut off)."""
    trunk = fcn.trunk
    features = keras.ops.convert_to_numpy(compiled_call(trunk, "trunk", lambda t: trunk(t, training=False), crop))[0]
    oy, ox = span_y.offset(fcn.stride[0]), span_x.offset(fcn.stride[1])
    return features[span_y.cell_start - oy : span_y.cell_stop - oy, span_x.cell_start - ox : span_x.cell_stop - ox]


class _HeadStream:
    """Runs the head on feature rows as they arrive, keeping only the rows still needed.

    ``scores[next_out:]`` are still to be computed; ``buffer`` holds feature rows
    ``[buffer_start, buffer_start + len(buffer))``. With a ``computed`` grid the head runs
    only on the column runs of each chunk that hold a computed cell; the rest stay NaN.
    """

    def __init__(self, fcn: FullyConvolutional, scores: np.ndarray, head_rows: int, selection, computed) -> None:
        self.fcn = fcn
        self.scores = scores
        self.head_rows = head_rows
        self.selection = selection
        self.computed = computed
        self.buffer = None
        self.buffer_start = 0
        self.next_out = 0

    def add(self, band: np.ndarray) -> None:
        """Append a band of feature rows; compute every score row they complete, in chunks of `head_rows`."""
        fh, fw = self.fcn.head_span
        total = self.scores.shape[0]
        self.buffer = band if self.buffer is None else np.concatenate([self.buffer, band], axis=0)
        available = self.buffer_start + self.buffer.shape[0]
        while self.next_out < total and self.next_out + fh <= available:
            stop = min(available - fh + 1, self.next_out + self.head_rows, total)
            for c0, c1 in self._column_runs(self.next_out, stop):
                rows_in = self.buffer[
                    self.next_out - self.buffer_start : stop - self.buffer_start + fh - 1,
                    c0 : c1 + fw - 1,
                ]
                out = self.fcn.apply_head(rows_in[None])
                self.scores[self.next_out : stop, c0:c1] = out if self.selection is None else out[..., self.selection]
            self.next_out = stop
        self.buffer = self.buffer[self.next_out - self.buffer_start :]
        self.buffer_start = self.next_out

    @classmethod
    def for_grid(cls, fcn: FullyConvolutional, shape, memory_budget_mb: float, selection, computed) -> _HeadStream:
        """A stream filling a NaN grid of `shape`, the head run on as many rows as the budget allows."""
        kept = int(fcn.head.output.shape[-1]) if selection is None else len(selection)
        per_row = 4.0 * ACTIVATION_OVERHEAD * max(1, shape[1]) * fcn.head_width
        head_rows = max(1, int(memory_budget_mb * 2**20 / per_row))
        return cls(fcn, np.full((*shape, kept), np.nan, np.float32), head_rows, selection, computed)

    def _column_runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Output column ranges of rows [start, stop) to compute (all columns without a mask)."""
        cols = self.scores.shape[1]
        if self.computed is None:
            return [(0, cols)]
        wanted = np.flatnonzero(self.computed[start:stop].any(axis=0))
        if wanted.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(wanted) > self.fcn.head_span[1]) + 1
        return [(int(run[0]), int(run[-1]) + 1) for run in np.split(wanted, breaks)]
