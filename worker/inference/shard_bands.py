"""One job in shards: bands of output rows that separate processes compute, and their assembly.

A job's score grid is cut into bands of whole output rows. Each band is computed on its own,
anywhere, and the bands stacked in order give the unsharded grid to float rounding:

* **direct mode**: a band of output rows ``[row_start, row_stop)`` needs the trunk cells
  under their head span, and those cells are exact when computed from a full-width strip of
  the image with the receptive-field halo above and below - the tiles scheme's argument
  (``worker.inference.direct.plan_axis``): the strip's origin is a multiple of the network's
  alignment (its native stride) and its height keeps the image height's remainder modulo it,
  so TensorFlow's 'same' padding inside the strip matches the whole image's. The strip runs
  through ``direct_inference`` with the job's scheme (rows or tiles, either way exact) and
  only the band's rows are kept. The price is the overlap each seam adds: the halo on both
  sides plus the head span (``seam_rows``), computed by both neighbours.
* **tiled mode**: a band is a range of window rows; the windows of other rows are simply not
  computed (a `keep` restriction), so sharding adds no work at all.

Masks: a band holds only computed work (bands are balanced by computed windows, and a band
with none is never made), and within a band the mask still skips what it skips unsharded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from worker.grid import KeepFn, ProgressFn, ScoreGrid
from worker.inference.analysis_raster import Raster
from worker.inference.direct import direct_inference
from worker.inference.fcn import FullyConvolutional
from worker.inference.tiled import tiled_inference, window_origins

#: ``shards=auto`` gives each shard at least this many analysis pixels of computed work
#: (direct: the strip's pixels; tiled: the windows' pixels), so the cost of a shard (a queue
#: round trip, opening the image, the seams) stays small beside its inference. VGG16 direct
#: in bf16 on a 2-core CPU runs about 0.5 MP/s: 2 MP is a few seconds of work per shard.
AUTO_MIN_SHARD_PIXELS = 2_000_000
#: ``shards=auto`` keeps each direct-mode band at least this many times its seam overlap high,
#: so that the recomputed overlap stays a small part of every shard's work.
AUTO_MIN_BAND_PER_SEAM = 2


@dataclass(frozen=True)
class Band:
    """Output rows ``[row_start, row_stop)``, computed from analysis-pixel rows
    ``[pixel_start, pixel_stop)`` (direct: the strip with its halo; tiled: the windows' rows)."""

    index: int
    row_start: int
    row_stop: int
    pixel_start: int
    pixel_stop: int
    work: int  # computed windows in the band (the balance weight)


@dataclass(frozen=True)
class GridGeometry:
    """The whole job's grid: window row and column origins (analysis pixels) and, for direct
    mode, the network that fixes the strips' halos."""

    rows: np.ndarray
    cols: np.ndarray
    window: tuple[int, int]
    height: int
    width: int
    fcn: FullyConvolutional | None = None  # direct mode

    @classmethod
    def direct(cls, fcn: FullyConvolutional, height: int, width: int) -> GridGeometry:
        out_rows, out_cols = fcn.output_shape(height, width)
        rows = np.arange(out_rows, dtype=np.int64) * fcn.stride[0]
        cols = np.arange(out_cols, dtype=np.int64) * fcn.stride[1]
        return cls(rows, cols, fcn.window, height, width, fcn)

    @classmethod
    def tiled(cls, window: tuple[int, int], stride: tuple[int, int], height: int, width: int) -> GridGeometry:
        rows = window_origins(height, window[0], stride[0])
        cols = window_origins(width, window[1], stride[1])
        return cls(rows, cols, tuple(window), height, width)

    def strip(self, row_start: int, row_stop: int) -> tuple[int, int]:
        """Analysis-pixel rows that give output rows ``[row_start, row_stop)`` exactly."""
        fcn = self.fcn
        if fcn is None:
            return int(self.rows[row_start]), int(self.rows[row_stop - 1]) + self.window[0]
        jump, align = fcn.stride[0], fcn.align[0]
        step = align // jump
        cells = fcn.trunk_cells(self.height, self.width)[0]
        cell_start = row_start // step * step
        cell_stop = min(cells, row_stop - 1 + fcn.head_span[0])
        halo_px = math.ceil(fcn.halo[0] / align) * align
        start = max(0, cell_start * jump - halo_px)
        stop = cell_stop * jump + halo_px
        if stop < self.height:
            stop += (self.height - stop) % align  # the image height's remainder mod the alignment
        stop = min(stop, self.height)
        # On a finer (a trous) grid the last origins of a strip need a whole native window
        # below them (FullyConvolutional.output_shape): grow the strip until its rows are there.
        while stop < self.height and fcn.output_shape(stop - start, self.width)[0] < row_stop - start // jump:
            stop = min(self.height, stop + align)
        return start, stop

    def seam_rows(self) -> int:
        """Analysis-pixel rows each seam between two bands makes both neighbours compute."""
        if self.fcn is None or len(self.rows) < 2:
            return 0
        middle = len(self.rows) // 2
        above, below = self.strip(0, middle), self.strip(middle, len(self.rows))
        return max(0, above[1] - below[0])


def plan_bands(geometry: GridGeometry, count: int, computed: np.ndarray | None = None) -> list[Band]:
    """At most `count` bands of whole output rows with about equal computed work each (all
    windows, or those `computed` keeps); rows without any computed window at a band's edges
    are left out, and no band is empty."""
    weights = np.full(len(geometry.rows), len(geometry.cols), np.int64)
    if computed is not None:
        weights = computed.sum(axis=1).astype(np.int64)
    total = int(weights.sum())
    if total == 0:
        return []
    count = max(1, min(count, int(np.count_nonzero(weights))))
    cumulative = np.cumsum(weights)
    # Row boundaries at equal steps of cumulative work.
    cuts = [0] + [int(np.searchsorted(cumulative, total * k / count, side="left")) + 1 for k in range(1, count)]
    cuts.append(len(weights))
    bands = []
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        nonzero = np.flatnonzero(weights[start:stop])
        if nonzero.size == 0:
            continue
        row_start, row_stop = start + int(nonzero[0]), start + int(nonzero[-1]) + 1
        pixel_start, pixel_stop = geometry.strip(row_start, row_stop)
        work = int(weights[row_start:row_stop].sum())
        bands.append(Band(len(bands), row_start, row_stop, pixel_start, pixel_stop, work))
    return bands


def auto_shard_count(geometry: GridGeometry, computed: np.ndarray | None, limit: int) -> int:
    """Shards for ``shards=auto``: enough computed work per shard to pay for it
    (``AUTO_MIN_SHARD_PIXELS``), direct bands at least ``AUTO_MIN_BAND_PER_SEAM`` seams high,
    at most `limit`; 1 (today's single run) for small images."""
    fraction = 1.0 if computed is None or computed.size == 0 else float(computed.mean())
    if geometry.fcn is not None:
        pixels = geometry.height * geometry.width * fraction
        seam = geometry.seam_rows()
        by_seam = geometry.height // max(1, AUTO_MIN_BAND_PER_SEAM * seam) if seam else limit
    else:
        windows = len(geometry.rows) * len(geometry.cols) * fraction
        pixels = windows * geometry.window[0] * geometry.window[1]
        by_seam = limit
    by_work = int(pixels // AUTO_MIN_SHARD_PIXELS)
    return max(1, min(limit, by_work, by_seam, len(geometry.rows)))


class _BandRaster(Raster):
    """Analysis rows ``[start, stop)`` of a raster, full width, as a raster of its own."""

    def __init__(self, raster: Raster, start: int, stop: int) -> None:
        self.raster, self.start = raster, start
        self.height, self.width = stop - start, raster.width
        self.scale = raster.scale

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.raster.read(y0 + self.start, y1 + self.start, x0, x1)


def _band_keeper(band: Band, rows: np.ndarray, base: KeepFn | None, offset: int) -> KeepFn:
    """`base` (the mask; all when None) limited to the band's rows; `offset` analysis pixels
    are added to the rows the engine asks about (a strip starts below the image's top)."""
    wanted = set(range(band.row_start, band.row_stop))
    origin = {int(top): index for index, top in enumerate(rows)}

    def keep(tops: np.ndarray, lefts: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        inside = np.asarray([origin.get(int(top) + offset, -1) in wanted for top in tops], dtype=bool)
        kept = np.ones((len(tops), len(lefts)), dtype=bool) if base is None else base(tops + offset, lefts, window)
        return np.asarray(kept, dtype=bool) & inside[:, None]

    return keep


def compute_band(
    geometry: GridGeometry,
    band: Band,
    raster: Raster,
    preprocess,
    *,
    mode_options: dict,
    class_indices=None,
    keep: KeepFn | None = None,
    progress: ProgressFn | None = None,
) -> ScoreGrid:
    """The band's rows of the job's grid (analysis pixels, every class or `class_indices`).

    `mode_options`: direct: ``{"scheme", "memory_budget_mb"}``; tiled: ``{"classifier",
    "stride", "batch_size"}``; `keep` is the job's mask (None: every window)."""
    if geometry.fcn is not None:
        strip = _BandRaster(raster, band.pixel_start, band.pixel_stop)
        offset_rows = band.pixel_start // geometry.fcn.stride[0]
        local = slice(band.row_start - offset_rows, band.row_stop - offset_rows)
        grid = direct_inference(
            geometry.fcn,
            strip,
            preprocess,
            memory_budget_mb=mode_options["memory_budget_mb"],
            class_indices=class_indices,
            progress=progress,
            keep=None if keep is None else _band_keeper(band, geometry.rows, keep, band.pixel_start),
            scheme=mode_options["scheme"],
            head_rows=(local.start, local.stop),  # the rows near the strip's edges are not the band's
        )
        if grid.scores.shape[1] != len(geometry.cols) or local.stop > grid.scores.shape[0]:
            raise AssertionError("a strip's grid does not line up with the job's grid")
    else:
        grid = tiled_inference(
            mode_options["classifier"],
            raster,
            preprocess,
            window=geometry.window,
            stride=mode_options["stride"],
            batch_size=mode_options["batch_size"],
            class_indices=class_indices,
            progress=progress,
            keep=_band_keeper(band, geometry.rows, keep, 0),
        )
        local = slice(band.row_start, band.row_stop)
    computed = None if keep is None else grid.computed[local]
    return replace(
        grid,
        scores=np.ascontiguousarray(grid.scores[local]),
        rows=geometry.rows[band.row_start : band.row_stop],
        computed=computed,
    )


def assemble(geometry: GridGeometry, parts: list[ScoreGrid], bands: list[Band], masked: bool) -> ScoreGrid:
    """The job's grid from its bands' parts (in any order); rows no band covers (no computed
    window there) are NaN and not computed. Counters (tiles read and skipped) are summed;
    ``halo_overhead`` is the strips' pixels over the image's."""
    if not parts:
        raise ValueError("no shard computed anything")
    first = parts[0]
    classes = first.scores.shape[2]
    scores = np.full((len(geometry.rows), len(geometry.cols), classes), np.nan, np.float32)
    computed = np.zeros((len(geometry.rows), len(geometry.cols)), dtype=bool)
    for band, part in zip(bands, parts, strict=True):
        scores[band.row_start : band.row_stop] = part.scores
        computed[band.row_start : band.row_stop] = True if part.computed is None else part.computed
    overhead = None
    if geometry.fcn is not None and not masked and all(p.halo_overhead is not None for p in parts):
        strips = sum(
            (b.pixel_stop - b.pixel_start) * geometry.width * p.halo_overhead for b, p in zip(bands, parts, strict=True)
        )
        overhead = strips / (geometry.height * geometry.width)
    return ScoreGrid(
        scores,
        rows=geometry.rows,
        cols=geometry.cols,
        window=first.window,
        stride=first.stride,
        class_indices=first.class_indices,
        computed=computed if (masked or not computed.all()) else None,
        tiles_read=sum(p.tiles_read for p in parts),
        tiles_skipped=sum(p.tiles_skipped for p in parts),
        scheme=first.scheme,
        halo_overhead=overhead,
        tile_raised_for_halo=any(p.tile_raised_for_halo for p in parts),
    )


def part_arrays(part: ScoreGrid) -> dict[str, np.ndarray]:
    """A band's part as plain arrays (what a shard stores: ``numpy.savez``)."""
    arrays = {
        "scores": part.scores,
        "rows": part.rows,
        "cols": part.cols,
        "window": np.asarray(part.window, np.int64),
        "stride": np.asarray(part.stride, np.int64),
        "class_indices": part.class_indices,
        "counters": np.asarray([part.tiles_read, part.tiles_skipped, int(part.tile_raised_for_halo)], np.int64),
        "halo_overhead": np.asarray(np.nan if part.halo_overhead is None else part.halo_overhead, np.float64),
        "scheme": np.asarray(part.scheme or ""),
    }
    if part.computed is not None:
        arrays["computed"] = part.computed
    return arrays


def part_from_arrays(arrays) -> ScoreGrid:
    """The inverse of `part_arrays`."""
    counters = [int(v) for v in arrays["counters"]]
    overhead = float(arrays["halo_overhead"])
    scheme = str(arrays["scheme"])
    return ScoreGrid(
        np.asarray(arrays["scores"], np.float32),
        rows=np.asarray(arrays["rows"]),
        cols=np.asarray(arrays["cols"]),
        window=tuple(int(v) for v in arrays["window"]),
        stride=tuple(int(v) for v in arrays["stride"]),
        class_indices=np.asarray(arrays["class_indices"], np.int64),
        computed=np.asarray(arrays["computed"], bool) if "computed" in arrays else None,
        tiles_read=counters[0],
        tiles_skipped=counters[1],
        scheme=scheme or None,
        halo_overhead=None if math.isnan(overhead) else overhead,
        tile_raised_for_halo=bool(counters[2]),
    )
