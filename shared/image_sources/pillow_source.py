"""Ordinary images (JPEG, PNG, WebP, BMP, small TIFF) as an ``ImageSource``: decoded whole on
first use by ``pillow_decoder`` (they are within ``MAX_IMAGE_PIXELS``), then sliced."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.image_sources.pillow_decoder import ImageInfo, load_rgb
from shared.image_sources.source_types import ImageSource, PyramidLevel, SourceInfo


class PillowSource(ImageSource):
    def __init__(self, info: SourceInfo, source: Any, max_pixels: int, min_size) -> None:
        super().__init__(info)
        self._source = source
        self._limits = (max_pixels, min_size)
        self._pixels: np.ndarray | None = None

    def pixels(self) -> np.ndarray:
        """The whole decoded image (decoded once)."""
        if self._pixels is None:
            self._pixels = load_rgb(self._source, max_pixels=self._limits[0], min_size=self._limits[1])
        return self._pixels

    def _read(self, level, x, y, width, height):
        return self.pixels()[y : y + height, x : x + width]

    def close(self) -> None:
        self._pixels = None


def pillow_info(info: ImageInfo) -> SourceInfo:
    level = PyramidLevel(info.width, info.height, 1.0)
    return SourceInfo("pillow", info.format, info.width, info.height, (level,), info.extension)


class PillowOwned(PillowSource):
    """A Pillow source that closes the stream it opened itself (paths and URLs)."""

    def __init__(self, info, stream, owned: bool, max_pixels, min_size) -> None:
        super().__init__(info, stream, max_pixels, min_size)
        self._owned = owned

    def close(self) -> None:
        super().close()
        if self._owned:
            self._source.close()
