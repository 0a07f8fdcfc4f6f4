"""Tiny TIFFs that declare huge images (issue 20, item 3): a tile table whose byte counts are
all 0, or whose tiles all point at one deflate blob, is refused from the header (no tile is
decoded), by the reader the API and the worker share; a sparse file that stores enough of its
tiles is still read (its empty tiles as zeros). The files are real TIFFs written byte by byte."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import Stack, make_database
from slide_inputs import tiled_tiff

from shared.image_sources.source_opener import open_image_source, probe_source
from shared.image_sources.source_types import ImageError

LIMITS = {"max_pixels": 200_000_000, "max_region_pixels": 40_000_000_000}


def _tile(tile: int, value: int) -> bytes:
    return zlib.compress(np.full((tile, tile, 3), value, np.uint8).tobytes(), 9)


def test_all_zero_byte_counts_are_refused_from_the_header():
    data = tiled_tiff(190_000, 190_000, 4096, lambda i, n: b"")
    assert len(data) < 40_000  # about 18 KB declaring 36 gigapixels
    with pytest.raises(ImageError) as refused:
        probe_source(io.BytesIO(data), **LIMITS)
    assert refused.value.code == "sparse_image"


def test_tiles_sharing_one_deflate_blob_are_refused():
    blob = _tile(4096, 0)
    data = tiled_tiff(40_960, 40_960, 4096, lambda i, n: blob)
    assert len(data) < 100_000
    with pytest.raises(ImageError) as refused:
        probe_source(io.BytesIO(data), **LIMITS)
    assert refused.value.code == "sparse_image"
    assert "1 of its 100 tiles" in refused.value.message


def test_a_sparse_file_that_stores_enough_tiles_is_read_with_zeros_where_empty():
    tile = 64
    blobs = {i: _tile(tile, 10 + i) for i in range(16)}
    data = tiled_tiff(tile * 8, tile * 8, tile, lambda i, n: blobs[i // 4] if i % 4 == 0 else b"")
    with open_image_source(io.BytesIO(data), **LIMITS) as source:
        assert (source.info.width, source.info.height) == (512, 512)
        pixels = source.read_region(0, 0, 0, 512, 512)
    assert pixels[0, 0].tolist() == [10, 10, 10]  # tile 0 holds data
    assert pixels[0, tile].tolist() == [0, 0, 0]  # tile 1 is empty: zeros, nothing decoded


def test_the_api_refuses_a_sparse_bomb_at_submission(tmp_path, redis_server):
    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server)
    data = tiled_tiff(190_000, 190_000, 4096, lambda i, n: b"")
    response = stack.submit(stack.client(), data, filename="bomb.tif")
    assert (response.status_code, response.json["error"]["code"]) == (422, "sparse_image"), response.json
    assert not any(p.is_file() for p in (tmp_path / "storage").rglob("*"))  # nothing stored
    stack.close()


def _patched(data: bytes, tag: int, value: int) -> bytes:
    """The file with the SHORT value of `tag` replaced."""
    out = bytearray(data)
    at = data.index(struct.pack("<HHI", tag, 3, 1)) + 8
    out[at : at + 2] = struct.pack("<H", value)
    return bytes(out)


def _small() -> bytes:
    blobs = {i: _tile(64, 40 * i) for i in range(4)}
    return tiled_tiff(128, 128, 64, lambda i, n: blobs[i])


@pytest.mark.parametrize(
    ("name", "mutate", "code", "words"),
    [
        # issue 20, item 7: reported as "more than 1024 pages"
        (
            "IFD loop",
            lambda d: d[: 8 + 2 + 12 * 12] + struct.pack("<I", 8) + d[8 + 2 + 12 * 12 + 4 :],
            "corrupt_image",
            "loop",
        ),
        # accepted, then failed (or silently succeeded) in the job
        ("compression 65000", lambda d: _patched(d, 259, 65000), "unsupported_format", "compression 65000"),
        ("100 samples per pixel", lambda d: _patched(d, 277, 100), "unsupported_format", "100 samples"),
    ],
)
def test_degenerate_headers_are_refused_with_what_is_wrong(name, mutate, code, words):
    assert probe_source(io.BytesIO(_small()), **LIMITS).width == 128  # the file itself is fine
    with pytest.raises(ImageError) as refused:
        probe_source(io.BytesIO(mutate(_small())), **LIMITS)
    assert refused.value.code == code and words in refused.value.message, (name, refused.value)


def test_a_corrupt_mask_is_refused_like_the_same_file_as_the_image(tmp_path, redis_server):
    """Issue 20, item 7: a TIFF whose directories loop was refused as the image but accepted
    as `mask_image` (Pillow's header probe only), to fail in the job."""
    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server)
    small = _small()
    looped = small[: 8 + 2 + 12 * 12] + struct.pack("<I", 8) + small[8 + 2 + 12 * 12 + 4 :]  # an IFD loop
    client = stack.client()
    as_image = stack.submit(client, looped, filename="t.tif")
    assert as_image.status_code == 400 and as_image.json["error"]["code"] == "corrupt_image", as_image.json
    from conftest import png_bytes

    as_mask = client.post(
        "/api/v1/jobs",
        data={
            "image": (io.BytesIO(png_bytes(np.zeros((128, 128, 3), np.uint8))), "i.png"),
            "mask_image": (io.BytesIO(looped), "m.tif"),
        },
        content_type="multipart/form-data",
    )
    assert (as_mask.status_code, as_mask.json["error"]["code"]) == (400, "corrupt_image"), as_mask.json
    stack.close()
