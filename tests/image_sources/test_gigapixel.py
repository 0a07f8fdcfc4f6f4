"""The large-image path: sources read by region equal whole decodes, the engine reading from
them equals the in-memory engine, peaks of the bundled model land inside the shapes at level 0
and at a coarser level (level-0 coordinates), masks skip work (NaN, `computed`, trunk calls
counted), and broken slides fail with clear codes. Inputs are made by tests/slide_inputs.py."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import tifffile
from call_counter import record_call
from PIL import Image
from slide_inputs import make_slide, write_geotiff, write_ome_tiff, write_pyramid_tiff

from shapes.scenes import generate_scene
from shared.exceptions import InputError
from shared.image_sources.slide_source import open_slide_source
from shared.image_sources.source_opener import open_image_source
from shared.image_sources.source_types import ImageError
from shared.jobspec import JobParams, ParameterError, validate_params
from shared.settings import Settings
from worker.engine import run_inference
from worker.inference.analysis_raster import LevelRaster, ResampledRaster, choose_resolution
from worker.inference.direct import MIN_READ_ROWS, direct_inference
from worker.inference.model_registry import ModelRegistry
from worker.inference.tiled import tiled_inference

MAX_PIXELS = 10**8
LABELS = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry(Settings().model_dirs)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_slide(tmp_path_factory.mktemp("slide"))


@pytest.fixture(scope="module")
def scene_tiff(tmp_path_factory):
    """A small pyramid of a busy scene (lossless tiles: exact comparisons)."""
    image, _ = generate_scene(700, 520, n_objects=3, seed=2)
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    levels = write_pyramid_tiff(path, image, levels=2, tile=128, compression="zlib")
    return path, levels


def _params(registry, **overrides) -> JobParams:
    info = registry.info("shapes")
    base = JobParams(model="shapes", top_k=None, class_indices=tuple(info.class_indices(LABELS)), batch_size=64)
    return dataclasses.replace(base, **overrides)


# --------------------------------------------------------------------------- sources


def test_region_reads_equal_whole_decode(slide):
    whole = [tifffile.imread(slide.path, level=i) for i in range(4)]
    with open_image_source(slide.path, max_pixels=MAX_PIXELS) as source:
        info = source.info
        assert (info.reader, info.width, info.height, info.mpp, info.is_slide) == (
            "tifffile",
            3072,
            2048,
            (0.25, 0.25),
            True,
        )
        assert [lv.downsample for lv in info.levels] == [1.0, 2.0, 4.0, 8.0]
        for level, (x, y, w, h) in [
            (0, (250, 300, 700, 333)),
            (0, (0, 0, 3072, 17)),
            (1, (5, 7, 900, 600)),
            (3, (0, 0, 384, 256)),
        ]:
            np.testing.assert_array_equal(source.read_region(level, x, y, w, h), whole[level][y : y + h, x : x + w])
        with pytest.raises(ValueError):
            source.read_region(0, 3000, 0, 100, 10)


def test_openslide_reads_the_same_pixels(scene_tiff, tmp_path):
    """A generic tiled TIFF through OpenSlide equals the tifffile reader (page-per-level layout)."""
    path, levels = scene_tiff
    plain = tmp_path / "generic.tif"
    tifffile.imwrite(plain, levels[0], tile=(128, 128), compression="zlib", photometric="rgb")
    slide = open_slide_source(str(plain), max_region_pixels=10**9, min_size=None, accept_generic=True)
    with slide, open_image_source(plain, max_pixels=MAX_PIXELS) as tiff:
        assert slide.info.reader == "openslide" and tiff.info.reader == "tifffile"
        np.testing.assert_array_equal(slide.read_region(0, 33, 45, 300, 200), tiff.read_region(0, 33, 45, 300, 200))
    # A vendor-neutral TIFF is not taken by OpenSlide when picked by content.
    assert open_slide_source(str(plain), max_region_pixels=10**9, min_size=None) is None


def test_ome_tiff_mpp_and_pixels(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / "image.ome.tif"
    write_ome_tiff(path, pixels, mpp=0.5)
    with open_image_source(path, max_pixels=MAX_PIXELS) as source:
        assert source.info.format == "OME-TIFF" and source.info.mpp == (0.5, 0.5)
        np.testing.assert_array_equal(source.read_region(0, 10, 20, 200, 100), pixels[20:120, 10:210])


def test_geotiff_georeference(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (256, 384, 3), dtype=np.uint8)
    path = tmp_path / "map.tif"
    write_geotiff(path, pixels)
    with open_image_source(path, max_pixels=MAX_PIXELS) as source:
        geo = source.info.georeference
        assert source.info.format == "GeoTIFF" and not source.info.is_slide
        assert geo.epsg == 32633
        assert geo.geotransform == (500000.0, 2.0, 0.0, 4200000.0, 0.0, -2.0)
        assert geo.geokey_directory[:4] == (1, 1, 0, 3)
        np.testing.assert_array_equal(source.read_region(0, 0, 0, 384, 256), pixels)


def test_ordinary_images_keep_pillow(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((80, 90, 3), np.uint8)).save(path)
    with open_image_source(path, max_pixels=MAX_PIXELS) as source:
        assert source.info.reader == "pillow" and source.info.levels[0].width == 90
    with pytest.raises(ImageError) as exc:
        open_image_source(path, max_pixels=80 * 90 - 1)
    assert exc.value.code == "too_many_pixels"


# --------------------------------------------------------------------------- engine from a source


@pytest.mark.slow
def test_direct_and_tiled_from_source_equal_in_memory(registry, scene_tiff):
    path, levels = scene_tiff
    loaded = registry.load("shapes")
    with open_image_source(path, max_pixels=MAX_PIXELS) as source:
        for level in (0, 1):
            raster = LevelRaster(source, level)
            tiles = direct_inference(loaded.fcn, raster, loaded.preprocess, tile_cells=6)
            whole = direct_inference(loaded.fcn, levels[level], loaded.preprocess, tile_cells=10**9)
            assert tiles.tiles_read > 4
            np.testing.assert_allclose(tiles.scores, whole.scores, rtol=0, atol=1e-4)
            before = source.regions_read
            rows = direct_inference(loaded.fcn, raster, loaded.preprocess, scheme="rows", band_rows=40)
            # Full-width reads of MIN_READ_ROWS rows, each fed to the trunk in 40-row bands.
            chunks = -(-raster.height // MIN_READ_ROWS)
            assert rows.scheme == "rows" and rows.tiles_read == source.regions_read - before == chunks > 1
            np.testing.assert_allclose(rows.scores, whole.scores, rtol=0, atol=1e-4)
            batched = tiled_inference(
                loaded.classifier, raster, loaded.preprocess, window=(64, 64), stride=24, batch_size=32
            )
            reference = tiled_inference(loaded.classifier, levels[level], loaded.preprocess, window=(64, 64), stride=24)
            np.testing.assert_allclose(batched.scores, reference.scores, rtol=0, atol=1e-5)


def test_resampled_reads_equal_whole_resize(scene_tiff):
    path, levels = scene_tiff
    with open_image_source(path, max_pixels=MAX_PIXELS) as source:
        raster = ResampledRaster(source, 0, 0.6)
        whole = np.asarray(
            Image.fromarray(levels[0]).resize(
                (raster.width, raster.height),
                Image.Resampling.BILINEAR,
                box=(0, 0, raster.width / 0.6, raster.height / 0.6),
            )
        )
        part = raster.read(40, 200, 100, 333)
        assert np.abs(part.astype(int) - whole[40:200, 100:333]).max() <= 1


# --------------------------------------------------------------------------- the bundled model on a slide


def _peaks(summary):
    return {entry["name"]: entry for entry in summary["classes"]}


@pytest.mark.slow
def test_peaks_inside_shapes_at_level0_and_level1(registry, slide, tmp_path):
    summary = run_inference(slide.path, _params(registry), registry, tmp_path / "l0", max_pixels=MAX_PIXELS)
    assert summary["mask"]["mode"] == "auto"  # the default for a slide
    assert 0.7 < summary["mask"]["masked_fraction"] < 0.97
    for obj in slide.fine:
        peak = _peaks(summary)[obj.label]
        assert peak["max"] > 0.5 and obj.contains(peak["peak"]["x"], peak["peak"]["y"], margin=4), (obj, peak)

    for overrides in ({"level": 1}, {"mpp": 0.5}):
        out = tmp_path / f"coarse{len(overrides)}{next(iter(overrides))}"
        summary = run_inference(slide.path, _params(registry, **overrides), registry, out, max_pixels=MAX_PIXELS)
        assert summary["source"]["analysis"]["level"] == 1
        for obj in slide.coarse:
            peak = _peaks(summary)[obj.label]
            assert peak["max"] > 0.5 and obj.contains(peak["peak"]["x"], peak["peak"]["y"], margin=8), (obj, peak)
        with np.load(out / "heatmap.npz") as data:
            assert int(data["window"][0]) == 128 and int(data["stride"][0]) == 32  # level-0 pixels
            assert int(data["cols"][-1]) + 128 <= 3072 + 32


class CountingTrunk:
    """The real trunk model, with its calls counted."""

    def __init__(self, trunk):
        self.trunk, self.calls = trunk, 0

    def __call__(self, x, **kwargs):
        record_call(self._count, x)  # each execution, also inside a compiled call
        return self.trunk(x, **kwargs)

    def _count(self, shape):
        self.calls += 1

    def __getattr__(self, name):
        return getattr(self.trunk, name)


@pytest.mark.slow
def test_masked_windows_are_nan_and_never_computed(registry, slide):
    from worker.inference.inference_plan import window_keeper
    from worker.inference.tissue_mask import auto_mask

    loaded = registry.load("shapes")
    counting = CountingTrunk(loaded.fcn.trunk)
    fcn = dataclasses.replace(loaded.fcn, trunk=counting)
    with open_image_source(slide.path, max_pixels=MAX_PIXELS) as source:
        raster = LevelRaster(source, 1)
        keep = window_keeper(auto_mask(source), raster.scale, 0.25)
        calls, before = [], source.regions_read
        masked = direct_inference(
            fcn, raster, loaded.preprocess, tile_cells=8, keep=keep, progress=lambda d, t: calls.append((d, t))
        )
        assert counting.calls == masked.tiles_read == source.regions_read - before == len(calls)
        assert calls[-1] == (masked.tiles_read, masked.tiles_read)
        assert masked.tiles_skipped > 2 * masked.tiles_read
        full = direct_inference(loaded.fcn, raster, loaded.preprocess, tile_cells=8)
    computed = masked.computed
    assert computed.any() and not computed.all()
    assert np.isnan(masked.scores[~computed]).all() and np.isfinite(masked.scores[computed]).all()
    np.testing.assert_allclose(masked.scores[computed], full.scores[computed], rtol=0, atol=1e-4)


def test_uploaded_mask_and_summary(registry, slide, tmp_path):
    mask = np.zeros((200, 300), np.uint8)  # any size: stretched over the image
    x, y, w, h = slide.tissue[0]
    mask[y * 200 // 2048 : (y + h) * 200 // 2048, x * 300 // 3072 : (x + w) * 300 // 3072] = 255
    mask_path = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_path)
    params = _params(registry, mask="image", mode="tiled", stride=32)
    out = tmp_path / "out"
    summary = run_inference(slide.path, params, registry, out, max_pixels=MAX_PIXELS, mask_image=mask_path)
    with np.load(out / "heatmap.npz") as data:
        computed, rows, cols = data["computed"], data["rows"], data["cols"]
        assert np.isnan(data["scores"][~computed]).all()
    inside_rows = (rows >= y - 64) & (rows + 64 <= y + h + 64)
    inside_cols = (cols >= x - 64) & (cols + 64 <= x + w + 64)
    assert computed.any() and not computed[~inside_rows].any() and not computed[:, ~inside_cols].any()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["mask"]["mode"] == "image" and on_disk["mask"]["masked_fraction"] > 0.9
    assert on_disk["mask"]["windows_computed"] == int(computed.sum())
    for obj in slide.fine:
        peak = _peaks(summary)[obj.label]["peak"]
        assert obj.contains(peak["x"], peak["y"], margin=8)


# --------------------------------------------------------------------------- parameters


def test_level_and_mpp_parameters(registry, slide, tmp_path):
    info = registry.info("shapes")
    assert validate_params({"level": "2"}, info).level == 2
    assert validate_params({"mpp": "0.5", "mask": "auto"}, info).mpp == 0.5
    for raw in ({"level": "1", "mpp": "1"}, {"level": "-1"}, {"mpp": "fast"}, {"mpp": "nan"}, {"mask": "maybe"}):
        with pytest.raises(ParameterError):
            validate_params(raw, info)
    with open_image_source(slide.path, max_pixels=MAX_PIXELS) as source:
        assert choose_resolution(source, None, 1.0).level == 2
        picked = choose_resolution(source, None, 0.7)
        assert picked.level == 1 and picked.factor == pytest.approx(0.5 / 0.7)
        with pytest.raises(InputError) as exc:
            choose_resolution(source, 9, None)
        assert exc.value.code == "invalid_parameter"
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(photo)
    with pytest.raises(InputError) as exc:
        run_inference(photo, _params(registry, mpp=0.5), registry, tmp_path / "o", max_pixels=MAX_PIXELS)
    assert exc.value.code == "no_resolution"


# --------------------------------------------------------------------------- broken slides


def _small_tiled(path, **kw):
    pixels = np.random.default_rng(3).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    write_pyramid_tiff(path, pixels, levels=2, tile=128, **kw)
    return pixels


def _patch_tag(path, code: int, value: int) -> None:
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages.first.tags[code].overwrite(value)


def _code(path, **kw) -> str:
    with pytest.raises(ImageError) as exc:
        with open_image_source(path, max_pixels=MAX_PIXELS, **kw) as source:
            for level, lv in enumerate(source.info.levels):
                source.read_region(level, 0, 0, lv.width, lv.height)
    return exc.value.code


def test_truncated_slide(tmp_path):
    path = tmp_path / "cut.tif"
    _small_tiled(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert _code(path) == "corrupt_image"


def test_garbage_tile_data(tmp_path):
    path = tmp_path / "garbage.tif"
    _small_tiled(path)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages.first.dataoffsets[5], tif.pages.first.databytecounts[5]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    assert _code(path) == "corrupt_image"


def test_lying_size_and_absurd_tiles(tmp_path):
    huge = tmp_path / "huge.tif"
    _small_tiled(huge)
    _patch_tag(huge, 256, 400_000)  # ImageWidth
    _patch_tag(huge, 257, 400_000)  # ImageLength
    assert _code(huge, max_region_pixels=10**10) == "too_many_pixels"
    tiles = tmp_path / "tiles.tif"
    _small_tiled(tiles)
    _patch_tag(tiles, 322, 1 << 20)  # TileWidth
    _patch_tag(tiles, 323, 1 << 20)  # TileLength
    assert _code(tiles) in ("tile_too_large", "corrupt_image")


def test_million_level_pyramid(tmp_path):
    """A SubIFDs tag with a million entries (4 MB) is refused from the header, quickly."""
    path = tmp_path / "levels.tif"
    pixels = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(path, pixels, tile=(16, 16), photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        first_ifd = tif.pages.first.offset
    data = bytearray(path.read_bytes())
    count = 1_000_000
    array_offset = len(data)
    data += struct.pack(f"<{count}I", *([first_ifd] * count))
    # Append a new IFD = the old one plus a SubIFDs entry, and point the header at it.
    with tifffile.TiffFile(path) as tif:
        tags = sorted(tif.pages.first.tags.values(), key=lambda t: t.code)
        entries = [(t.code, t.dtype, t.count, t.valueoffset) for t in tags]
    raw = bytes(data[first_ifd + 2 : first_ifd + 2 + 12 * len(entries)])
    new_entries = [raw[i * 12 : (i + 1) * 12] for i in range(len(entries))]
    new_entries.append(struct.pack("<HHII", 330, 4, count, array_offset))
    new_entries.sort(key=lambda e: struct.unpack("<H", e[:2])[0])
    ifd_offset = len(data)
    data += struct.pack("<H", len(new_entries)) + b"".join(new_entries) + struct.pack("<I", 0)
    data[4:8] = struct.pack("<I", ifd_offset)
    path.write_bytes(bytes(data))
    assert _code(path) == "corrupt_image"


def test_multipage_tiff_that_is_no_pyramid_still_refused(tmp_path):
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for _ in range(3):
            tif.write(np.zeros((64, 64, 3), np.uint8), tile=(16, 16), photometric="rgb")
    assert _code(path) == "multi_frame"


def test_input_url_rules():
    from shared.input_urls import check_input_url

    allowed = ["s3://slides/in", "file:///mnt/slides/"]
    assert check_input_url("s3://slides/in/a/b.svs", allowed) == "s3://slides/in/a/b.svs"
    assert check_input_url("file:///mnt/slides/x.tif", allowed) == "file:///mnt/slides/x.tif"
    cases = {
        "s3://slides/inx/a.svs": "url_not_allowed",
        "s3://other/in/a.svs": "url_not_allowed",
        "s3://slides/in/../secret/a.svs": "invalid_image_url",
        "file:///mnt/slides/./x.tif": "invalid_image_url",
        "http://user:pw@host/a.tif": "invalid_image_url",
        "s3://slides/in/a.svs#frag": "invalid_image_url",
        "/mnt/slides/x.tif": "invalid_image_url",
        "s3://slides/in/" + "a" * 500: "invalid_image_url",
    }
    for url, code in cases.items():
        with pytest.raises(InputError) as exc:
            check_input_url(url, allowed)
        assert exc.value.code == code, url
    with pytest.raises(InputError) as exc:
        check_input_url("s3://slides/in/a.svs", [])
    assert exc.value.code == "image_url_disabled"


def test_geotiff_input_places_the_map_outputs(registry, tmp_path):
    """A GeoTIFF's own georeference reaches heatmap.tif and regions_map.geojson (no override)."""
    import rasterio

    image, objects = generate_scene(384, 320, n_objects=2, seed=5)
    path = tmp_path / "scene_map.tif"
    write_geotiff(path, image, origin=(500000.0, 4200000.0), pixel_size=2.0, epsg=32633)
    params = _params(registry, mode="tiled", stride=16)
    summary = run_inference(path, params, registry, tmp_path / "out", max_pixels=MAX_PIXELS)
    assert summary["regions"]["map_file"]
    with rasterio.open(tmp_path / "out" / "heatmap.tif") as raster:
        assert raster.crs.to_epsg() == 32633
        with np.load(tmp_path / "out" / "heatmap.npz") as data:
            rows, cols, window = data["rows"], data["cols"], data["window"]
        # the first cell's raster pixel centre is its window centre, mapped through the source's transform
        x, y = raster.xy(0, 0)
        assert x == pytest.approx(500000.0 + 2.0 * (cols[0] + window[1] / 2))
        assert y == pytest.approx(4200000.0 - 2.0 * (rows[0] + window[0] / 2))
    regions = json.loads((tmp_path / "out" / "regions_map.geojson").read_text())
    assert "32633" in json.dumps(regions.get("crs"))
    from shapely.geometry import Point, shape

    for obj in objects:  # each object's centre, on the map, lies in a region of its class
        centre = Point(500000.0 + 2.0 * obj.center[0], 4200000.0 - 2.0 * obj.center[1])
        mine = [
            shape(f["geometry"]) for f in regions["features"] if f["properties"]["classification"]["name"] == obj.label
        ]
        assert any(region.contains(centre) for region in mine), obj
