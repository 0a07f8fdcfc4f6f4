"""TIFF-family images read by region through tifffile's zarr store (tiles decoded on demand).

Covers tiled and striped TIFF, BigTIFF, pyramids (SubIFDs or one page per level), OME-TIFF
and GeoTIFF. Small single-page striped TIFFs are left to Pillow (:func:`open_tiff_source`
returns None) so that ordinary TIFFs keep :mod:`shared.image_sources.pillow_decoder`'s exact behaviour.
Everything checked here comes from the header: page and level counts, level sizes, chunk
(tile/strip) sizes, that every chunk of the read levels lies inside the file, and that the
file stores data for enough of its chunks (a sparse or shared tile table is a cheap bomb).
"""

from __future__ import annotations

from typing import IO, Any

import numpy as np

from shared.image_sources.source_types import (
    MAX_CHUNK_BYTES,
    MAX_LEVELS,
    MAX_TIFF_PAGES,
    GeoReference,
    ImageError,
    ImageSource,
    PyramidLevel,
    SourceInfo,
    check_levels,
    check_region_size,
    mpp_from_ome,
    mpp_from_resolution,
    to_rgb8,
)

_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ALLOWED_AXES = ("YX", "YXS", "SYX", "CYX")
_CMYK, _PALETTE, _MINISWHITE = 5, 3, 0
#: A level's tiles (or strips) with data of their own must be at least 1 in this many.
MIN_STORED_FRACTION = 8
#: TIFF compressions of pictures (none, LZW, JPEG, deflate, PackBits, JPEG 2000, LZMA, zstd,
#: WebP, JPEG XL); others (e.g. 65000, an electron-counting codec) are refused from the header.
IMAGE_CODECS = frozenset({1, 5, 6, 7, 8, 32773, 32946, 33003, 33004, 33005, 34712, 34892, 34925, 50000, 50001, 50002})
#: Most samples per pixel (RGBA plus one extra); more is no picture this service reads.
MAX_SAMPLES = 5


def sniff_tiff_head(stream: IO[bytes]) -> bool:
    """Whether the stream starts with a TIFF or BigTIFF signature (position restored)."""
    pos = stream.tell()
    try:
        stream.seek(0)
        return stream.read(4) in _MAGIC
    finally:
        stream.seek(pos)


class _NamedStream:
    """A stream with a string name: tifffile needs one (anonymous temp files have an int)."""

    name = "upload.tif"

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw

    def __getattr__(self, attr: str):
        return getattr(self._raw, attr)


class TiffSource(ImageSource):
    """One series of a TIFF file; levels are zarr arrays opened on first use."""

    def __init__(self, info: SourceInfo, tif: Any, series: Any, owned_stream: IO[bytes] | None, layout) -> None:
        super().__init__(info)
        self._tif = tif
        self._series = series
        self._owned = owned_stream
        self._arrays: dict[int, Any] = {}
        self._layout = layout  # (axes, alpha, min_is_white, colormap or None)

    def _array(self, level: int):
        if level not in self._arrays:
            import zarr

            self._arrays[level] = zarr.open(self._series.aszarr(level=level), mode="r")
        return self._arrays[level]

    def _read(self, level, x, y, width, height):
        axes, alpha, min_is_white, colormap = self._layout
        array = self._array(level)
        if axes in ("SYX", "CYX"):
            pixels = np.moveaxis(np.asarray(array[:, y : y + height, x : x + width]), 0, -1)
        else:
            pixels = np.asarray(array[y : y + height, x : x + width])
        if colormap is not None:
            return np.ascontiguousarray(colormap[pixels.reshape(pixels.shape[:2])])
        return to_rgb8(pixels, alpha=alpha, min_is_white=min_is_white)

    def close(self) -> None:
        self._arrays.clear()
        self._tif.close()
        if self._owned is not None:
            self._owned.close()


def open_tiff_source(
    stream: IO[bytes], owned: bool, *, max_pixels: int, max_region_pixels: int, min_size
) -> TiffSource | None:
    """A TiffSource for region-readable TIFFs; None for small single-page TIFFs (Pillow's).

    A file tifffile cannot parse at all is also left to Pillow, whose errors say why.
    """
    import tifffile

    stream.seek(0)
    try:
        named = stream if isinstance(getattr(stream, "name", None), str) else _NamedStream(stream)
        tif = tifffile.TiffFile(named, _multifile=False)
    except Exception:
        return None
    try:
        source = _tiff_source(tif, stream if owned else None, max_pixels, max_region_pixels, min_size)
    except BaseException:
        tif.close()
        raise
    if source is None:
        tif.close()
        stream.seek(0)
    return source


def _tiff_source(tif, owned_stream, max_pixels: int, max_region_pixels: int, min_size) -> TiffSource | None:
    page0 = _header_checks(tif)
    if not _wants_region_reader(tif, page0, max_pixels):
        return None
    try:
        series = tif.series[0]
        levels_raw = list(series.levels)
    except Exception as exc:
        raise ImageError("corrupt_image", f"cannot read the TIFF structure: {type(exc).__name__}") from None
    axes = series.axes
    if axes not in _ALLOWED_AXES or (axes in ("SYX", "CYX") and series.shape[0] not in (1, 2, 3, 4)):
        raise ImageError("multi_frame", f"TIFF series has axes {axes} {series.shape}; expected one 2-D image")
    y_axis = axes.index("Y")
    width, height = int(series.shape[y_axis + 1]), int(series.shape[y_axis])
    _check_other_series(tif, width, height)
    check_region_size(width, height, max_region_pixels, min_size)
    levels = check_levels(
        [
            PyramidLevel(int(lv.shape[y_axis + 1]), int(lv.shape[y_axis]), width / lv.shape[y_axis + 1])
            for lv in levels_raw
        ]
    )
    file_size = _file_size(tif)
    for lv in levels_raw:
        _check_chunks(lv, file_size)
    layout = _layout(series.pages[0] if series.pages else page0, axes)
    info = SourceInfo(
        reader="tifffile",
        format="OME-TIFF" if tif.is_ome else ("GeoTIFF" if page0.is_geotiff else "TIFF"),
        width=width,
        height=height,
        levels=levels,
        extension=".ome.tif" if tif.is_ome else ".tif",
        mpp=_mpp(tif, page0),
        georeference=_georeference(page0) if page0.is_geotiff else None,
        is_slide=len(levels) > 1 and not page0.is_geotiff,
    )
    return TiffSource(info, tif, series, owned_stream, layout)


def _header_checks(tif) -> Any:
    """Page count and SubIFD count caps, before tifffile walks anything large."""
    pages = tif.pages
    count, seen = 0, set()
    for page in pages:  # lazy: stops at the cap instead of reading every IFD
        count += 1
        offset = getattr(page, "offset", None)
        if offset in seen:  # an IFD pointing back at an earlier one: the chain never ends
            raise ImageError("corrupt_image", "the TIFF's image directories form a loop")
        seen.add(offset)
        if count > MAX_TIFF_PAGES:
            raise ImageError("corrupt_image", f"the TIFF has more than {MAX_TIFF_PAGES} pages")
    if count == 0:
        raise ImageError("corrupt_image", "the TIFF has no image")
    page0 = pages.first
    _check_codec(page0)
    subifds = page0.tags.get("SubIFDs")
    if subifds is not None and subifds.count > MAX_LEVELS:
        raise ImageError("corrupt_image", f"the TIFF declares {subifds.count} sub-images; at most {MAX_LEVELS}")
    if page0.photometric == _CMYK and (page0.is_tiled or tif.is_bigtiff):
        raise ImageError("unsupported_format", "tiled CMYK TIFF is not supported; convert it to RGB")
    return page0


def _check_codec(page) -> None:
    """A compression this reader can decode and a sample count an image has, from the header
    (issue 20: compression 65000 or 100 samples per pixel used to fail only in the job)."""
    import tifffile

    code = int(page.compression)
    if code not in IMAGE_CODECS or (code != 1 and code not in tifffile.TIFF.DECOMPRESSORS):
        raise ImageError("unsupported_format", f"TIFF compression {code} is not supported")
    if not 1 <= int(page.samplesperpixel) <= MAX_SAMPLES:
        raise ImageError(
            "unsupported_format", f"the TIFF has {page.samplesperpixel} samples per pixel; at most {MAX_SAMPLES}"
        )


def _wants_region_reader(tif, page0, max_pixels: int) -> bool:
    """Region reading for anything beyond a small, single-page, striped classic TIFF."""
    if tif.is_bigtiff or page0.is_tiled or tif.is_ome or page0.is_geotiff or page0.subifds:
        return True
    if page0.imagewidth * page0.imagelength > max_pixels:
        return True
    try:
        return len(tif.series[0].levels) > 1
    except Exception:
        return False


def _check_other_series(tif, width: int, height: int) -> None:
    """Other series may be small extras (label, macro, thumbnail), not further full images."""
    for other in tif.series[1 : MAX_TIFF_PAGES + 1]:
        shape = other.shape
        if len(shape) >= 2 and min(shape[-3:-1] if len(shape) >= 3 else shape) * 2 >= min(width, height):
            raise ImageError(
                "multi_frame",
                f"the TIFF holds {len(tif.series)} images of similar size; only one image (and its pyramid) is read",
            )


def _file_size(tif) -> int | None:
    try:
        handle = tif.filehandle
        return int(handle.size)
    except Exception:
        return None


def _check_chunks(level, file_size: int | None) -> None:
    """Every tile/strip of the level inside the file, holding data of its own; no chunk
    absurdly large when decoded."""
    for page in level.pages:
        if page is None:
            continue
        rows = page.tilelength if page.is_tiled else min(page.rowsperstrip or page.imagelength, page.imagelength)
        cols = page.tilewidth if page.is_tiled else page.imagewidth
        chunk = int(rows) * int(cols) * int(page.samplesperpixel) * int(np.dtype(page.dtype or np.uint8).itemsize)
        if chunk > MAX_CHUNK_BYTES:
            raise ImageError(
                "tile_too_large",
                f"one TIFF {'tile' if page.is_tiled else 'strip'} is {cols}x{rows} pixels "
                f"({chunk >> 20} MB decoded); at most {MAX_CHUNK_BYTES >> 20} MB: re-save the file tiled",
            )
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        present = counts > 0
        if file_size is not None and present.any() and int((offsets[present] + counts[present]).max()) > file_size:
            raise ImageError("corrupt_image", "the TIFF is truncated: image data lies past the end of the file")
        _check_stored_data(offsets, counts, "tiles" if page.is_tiled else "strips")


def _check_stored_data(offsets: np.ndarray, counts: np.ndarray, kind: str) -> None:
    """Refuse a chunk table that declares far more image than the file stores (issue 20): a
    few KB declaring 190000x190000 with every byte count 0, or every tile pointing at one
    deflate blob. Either would be accepted, then hold a worker for its time limit analysing
    nothing. A chunk counts when it has bytes of its own (a non-zero count at an offset no
    other chunk uses); fewer than 1 in MIN_STORED_FRACTION of them is refused."""
    total = len(counts)
    present = counts > 0
    distinct = len(np.unique(offsets[present])) if present.any() else 0
    if total and distinct * MIN_STORED_FRACTION < total:
        raise ImageError(
            "sparse_image",
            f"the TIFF stores data for {distinct} of its {total} {kind} (the rest are empty or share one "
            f"another's data); at least 1 in {MIN_STORED_FRACTION} must hold its own: write the image out in full",
        )


def _layout(page, axes: str):
    """(axes, alpha, min_is_white, palette lookup table or None) for converting samples."""
    extras = tuple(getattr(page, "extrasamples", ()) or ())
    alpha = bool(extras) and int(extras[0]) in (1, 2)
    colormap = None
    if page.photometric == _PALETTE and page.colormap is not None:
        colormap = to_rgb8(np.asarray(page.colormap).T[:, None, :])[:, 0, :]
    return axes, alpha, page.photometric == _MINISWHITE, colormap


def _mpp(tif, page0) -> tuple[float, float] | None:
    if tif.is_ome:
        ome = mpp_from_ome(tif.ome_metadata)
        if ome is not None:
            return ome
    tags = page0.tags
    x_res, y_res, unit = (tags.get(name) for name in ("XResolution", "YResolution", "ResolutionUnit"))
    if x_res is None or y_res is None:
        return None
    return mpp_from_resolution(x_res.value, y_res.value, int(unit.value) if unit is not None else 2)


def _georeference(page0) -> GeoReference | None:
    """Level-0 geotransform and CRS keys from the GeoTIFF tags."""
    tags = page0.tags
    transform = _geotransform(tags)
    if transform is None:
        return None
    directory = tuple(int(v) for v in (tags["GeoKeyDirectoryTag"].value if "GeoKeyDirectoryTag" in tags else ()))
    keys = {directory[i]: directory[i + 3] for i in range(4, len(directory) - 3, 4) if directory[i + 1] == 0}
    if keys.get(1025) == 2:  # RasterPixelIsPoint: GDAL's corner convention is half a pixel off
        gt = transform
        transform = (gt[0] - 0.5 * (gt[1] + gt[2]), gt[1], gt[2], gt[3] - 0.5 * (gt[4] + gt[5]), gt[4], gt[5])
    epsg = keys.get(3072) or keys.get(2048)
    doubles = tuple(float(v) for v in (tags["GeoDoubleParamsTag"].value if "GeoDoubleParamsTag" in tags else ()))
    ascii_params = str(tags["GeoAsciiParamsTag"].value) if "GeoAsciiParamsTag" in tags else ""
    return GeoReference(
        geotransform=transform,
        epsg=int(epsg) if epsg and epsg != 32767 else None,
        geokey_directory=directory,
        geo_double_params=doubles,
        geo_ascii_params=ascii_params,
    )


def _geotransform(tags) -> tuple[float, float, float, float, float, float] | None:
    if "ModelTransformationTag" in tags:
        m = [float(v) for v in tags["ModelTransformationTag"].value]
        return (m[3], m[0], m[1], m[7], m[4], m[5])
    if "ModelPixelScaleTag" in tags and "ModelTiepointTag" in tags:
        sx, sy = (float(v) for v in tags["ModelPixelScaleTag"].value[:2])
        i, j, _, x, y, _ = (float(v) for v in tags["ModelTiepointTag"].value[:6])
        return (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)
    return None
