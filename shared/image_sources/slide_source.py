"""Whole-slide files read through OpenSlide (``openslide-python`` + the ``openslide-bin`` wheel).

OpenSlide decides by content whether it knows a file (``OpenSlide.detect_format``); its
"generic-tiff" catch-all is left to :mod:`shared.image_sources.tiff_source`, which also understands SubIFD
pyramids, OME and GeoTIFF metadata. OpenSlide needs a local path, so this reader serves
uploads and ``file://`` URLs.
"""

from __future__ import annotations

import numpy as np

from shared.image_sources.source_types import (
    ImageError,
    ImageSource,
    PyramidLevel,
    SourceInfo,
    check_levels,
    check_region_size,
    to_rgb8,
)

_EXTENSIONS = {"aperio": ".svs", "hamamatsu": ".ndpi", "leica": ".scn", "ventana": ".bif", "philips": ".tiff"}


class SlideSource(ImageSource):
    def __init__(self, info: SourceInfo, slide) -> None:
        super().__init__(info)
        self._slide = slide

    def _read(self, level, x, y, width, height):
        downsample = self._slide.level_downsamples[level]
        origin = (round(x * downsample), round(y * downsample))  # OpenSlide takes level-0 origins
        rgba = np.asarray(self._slide.read_region(origin, level, (width, height)))
        return to_rgb8(rgba, alpha=True)

    def close(self) -> None:
        self._slide.close()


def open_slide_source(
    path: str, *, max_region_pixels: int, min_size, accept_generic: bool = False
) -> SlideSource | None:
    """A SlideSource when OpenSlide recognises `path` as a vendor slide (or, with
    `accept_generic`, as any tiled TIFF it reads); otherwise None."""
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except Exception:
        return None
    if vendor is None or (vendor == "generic-tiff" and not accept_generic):
        return None
    try:
        slide = openslide.OpenSlide(path)
    except Exception as exc:
        raise ImageError("corrupt_image", f"cannot open the {vendor} slide: {type(exc).__name__}") from None
    try:
        return SlideSource(_slide_info(slide, vendor, max_region_pixels, min_size), slide)
    except BaseException:
        slide.close()
        raise


def _slide_info(slide, vendor: str, max_region_pixels: int, min_size) -> SourceInfo:
    width, height = (int(v) for v in slide.dimensions)
    check_region_size(width, height, max_region_pixels, min_size)
    levels = check_levels(
        [
            PyramidLevel(int(w), int(h), float(d))
            for (w, h), d in zip(slide.level_dimensions, slide.level_downsamples, strict=True)
        ]
    )
    props = slide.properties
    try:
        mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
    except (KeyError, ValueError):
        mpp = None
    return SourceInfo(
        reader="openslide",
        format=vendor,
        width=width,
        height=height,
        levels=levels,
        extension=_EXTENSIONS.get(vendor, ".tif"),
        mpp=mpp if mpp and min(mpp) > 0 else None,
        is_slide=True,
    )
