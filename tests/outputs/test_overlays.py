"""Overlays a person can read (worker.outputs.blend, worker.outputs.artifacts): max blending, heat scaled to
each class's own range, peaks, the legend, and - with numbers - that every object of the
demo scene lights up in its own class's overlay.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from worker.grid import ScoreGrid
from worker.inference.tiled import window_origins
from worker.outputs.artifacts import LEGEND_HEIGHT, colormap, write_overlays
from worker.outputs.blend import CHANCE_FRACTION, DIM_BRIGHTNESS, blend, class_heat, class_peaks

# The overlay contrast margins (test_every_demo_object_lights_up_in_its_class_overlay): inside
# each object's box the mean heat is at least half of its class's range, and at least
# CONTRAST times the mean heat far from every object.
MIN_INSIDE_HEAT = 0.5
CONTRAST = 20.0


def grid_of(scores, rows, cols, window, stride) -> ScoreGrid:
    scores = np.asarray(scores, np.float32)
    return ScoreGrid(scores, np.asarray(rows), np.asarray(cols), window, stride, np.arange(scores.shape[2]))


def random_grid(image_size=(23, 19), window=(8, 6), stride=(5, 4), classes=3, seed=0) -> ScoreGrid:
    rows = window_origins(image_size[0], window[0], stride[0])
    cols = window_origins(image_size[1], window[1], stride[1])
    scores = np.random.RandomState(seed).normal(size=(len(rows), len(cols), classes))
    return grid_of(scores, rows, cols, window, stride)


def brute_force(grid: ScoreGrid, image_size, canvas, reduce):
    """`reduce` over the scores of the windows containing each canvas pixel centre (NaN if none)."""
    out = np.full((*canvas, grid.scores.shape[2]), np.nan)
    for cy in range(canvas[0]):
        py = (cy + 0.5) * image_size[0] / canvas[0]
        for cx in range(canvas[1]):
            px = (cx + 0.5) * image_size[1] / canvas[1]
            covering = [
                grid.scores[i, j]
                for i, r in enumerate(grid.rows)
                for j, c in enumerate(grid.cols)
                if r <= py < r + grid.window[0] and c <= px < c + grid.window[1]
            ]
            if covering:
                out[cy, cx] = reduce(np.stack(covering), axis=0)
    return out


# --------------------------------------------------------------------------- blending


@pytest.mark.parametrize("canvas", [(23, 19), (11, 7), (46, 38)])
def test_max_blend_equals_brute_force(canvas):
    grid = random_grid()
    out = blend(grid, (23, 19), canvas, weighting="max")
    expected = brute_force(grid, (23, 19), canvas, np.max)
    assert not np.isnan(expected).any()
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_max_blend_on_an_irregular_tiled_grid():
    # Tiled mode pulls the last window flush with the border: origins 0, 5, 10, 15 then 17.
    grid = random_grid(image_size=(25, 21), window=(8, 6), stride=(5, 5), seed=4)
    np.testing.assert_allclose(
        blend(grid, (25, 21), (25, 21), weighting="max"), brute_force(grid, (25, 21), (25, 21), np.max), atol=1e-6
    )


def test_a_window_that_alone_sees_an_object_keeps_its_full_score():
    """Why max is the default: one window of 16 covering a pixel (window 64, stride 16) sees a
    small object; the mean divides its score by 16, the max keeps it."""
    origins = np.arange(0, 256 - 64 + 1, 16)
    scores = np.zeros((len(origins), len(origins), 1), np.float32)
    scores[6, 6, 0] = 1.0  # the window at (96, 96): an object near (128, 128)
    grid = grid_of(scores, origins, origins, (64, 64), (16, 16))
    maxed = blend(grid, (256, 256), (64, 64), weighting="max")[:, :, 0]
    mean = blend(grid, (256, 256), (64, 64), weighting="mean")[:, :, 0]
    assert maxed[32, 32] == 1.0 and maxed[24:40, 24:40].min() == 1.0  # the window's whole footprint
    assert maxed[:20].max() == 0.0  # and nothing beyond it
    assert mean.max() == pytest.approx(1 / 16)


def test_cells_without_scores_are_left_out():
    """NaN cells (windows a mask skipped) neither spread NaN nor count in an average."""
    grid = random_grid(seed=5)
    grid.scores[1, 1, :] = np.nan
    grid.scores[0, :, 0] = np.nan
    for weighting, reduce in (("max", np.nanmax), ("mean", np.nanmean)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: NaN expected there
            expected = brute_force(grid, (23, 19), (23, 19), reduce)
        out = blend(grid, (23, 19), (23, 19), weighting=weighting)
        np.testing.assert_allclose(out, expected, atol=1e-5, equal_nan=True)
    assert np.isnan(blend(grid, (23, 19), (23, 19), weighting="max")[0, 0, 0])  # only NaN windows there


def test_heat_is_scaled_to_each_class_own_range():
    grid = random_grid(classes=2, seed=6)
    grid.scores[:, :, 1] = grid.scores[:, :, 1] * 2.0 + 20.0  # scores that are not probabilities
    heat = class_heat(grid, (23, 19), (23, 19), weighting="max")
    maps = blend(grid, (23, 19), (23, 19), weighting="max")
    for channel in range(2):
        plane = heat.values[:, :, channel]
        assert plane.min() == pytest.approx(0.0) and plane.max() == pytest.approx(1.0)
        assert heat.low[channel] == pytest.approx(float(maps[:, :, channel].min()))
        assert heat.high[channel] == pytest.approx(float(maps[:, :, channel].max()))
    assert heat.near_chance == (False, False)
    # A given range (e.g. the overlay's, for viewer tiles at another size) is used as is.
    fixed = class_heat(grid, (23, 19), (46, 38), weighting="max", ranges=[(heat.low[0], heat.high[0])] * 2)
    assert fixed.low == (heat.low[0], heat.low[0])
    assert fixed.values[:, :, 1].min() == 1.0  # class 1's scores (~20) are above class 0's range


def test_near_chance_maps_are_drawn_dim_and_say_so(tmp_path):
    """Issue 19: an untrained model's map (0.352..0.418 on a 0..1 score scale) was stretched to
    full brightness. A class whose scores vary by less than CHANCE_FRACTION of the score scale
    is drawn from its minimum to at most DIM_BRIGHTNESS of the ramp, flagged `near_chance` in
    the summary, and the PNG's legend says so; a real map beside it keeps its full range."""
    grid = random_grid(classes=2, seed=6)
    grid.scores[:] = np.random.RandomState(7).uniform(size=grid.scores.shape)  # probabilities
    grid.scores[:, :, 0] = 0.352 + 0.066 * grid.scores[:, :, 0]  # near chance
    heat = class_heat(grid, (23, 19), (23, 19), weighting="max")
    assert heat.near_chance == (True, False)
    assert heat.values[:, :, 0].max() == pytest.approx(DIM_BRIGHTNESS, abs=1e-3)
    assert heat.values[:, :, 0].min() == pytest.approx(0.0, abs=1e-6)  # its variation stays visible
    assert heat.values[:, :, 1].max() == pytest.approx(1.0)
    assert 0.066 < CHANCE_FRACTION  # the map's range is within chance on the 0..1 scale
    image = np.full((230, 190, 3), 128, np.uint8)
    overlays = write_overlays(tmp_path, grid, image, ["unsure", "sure"], max_side=230, image_size=(23, 19))
    assert [c["scale"]["near_chance"] for c in overlays.classes] == [True, False]
    assert "near_chance" in overlays.legend["note"]


def test_peaks_one_per_bump_best_first():
    origins = np.arange(0, 200 - 32 + 1, 8)
    scores = np.full((len(origins), len(origins), 1), 0.05, np.float32)
    scores[4, 5, 0] = 0.9  # window centre (56, 48)
    scores[15, 16, 0] = 0.7
    scores[15, 17, 0] = 0.7  # a plateau: one marker
    scores[12, 2, 0] = 0.2  # below half the range: no marker
    grid = grid_of(scores, origins, origins, (32, 32), (8, 8))
    peaks = class_peaks(grid, 0)
    assert [(p.x, p.y) for p in peaks] == [(5 * 8 + 16, 4 * 8 + 16), (16 * 8 + 16, 15 * 8 + 16)]
    assert peaks[0].score == pytest.approx(0.9)


# --------------------------------------------------------------------------- the PNG


def test_overlay_png_has_legend_rings_and_summary_numbers(tmp_path):
    origins = np.arange(0, 320 - 32 + 1, 16)
    scores = np.zeros((len(origins), len(origins), 1), np.float32)
    scores[8, 8, 0] = 0.8  # window centre (144, 144)
    grid = grid_of(scores, origins, origins, (32, 32), (16, 16))
    image = np.full((320, 320, 3), 128, np.uint8)
    overlays = write_overlays(tmp_path, grid, image, ["thing"], max_side=320, weighting="max")
    entry = overlays.classes[0]
    assert entry["scale"] == {"low": 0.0, "high": pytest.approx(0.8), "near_chance": False}
    assert entry["peaks"] == [{"x": 144, "y": 144, "score": pytest.approx(0.8)}]
    assert overlays.legend["legend_height"] == LEGEND_HEIGHT and overlays.legend["weighting"] == "max"
    png = np.asarray(Image.open(tmp_path / overlays.files[0]).convert("RGB")).astype(int)
    assert png.shape == (320 + LEGEND_HEIGHT, 320, 3)
    # Heat: bright colour over the window that saw it, grey elsewhere.
    assert png[144, 144].tolist() != [png[144, 144][0]] * 3 and png[144, 144].sum() > png[20, 20].sum() + 150
    spread = png[:320].max(axis=2) - png[:320].min(axis=2)
    assert spread[20, 20] < 5
    # A cyan ring around the peak (outside the heat of the window, inside the image).
    cyan = [x for x in range(320) if png[144, x, 0] < 80 and png[144, x, 1] > 180 and png[144, x, 2] > 180]
    assert cyan and all(abs(x - 144) >= 6 for x in cyan) and {x > 144 for x in cyan} == {True, False}
    # The legend's colour bar runs from the colormap's dark end to its bright end.
    row = png[320 + 8]
    bar = np.flatnonzero((np.abs(row - 24).sum(axis=1) > 0) & (np.arange(320) > 320 // 3))
    assert len(bar) > 320 // 2
    np.testing.assert_allclose(row[bar[0]], colormap(np.array(0.0)), atol=40)
    np.testing.assert_allclose(row[bar[-1]], colormap(np.array(1.0)), atol=40)


def test_narrow_overlays_keep_their_size_and_state_the_legend(tmp_path):
    grid = random_grid(seed=8, classes=1)
    overlays = write_overlays(tmp_path, grid, np.zeros((23, 19, 3), np.uint8), ["x"], max_side=64)
    assert overlays.legend["legend_height"] == 0
    assert Image.open(tmp_path / overlays.files[0]).size == (19, 23)
    assert overlays.classes[0]["scale"]["high"] > overlays.classes[0]["scale"]["low"]


# --------------------------------------------------------------------------- the demo scene


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's scene (generate_scene, ten shapes, seed 2026) at half the demo's size, with
    the overlay at the demo's scale (1/4: objects of 24-44 px become 6-11 px)."""
    pytest.importorskip("keras")
    from shapes.scenes import generate_scene
    from shared.jobspec import JobParams
    from shared.settings import BUNDLED_MODELS_DIR
    from worker.engine import run_inference
    from worker.inference.model_registry import ModelRegistry

    image, objects = generate_scene(2048, 1536, n_objects=10, seed=2026)
    out = tmp_path_factory.mktemp("demo-overlays")
    params = JobParams(model="shapes", mode="direct", top_k=None, class_indices=(1, 2, 3, 4), overlay_max_side=512)
    Image.fromarray(image).save(out / "scene.png")
    summary = run_inference(out / "scene.png", params, ModelRegistry([BUNDLED_MODELS_DIR]), out, max_pixels=10**8)
    return out, summary, objects


def _far_from_objects(objects, size, scale, distance):
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    far = np.ones(size, bool)
    for obj in objects:
        far &= np.hypot((xx + 0.5) / scale - obj.center[0], (yy + 0.5) / scale - obj.center[1]) > distance
    return far


@pytest.mark.slow
def test_every_demo_object_lights_up_in_its_class_overlay(demo_run):
    """For every object: the mean heat inside its box (at the overlay's scale) is at least
    MIN_INSIDE_HEAT of its class's range and CONTRAST times the mean heat far (more than two
    windows) from every object. The heat is recomputed from heatmap.npz with the scale the
    overlay states in summary.json; the PNG itself is checked the same way by colour."""
    out, summary, objects = demo_run
    size = (summary["overlay_size"]["height"], summary["overlay_size"]["width"])
    scale = size[1] / summary["image"]["width"]
    assert scale == 0.25 and summary["overlay"]["weighting"] == "max"
    with np.load(out / "heatmap.npz") as data:
        grid = ScoreGrid(data["scores"], data["rows"], data["cols"], tuple(data["window"]), tuple(data["stride"]),
                         data["class_indices"])  # fmt: skip
        names = [str(name) for name in data["classes"]]
    ranges = [(c["scale"]["low"], c["scale"]["high"]) for c in summary["classes"]]
    heat = class_heat(grid, (1536, 2048), size, weighting="max", ranges=ranges)
    far = _far_from_objects(objects, size, scale, 2 * 64)
    report = []
    for obj in objects:
        channel = names.index(obj.label)
        x0, y0, x1, y1 = (int(round(v * scale)) for v in obj.bbox)
        inside = float(heat.values[y0:y1, x0:x1, channel].mean())
        background = float(heat.values[:, :, channel][far].mean())
        png = np.asarray(Image.open(out / summary["classes"][channel]["overlay"]).convert("RGB")).astype(int)[: size[0]]
        colour = png.max(axis=2) - png.min(axis=2)  # the base is grey: colour = heat
        report.append((obj.label, obj.center, round(inside, 3), round(background, 4)))
        assert inside >= MIN_INSIDE_HEAT, report
        assert inside >= CONTRAST * background, report
        assert colour[y0:y1, x0:x1].mean() >= CONTRAST * max(colour[far].mean(), 1.0), report
    print(json.dumps(report))
