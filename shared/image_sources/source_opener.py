"""Open any accepted image as an ``ImageSource``: the one place that picks a reader by the
file's content (OpenSlide, then tifffile, then Pillow), never by its name."""

from __future__ import annotations

import os
from typing import IO, Any

from shared.image_sources.pillow_decoder import probe_image
from shared.image_sources.pillow_source import PillowOwned, pillow_info
from shared.image_sources.slide_source import open_slide_source
from shared.image_sources.source_types import DEFAULT_MAX_REGION_PIXELS, ImageSource
from shared.image_sources.tiff_source import open_tiff_source, sniff_tiff_head


def open_image_source(
    source: str | os.PathLike | IO[bytes],
    *,
    max_pixels: int,
    max_region_pixels: int = DEFAULT_MAX_REGION_PIXELS,
    min_size: tuple[int, int] | None = None,
    endpoint_url: str | None = None,
) -> ImageSource:
    """Open `source` (a path, an fsspec URL, or a seekable binary stream) with the reader its
    content calls for. Only the header is read here; pixels come from ``read_region``.

    `endpoint_url`: the S3 endpoint of an ``s3://`` URL (default: the service's S3_ENDPOINT_URL).

    Raises ImageError (codes as :func:`~shared.image_sources.pillow_decoder.probe_image`, plus ``tile_too_large``).
    """
    path = _local_path(source)
    if path is not None:
        slide = open_slide_source(path, max_region_pixels=max_region_pixels, min_size=min_size)
        if slide is not None:
            return slide
    stream, owned = _open_stream(source, endpoint_url)
    try:
        if sniff_tiff_head(stream):
            tiff = open_tiff_source(
                stream, owned, max_pixels=max_pixels, max_region_pixels=max_region_pixels, min_size=min_size
            )
            if tiff is not None:
                return tiff
        info = probe_image(stream, max_pixels=max_pixels, min_size=min_size)
    except BaseException:
        if owned:
            stream.close()
        raise
    return PillowOwned(pillow_info(info), stream, owned, max_pixels, min_size)


def probe_source(
    source, *, max_pixels: int, max_region_pixels: int = DEFAULT_MAX_REGION_PIXELS, min_size=None, endpoint_url=None
):
    """Header facts of `source` without decoding pixel data (the API's acceptance check)."""
    with open_image_source(
        source, max_pixels=max_pixels, max_region_pixels=max_region_pixels, min_size=min_size, endpoint_url=endpoint_url
    ) as opened:
        return opened.info


def _local_path(source: Any) -> str | None:
    """A filesystem path for `source` when it has one (OpenSlide needs a path)."""
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if isinstance(source, str):
        if source.startswith("file://"):
            return source[len("file://") :]
        return None if "://" in source else source
    return None


def _open_stream(source: Any, endpoint_url: str | None) -> tuple[IO[bytes], bool]:
    """(binary stream, whether we opened it): paths and fsspec URLs are opened here."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if "://" in text and not text.startswith("file://"):
            import fsspec

            from shared.storage import fsspec_options

            return fsspec.open(text, "rb", **fsspec_options(text, endpoint_url)).open(), True
        return open(_local_path(text) or text, "rb"), True
    if not hasattr(source, "read"):
        raise TypeError(f"source must be a path, URL or binary file object, not {type(source).__name__}")
    return source, False
