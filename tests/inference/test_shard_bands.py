"""Shards of one job (worker.inference.shard_bands): bands of output rows computed separately
and stacked give the unsharded grid, in direct mode (rows and tiles schemes, 'same'-padded
strided trunks, a trous grids) and tiled mode, with and without a mask; the band plan
covers every computed row once, balances computed work and never makes an empty band."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from score_checks import assert_close_scaled  # noqa: E402
from test_direct import random_image, same_padded_model, stride4_model, vgg_like_model  # noqa: E402

from worker.inference.analysis_raster import ArrayRaster  # noqa: E402
from worker.inference.direct import direct_inference  # noqa: E402
from worker.inference.fcn import to_fully_convolutional  # noqa: E402
from worker.inference.preprocess import get_preprocess  # noqa: E402
from worker.inference.shard_bands import (  # noqa: E402
    GridGeometry,
    assemble,
    auto_shard_count,
    compute_band,
    part_arrays,
    part_from_arrays,
    plan_bands,
)
from worker.inference.tiled import tiled_inference  # noqa: E402

TF = get_preprocess("tf")


def _sharded_direct(fcn, image, count, scheme, keep=None, budget=1024):
    geometry = GridGeometry.direct(fcn, *image.shape[:2])
    computed = None if keep is None else keep(geometry.rows, geometry.cols, geometry.window)
    bands = plan_bands(geometry, count, computed)
    options = {"scheme": scheme, "memory_budget_mb": budget}
    parts = [
        part_from_arrays(
            part_arrays(compute_band(geometry, b, ArrayRaster(image), TF, mode_options=options, keep=keep))
        )
        for b in bands
    ]
    return assemble(geometry, parts, bands, masked=keep is not None), bands


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("scheme", ["rows", "tiles"])
def test_vgg_like_bands_equal_the_whole_grid(count, scheme):
    fcn = to_fully_convolutional(vgg_like_model())
    image = random_image(997, 301, seed=4)
    whole = direct_inference(fcn, image, TF, scheme=scheme, memory_budget_mb=64)
    grid, bands = _sharded_direct(fcn, image, count, scheme, budget=64)
    assert len(bands) == count
    assert grid.scores.shape == whole.scores.shape and grid.computed is None
    assert_close_scaled(grid.scores, whole.scores)
    assert grid.scheme == scheme
    rows = [r for b in bands for r in range(b.row_start, b.row_stop)]
    assert rows == list(range(len(whole.rows)))  # every output row once, in order


@pytest.mark.parametrize(("height", "width"), [(203, 157), (250, 131)])
def test_same_padded_strided_trunk_bands_are_exact(height, width):
    fcn = to_fully_convolutional(same_padded_model())
    image = random_image(height, width, seed=5)
    whole = direct_inference(fcn, image, TF, scheme="tiles")
    grid, bands = _sharded_direct(fcn, image, 4, "tiles")
    assert len(bands) >= 2
    assert_close_scaled(grid.scores, whole.scores)


def test_a_trous_grid_bands_are_exact():
    fcn = to_fully_convolutional(stride4_model()).at_factor(2)
    image = random_image(181, 97, seed=6)
    whole = direct_inference(fcn, image, TF, scheme="tiles")
    grid, _ = _sharded_direct(fcn, image, 3, "tiles")
    assert_close_scaled(grid.scores, whole.scores)


def _stripe_keep(rows, cols, window):
    """A mask keeping two stripes of window rows and a column block: empty bands in between."""
    kept = np.zeros((len(rows), len(cols)), dtype=bool)
    kept[(rows < 40) | ((rows > 120) & (rows < 150)), :] = True
    kept[:, cols > 60] = False
    return kept


def test_masked_direct_bands_hold_only_computed_rows_and_are_exact():
    fcn = to_fully_convolutional(stride4_model())
    image = random_image(203, 157, seed=7)
    whole = direct_inference(fcn, image, TF, keep=_stripe_keep)
    grid, bands = _sharded_direct(fcn, image, 4, "tiles", keep=_stripe_keep)
    np.testing.assert_array_equal(grid.computed, whole.computed)
    assert np.isnan(grid.scores[~grid.computed]).all()
    assert_close_scaled(grid.scores[grid.computed], whole.scores[whole.computed])
    for band in bands:  # no band starts or ends on a row without computed windows
        assert whole.computed[band.row_start].any() and whole.computed[band.row_stop - 1].any()
    assert sum(b.work for b in bands) == int(whole.computed.sum())


@pytest.mark.parametrize("masked", [False, True])
def test_tiled_bands_equal_the_whole_grid(masked):
    keras.utils.set_random_seed(8)
    model = stride4_model()
    image = random_image(150, 131, seed=8)
    keep = _stripe_keep if masked else None
    whole = tiled_inference(model, image, TF, window=(32, 32), stride=(8, 8), batch_size=7, keep=keep)
    geometry = GridGeometry.tiled((32, 32), (8, 8), *image.shape[:2])
    computed = None if keep is None else keep(geometry.rows, geometry.cols, geometry.window)
    bands = plan_bands(geometry, 3, computed)
    options = {"classifier": model, "stride": (8, 8), "batch_size": 7}
    parts = [compute_band(geometry, b, ArrayRaster(image), TF, mode_options=options, keep=keep) for b in bands]
    grid = assemble(geometry, parts, bands, masked=masked)
    assert (grid.computed is None) == (not masked)
    if masked:
        np.testing.assert_array_equal(grid.computed, whole.computed)
    finite = np.isfinite(whole.scores)
    assert_close_scaled(grid.scores[finite], whole.scores[finite])
    assert sum(p.tiles_read for p in parts) >= whole.tiles_read  # each band its own batches


def test_plan_balances_computed_work_and_never_makes_an_empty_band():
    geometry = GridGeometry.tiled((32, 32), (8, 8), 400, 64)
    computed = np.zeros((len(geometry.rows), len(geometry.cols)), dtype=bool)
    computed[:5] = True  # heavy top
    computed[30:, :1] = True  # light tail
    bands = plan_bands(geometry, 4, computed)
    assert all(b.work > 0 for b in bands)
    covered = np.zeros(len(geometry.rows), dtype=bool)
    for band in bands:
        assert not covered[band.row_start : band.row_stop].any()
        covered[band.row_start : band.row_stop] = True
    assert covered[computed.any(axis=1)].all()
    assert plan_bands(geometry, 4, np.zeros_like(computed)) == []
    assert len(plan_bands(geometry, 100)) == len(geometry.rows)  # at most one band per row


def test_auto_count_splits_large_jobs_only():
    fcn = to_fully_convolutional(vgg_like_model())
    small = GridGeometry.direct(fcn, 600, 600)
    large = GridGeometry.direct(fcn, 4096, 4096)
    assert auto_shard_count(small, None, 16) == 1
    count = auto_shard_count(large, None, 16)
    assert 2 <= count <= 16
    assert 4096 / count >= 2 * large.seam_rows()  # bands stay two seams high
    assert auto_shard_count(large, None, 3) <= 3
    empty = np.zeros((len(large.rows), len(large.cols)), dtype=bool)
    empty[:2] = True  # a mask keeping little work: one shard
    assert auto_shard_count(large, empty, 16) == 1
