"""The types every image reader shares: levels, georeference, header facts, the ``ImageSource``
base class and its error, and the sample and header checks all region readers apply.

Kept apart from the readers and the opener so that a reader imports only this module and
the opener imports the readers, never the reverse (no import circle).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.exceptions import InputError


class ImageError(InputError):
    """Bad image input. `code` is a stable machine code, `message` human readable."""


#: Most pyramid levels (and TIFF pages) a file may declare; real slides have < 12.
MAX_LEVELS = 64
MAX_TIFF_PAGES = 1024
#: Largest decoded tile or strip (bytes); a file whose chunks are larger cannot be read by region.
MAX_CHUNK_BYTES = 256 * 2**20
#: Default limit of a region-readable image (pixels at level 0).
DEFAULT_MAX_REGION_PIXELS = 40_000_000_000


@dataclass(frozen=True)
class PyramidLevel:
    width: int
    height: int
    downsample: float  # level-0 pixels per pixel of this level (x axis)


@dataclass(frozen=True)
class GeoReference:
    """Where a GeoTIFF lies on the map, enough to write a GeoTIFF output aligned with it.

    ``geotransform`` is GDAL's 6 terms for level 0 (pixel-corner convention):
    ``X = gt[0] + col * gt[1] + row * gt[2]``, ``Y = gt[3] + col * gt[4] + row * gt[5]``.
    The three ``geo_*`` fields are the file's GeoKey tags as stored (34735, 34736, 34737),
    so a writer can copy the CRS exactly; ``epsg`` is decoded from them where present.
    """

    geotransform: tuple[float, float, float, float, float, float]
    epsg: int | None = None
    wkt: str | None = None
    geokey_directory: tuple[int, ...] = ()
    geo_double_params: tuple[float, ...] = ()
    geo_ascii_params: str = ""


@dataclass(frozen=True)
class SourceInfo:
    """What a source is, from its header only."""

    reader: str  # "pillow" | "tifffile" | "openslide"
    format: str  # "JPEG", "PNG", "TIFF", "OME-TIFF", "GeoTIFF", or the OpenSlide vendor
    width: int
    height: int
    levels: tuple[PyramidLevel, ...]
    extension: str  # for storing an upload: ".tif", ".svs", ".jpg", ...
    mpp: tuple[float, float] | None = None  # microns per level-0 pixel (x, y)
    georeference: GeoReference | None = None
    is_slide: bool = False  # a microscopy slide: tissue mask "auto" by default

    @property
    def region_readable(self) -> bool:
        return self.reader != "pillow"


@dataclass
class ImageSource:
    """Base class: header facts plus ``read_region``; subclasses hold the open file."""

    info: SourceInfo
    regions_read: int = field(default=0, init=False)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``(height, width, 3)`` uint8 RGB of level `level`, origin ``(x, y)`` in that level's pixels."""
        lw, lh = self._level_size(level)
        if width <= 0 or height <= 0 or x < 0 or y < 0 or x + width > lw or y + height > lh:
            raise ValueError(f"region {x},{y} {width}x{height} outside level {level} ({lw}x{lh})")
        self.regions_read += 1
        try:
            out = self._read(level, x, y, width, height)
        except (ImageError, MemoryError):
            raise
        except Exception as exc:
            raise ImageError(
                "corrupt_image", f"cannot decode the image data of level {level} near ({x}, {y}): {_short(exc)}"
            ) from None
        if out.shape != (height, width, 3) or out.dtype != np.uint8:  # pragma: no cover - defensive
            raise ImageError("corrupt_image", f"decoder produced an unexpected region {out.shape}")
        return out

    def _level_size(self, level: int) -> tuple[int, int]:
        if not 0 <= level < len(self.info.levels):
            raise ValueError(f"level {level} does not exist; the file has {len(self.info.levels)}")
        lv = self.info.levels[level]
        return lv.width, lv.height

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file; the source cannot be read afterwards."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:200] + "..."


def to_rgb8(pixels: np.ndarray, *, alpha: bool = False, min_is_white: bool = False) -> np.ndarray:
    """Any (h, w) or (h, w, s) sample array -> (h, w, 3) uint8 RGB with the Pillow reader's rules (pillow_decoder):
    16-bit by its full range, floats clipped to [0, 255], alpha composited over white."""
    arr = pixels if pixels.ndim == 3 else pixels[:, :, None]
    arr = _to_uint8(arr)
    if min_is_white:
        arr = 255 - arr
    samples = arr.shape[2]
    if alpha and samples in (2, 4):
        colour = arr[:, :, : samples - 1].astype(np.uint16)
        a = arr[:, :, samples - 1 : samples].astype(np.uint16)
        arr = ((colour * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        samples -= 1
    if samples < 3:
        return np.ascontiguousarray(np.repeat(arr[:, :, :1], 3, axis=2))
    return np.ascontiguousarray(arr[:, :, :3])


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        clean = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        return np.rint(np.clip(clean, 0, 255)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        return (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    raise ImageError("unsupported_format", f"{arr.dtype} samples are not supported")


def check_region_size(width: int, height: int, max_region_pixels: int, min_size) -> None:
    """The pixel limit and minimum size of a region-readable image (from its header)."""
    if width <= 0 or height <= 0:
        raise ImageError("corrupt_image", f"invalid image dimensions {width}x{height}")
    if width * height > max_region_pixels:
        raise ImageError(
            "too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_region_pixels}",
        )
    if min_size is not None and (height < min_size[0] or width < min_size[1]):
        raise ImageError(
            "image_too_small",
            f"image is {width}x{height} (WxH); at least {min_size[1]}x{min_size[0]} is required",
        )


def check_levels(levels: list[PyramidLevel]) -> tuple[PyramidLevel, ...]:
    """Levels must be few and shrink monotonically (a lying pyramid is refused)."""
    if len(levels) > MAX_LEVELS:
        raise ImageError("corrupt_image", f"the file declares {len(levels)} pyramid levels; at most {MAX_LEVELS}")
    for finer, coarser in zip(levels, levels[1:], strict=False):
        if coarser.width > finer.width or coarser.height > finer.height or coarser.width <= 0 or coarser.height <= 0:
            raise ImageError("corrupt_image", "pyramid levels do not shrink from one level to the next")
    return tuple(levels)


def mpp_from_resolution(x_res: Any, y_res: Any, unit: int | None) -> tuple[float, float] | None:
    """Microns per pixel from TIFF XResolution/YResolution and ResolutionUnit (2 inch, 3 cm)."""
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit or 0))
    values = []
    for res in (x_res, y_res):
        if isinstance(res, tuple) and len(res) == 2 and res[1]:
            res = res[0] / res[1]
        if per_unit is None or not isinstance(res, (int, float)) or not math.isfinite(res) or res <= 0:
            return None
        values.append(per_unit / float(res))
    return values[0], values[1]


def mpp_from_ome(xml: str | None) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME Pixels element, in microns."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            try:
                sx = float(element.get("PhysicalSizeX")) * factor[element.get("PhysicalSizeXUnit", "µm")]
                sy = float(element.get("PhysicalSizeY")) * factor[element.get("PhysicalSizeYUnit", "µm")]
            except (TypeError, ValueError, KeyError):
                return None
            return (sx, sy) if sx > 0 and sy > 0 else None
    return None
