"""heatmap.tif and regions.geojson: exact geometry on small synthetic grids, read back through
tifffile and GDAL (rasterio for the raster, pyogrio for the vector), and the bundled model on a
generated scene through the real engine."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import tifffile
from PIL import Image
from shapely.geometry import shape

from shapes.scenes import generate_scene
from shared.jobspec import JobParams, ParameterError, validate_params
from shared.settings import Settings
from worker.grid import ScoreGrid
from worker.outputs.cell_geometry import cell_geotransform
from worker.outputs.raster_output import halve, write_raster
from worker.outputs.regions_output import write_regions

UTM = (500000.0, 0.5, 0.0, 4000000.0, 0.0, -0.5)  # level-0 pixel -> EPSG:32633 metres, north up
CUSTOM_WKT = (
    'PROJCS["custom TM",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],'
    'PARAMETER["latitude_of_origin",10],PARAMETER["central_meridian",13.5],PARAMETER["scale_factor",0.9996],'
    'PARAMETER["false_easting",400000],PARAMETER["false_northing",0],UNIT["metre",1]]'
)


def regular_grid(scores: np.ndarray, stride=(16, 16), window=(64, 64), offset=(0, 0)) -> ScoreGrid:
    rows = offset[0] + np.arange(scores.shape[0]) * stride[0]
    cols = offset[1] + np.arange(scores.shape[1]) * stride[1]
    return ScoreGrid(scores.astype(np.float32), rows, cols, window, stride, np.arange(scores.shape[2]))


def features(path) -> list[dict]:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def to_map(geotransform, x, y):
    x0, a, b, y0, d, e = geotransform
    return x0 + a * x + b * y, y0 + d * x + e * y


# --- regions: exact geometry -------------------------------------------------------------
def test_regions_are_merged_cell_squares_around_window_centres(tmp_path):
    scores = np.zeros((6, 8, 1))
    scores[1:3, 1:4, 0] = 0.9
    scores[2, 2, 0] = 1.0
    scores[4, 6, 0] = 0.7
    scores[5, 7, 0] = 0.6  # touches (4, 6) only at a corner: a region of its own
    scores[0, 0, 0] = 0.49  # below the threshold
    info = write_regions(tmp_path, regular_grid(scores), ["square"], 0.5, mpp=(0.25, 0.5))
    assert info == {"file": "regions.geojson", "map_file": None, "threshold": 0.5, "regions": {"square": 3}}
    found = features(tmp_path / "regions.geojson")
    geometries = [shape(f["geometry"]) for f in found]
    assert all(g.is_valid and g.geom_type == "Polygon" for g in geometries)
    # cells (1..2, 1..3): window centres 16 * j + 32, squares +-8 px
    assert geometries[0].equals(shapely.box(40, 40, 88, 72))
    assert geometries[1].equals(shapely.box(120, 88, 136, 104))
    assert geometries[2].equals(shapely.box(136, 104, 152, 120))
    first = found[0]["properties"]
    assert first["objectType"] == "annotation"
    assert first["classification"]["name"] == "square" and len(first["classification"]["color"]) == 3
    measured = first["measurements"]
    assert measured["max"] == pytest.approx(1.0) and measured["cells"] == 6
    assert measured["mean"] == pytest.approx((5 * 0.9 + 1.0) / 6)
    assert measured["area"] == 6 * 16 * 16 and measured["area_um2"] == pytest.approx(6 * 256 * 0.125)
    assert [f["properties"]["measurements"]["max"] for f in found] == pytest.approx([1.0, 0.7, 0.6])


def test_not_computed_cells_are_never_in_a_region_and_holes_stay_holes(tmp_path):
    scores = np.ones((5, 5, 2))
    scores[2, 2, :] = np.nan  # not computed, in the middle of hot cells
    scores[:, :, 1] = np.nan
    write_regions(tmp_path, regular_grid(scores, stride=(10, 10), window=(20, 20)), ["a", "b"], -1e9)
    found = features(tmp_path / "regions.geojson")
    assert [f["properties"]["classification"]["name"] for f in found] == ["a"]  # b: nothing computed
    region = shape(found[0]["geometry"])
    assert region.is_valid and len(region.interiors) == 1
    assert shapely.Polygon(region.interiors[0]).equals(shapely.box(25, 25, 35, 35))
    assert region.area == 24 * 100 and found[0]["properties"]["measurements"]["cells"] == 24
    assert not region.contains(shapely.Point(30, 30))


def test_tiled_grids_with_a_flush_last_column_keep_true_centres(tmp_path):
    scores = np.zeros((2, 4, 1))
    scores[:, 2:, 0] = 0.8  # the last two columns; the last one is pulled flush (origin 70, not 96)
    grid = ScoreGrid(
        scores.astype(np.float32), np.array([0, 32]), np.array([0, 32, 64, 70]), (64, 64), (32, 32), np.array([0])
    )
    write_regions(tmp_path, grid, ["x"], 0.5)
    (found,) = features(tmp_path / "regions.geojson")
    region = shape(found["geometry"])
    assert region.is_valid
    assert region.equals(shapely.box(96 - 16, 32 - 16, 102 + 16, 64 + 16))  # centres 96 and 102
    assert found["properties"]["measurements"]["cells"] == 4
    grid.scores[:, 2, 0] = 0.1  # only the flush column: its square starts midway between the centres
    write_regions(tmp_path, grid, ["x"], 0.5)
    (found,) = features(tmp_path / "regions.geojson")
    assert shape(found["geometry"]).equals(shapely.box((96 + 102) / 2, 32 - 16, 102 + 16, 64 + 16))


def test_map_regions_carry_the_crs_and_map_coordinates(tmp_path):
    scores = np.zeros((4, 4, 1))
    scores[1:3, 1:3, 0] = 0.9
    grid = regular_grid(scores, offset=(8, 4))
    info = write_regions(tmp_path, grid, ["circle"], 0.5, geotransform=UTM, epsg=32633)
    assert info["map_file"] == "regions_map.geojson"
    pixel = shape(features(tmp_path / "regions.geojson")[0]["geometry"])
    assert pixel.equals(shapely.box(4 + 32 + 8, 8 + 32 + 8, 4 + 32 + 40, 8 + 32 + 40))
    assert pyogrio.read_info(tmp_path / "regions_map.geojson")["crs"] == "EPSG:32633"  # GDAL/OGR reads the CRS
    _, _, map_geometries = pyogrio.raw.read(tmp_path / "regions_map.geojson")[:3]
    on_map = shapely.from_wkb(map_geometries[0])
    minx, miny, maxx, maxy = pixel.bounds
    (west, north), (east, south) = to_map(UTM, minx, miny), to_map(UTM, maxx, maxy)
    assert on_map.equals(shapely.box(west, south, east, north))
    assert on_map.exterior.is_ccw  # RFC 7946 right-hand rule in map coordinates
    measured = features(tmp_path / "regions_map.geojson")[0]["properties"]["measurements"]
    assert measured["area"] == pytest.approx(pixel.area * 0.25)


def test_map_regions_name_a_crs_without_epsg_code_by_its_wkt(tmp_path):
    scores = np.full((2, 2, 1), 0.9)
    write_regions(tmp_path, regular_grid(scores), ["x"], 0.5, geotransform=UTM, crs_wkt=CUSTOM_WKT)
    crs = pyogrio.read_info(tmp_path / "regions_map.geojson")["crs"]
    assert "custom TM" in crs and "Transverse" in crs


# --- heatmap.tif -------------------------------------------------------------------------
def grid_with_nan(rows=300, cols=520, classes=2, seed=0) -> ScoreGrid:
    scores = np.random.default_rng(seed).random((rows, cols, classes)).astype(np.float32)
    scores[:7, :9] = np.nan
    return regular_grid(scores, offset=(16, 32))


def test_geotiff_maps_every_cell_centre_to_its_window_centre_on_the_map(tmp_path):
    grid = grid_with_nan()
    info = write_raster(tmp_path, grid, ["circle", 'a<b &c "q"'], geotransform=UTM, epsg=32633, mpp=(0.25, 0.25))
    assert info["crs"] == "EPSG:32633" and len(info["levels"]) == 3
    rng = np.random.default_rng(1)
    picks = [(0, 0), (299, 519), *zip(rng.integers(0, 300, 20), rng.integers(0, 520, 20), strict=True)]
    with rasterio.open(tmp_path / "heatmap.tif") as src:
        assert src.crs.to_epsg() == 32633
        assert src.count == 2 and src.descriptions == ("circle", 'a<b &c "q"')
        assert np.isnan(src.nodata) and src.overviews(1) == [2, 4]
        band = src.read(1)
        for i, j in picks:
            centre_x = grid.cols[j] + grid.window[1] / 2  # level-0 pixels
            centre_y = grid.rows[i] + grid.window[0] / 2
            assert src.xy(int(i), int(j)) == pytest.approx(to_map(UTM, centre_x, centre_y))
    np.testing.assert_array_equal(band, grid.scores[:, :, 0])  # NaN where not computed, bit for bit
    with tifffile.TiffFile(tmp_path / "heatmap.tif") as tif:
        geo = tif.geotiff_metadata
        scale, tiepoint = geo["ModelPixelScale"], geo["ModelTiepoint"]
        for i, j in picks:  # the same through the raw GeoTIFF tags
            x = tiepoint[3] + (j + 0.5) * scale[0]
            y = tiepoint[4] - (i + 0.5) * scale[1]
            assert (x, y) == pytest.approx(to_map(UTM, grid.cols[j] + 32, grid.rows[i] + 32))
        assert int(geo["ProjectedCSTypeGeoKey"]) == 32633
        series = tif.series[0]
        assert [level.shape for level in series.levels] == [(2, 300, 520), (2, 150, 260), (2, 75, 130)]
        page = tif.pages[0]
        assert page.is_tiled and page.dtype == np.float32
        assert page.tags["XResolution"].value == (2500, 1)  # 1e4 um/cm / (0.25 um * 16 px) per cm
        np.testing.assert_allclose(series.levels[1].asarray(), halve(np.moveaxis(grid.scores, 2, 0)))


def test_geographic_and_rotated_georeferences(tmp_path):
    grid = grid_with_nan(40, 30, classes=1)
    geographic = (10.0, 1e-5, 0.0, 50.0, 0.0, -1e-5)
    write_raster(tmp_path, grid, ["x"], geotransform=geographic, epsg=4326)
    with rasterio.open(tmp_path / "heatmap.tif") as src:
        assert src.crs.to_epsg() == 4326 and src.count == 1
        assert tuple(src.transform.to_gdal()) == pytest.approx(cell_geotransform(grid, geographic))
    rotated = (1000.0, 0.3, 0.4, 2000.0, 0.4, -0.3)
    write_raster(tmp_path, grid, ["x"], geotransform=rotated, epsg=32633)
    with rasterio.open(tmp_path / "heatmap.tif") as src:
        assert src.crs.to_epsg() == 32633
        assert src.xy(5, 7) == pytest.approx(to_map(rotated, grid.cols[7] + 32, grid.rows[5] + 32))


def test_plain_and_non_epsg_rasters(tmp_path):
    grid = grid_with_nan(20, 20, classes=3)
    info = write_raster(tmp_path, grid, ["a", "b", "c"])
    assert info["geotransform"] is None and info["crs"] is None and len(info["levels"]) == 1
    with tifffile.TiffFile(tmp_path / "heatmap.tif") as tif:
        assert tif.geotiff_metadata is None
        description = json.loads(tif.pages[0].description)
        assert description["classes"] == ["a", "b", "c"] and description["origin"] == {
            "x": 32 + 32 - 8,
            "y": 16 + 32 - 8,
        }
        np.testing.assert_array_equal(tif.asarray(), np.moveaxis(grid.scores, 2, 0))
    info = write_raster(tmp_path, grid, ["a", "b", "c"], geotransform=UTM, crs_wkt=CUSTOM_WKT)
    assert "custom TM" in info["crs"]  # stated in the summary; GDAL gets the geotransform alone
    with rasterio.open(tmp_path / "heatmap.tif") as src:
        assert tuple(src.transform.to_gdal()) == pytest.approx(cell_geotransform(grid, UTM))


def test_halving_ignores_cells_not_computed():
    planes = np.array([[[1.0, np.nan, 5.0], [3.0, np.nan, 7.0], [np.nan, np.nan, 2.0]]], dtype=np.float32)
    np.testing.assert_array_equal(halve(planes), [[[2.0, 6.0], [np.nan, 2.0]]])


def test_threshold_parameter(tmp_path):
    from shared.catalog import ModelInfo

    info = ModelInfo("m", "keras_file", None, ("a", "b"), "none", (32, 32), None, "")
    assert validate_params({}, info).threshold == 0.5
    assert validate_params({"threshold": "-2.5"}, info).threshold == -2.5
    for bad in ("abc", "nan", "inf", "1e999", "0." + "1" * 60, True):
        with pytest.raises(ParameterError):
            validate_params({"threshold": bad}, info)
    assert JobParams.from_json({"model": "m"}).threshold == 0.5  # rows from before the parameter


# --- the bundled model on a generated scene ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode, stride", [("direct", None), ("tiled", 16)])
def test_regions_of_a_real_scene_contain_the_objects(tmp_path, mode, stride):
    from worker.engine import run_inference
    from worker.inference.model_registry import ModelRegistry

    labels = ["circle", "square", "triangle", "cross"]
    image, objects = generate_scene(640, 512, n_objects=4, seed=5, labels=labels)
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    registry = ModelRegistry(Settings().model_dirs)
    indices = tuple(registry.info("shapes").class_indices(labels))
    params = JobParams(model="shapes", mode=mode, stride=stride, batch_size=64, top_k=None, class_indices=indices)
    georeference = {"geotransform": UTM, "epsg": 32633, "mpp": (0.5, 0.5)}
    out = tmp_path / "out"
    summary = run_inference(path, params, registry, out, max_pixels=10**8, georeference=georeference)
    assert summary["regions"]["map_file"] == "regions_map.geojson" and summary["raster"]["crs"] == "EPSG:32633"
    by_class: dict[str, list] = {}
    for feature in features(out / "regions.geojson"):
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and feature["properties"]["measurements"]["max"] >= 0.5
        by_class.setdefault(feature["properties"]["classification"]["name"], []).append(geometry)
    for obj in objects:
        assert any(region.contains(shapely.Point(obj.center)) for region in by_class[obj.label]), (mode, obj)
    with np.load(out / "heatmap.npz") as npz, rasterio.open(out / "heatmap.tif") as src:
        assert src.crs.to_epsg() == 32633 and src.descriptions == tuple(labels)
        np.testing.assert_array_equal(src.read(), np.moveaxis(npz["scores"], 2, 0))
        window = npz["window"]
        i, j = len(npz["rows"]) // 2, len(npz["cols"]) // 3
        centre = to_map(UTM, npz["cols"][j] + window[1] / 2, npz["rows"][i] + window[0] / 2)
        assert src.xy(i, j) == pytest.approx(centre)
