"""Tests for shared.image_sources.pillow_decoder (all images are generated at test time)."""

from __future__ import annotations

import dataclasses
import io
import resource
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from shared.image_sources.pillow_decoder import (
    ALLOWED_FORMATS,
    ImageError,
    ImageInfo,
    load_rgb,
    probe_image,
)

MAXPX = 10_000_000


# --------------------------------------------------------------------------
# helpers


def _save(tmp_path: Path, im: Image.Image, name: str, fmt: str, **kw) -> Path:
    path = tmp_path / name
    im.save(path, fmt, **kw)
    return path


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h: int, w: int) -> np.ndarray:
    """A smooth RGB gradient (compresses well and survives lossy codecs)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), np.full_like(x, 128)], axis=-1).astype(
        np.uint8
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, idat_raw: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(idat_raw))
        + _png_chunk(b"IEND", b"")
    )


def _tiff_rgb16(width: int, height: int, pixels: np.ndarray) -> bytes:
    """Minimal little-endian uncompressed 16-bit-per-sample RGB TIFF (Pillow can't write one)."""
    data = np.ascontiguousarray(pixels.astype("<u2")).tobytes()
    n_entries = 10
    ifd_offset = 8
    ifd_size = 2 + n_entries * 12 + 4
    bps_offset = ifd_offset + ifd_size
    data_offset = bps_offset + 6
    entries = [  # (tag, type, count, value or offset)
        (256, 4, 1, width),  # ImageWidth (LONG)
        (257, 4, 1, height),  # ImageLength
        (258, 3, 3, bps_offset),  # BitsPerSample -> offset of 3 SHORTs
        (259, 3, 1, 1),  # Compression none
        (262, 3, 1, 2),  # Photometric RGB
        (273, 4, 1, data_offset),  # StripOffsets
        (277, 3, 1, 3),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, len(data)),  # StripByteCounts
        (284, 3, 1, 1),  # PlanarConfig contig
    ]
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset))
    out += struct.pack("<H", n_entries)
    for tag, typ, count, value in entries:
        if typ == 3 and count == 1:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0)
    out += struct.pack("<HHH", 16, 16, 16)
    out += data
    return bytes(out)


def _code(excinfo) -> str:
    return excinfo.value.code


# --------------------------------------------------------------------------
# API surface


def test_api_surface():
    assert ALLOWED_FORMATS == frozenset({"JPEG", "PNG", "TIFF", "BMP", "WEBP"})
    err = ImageError("corrupt_image", "bad")
    assert isinstance(err, ValueError)
    assert err.code == "corrupt_image" and err.message == "bad"
    info = ImageInfo(format="PNG", width=1, height=2, mode="RGB", extension=".png")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.width = 3  # frozen


# --------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize(
    "fmt,ext,tol",
    [("PNG", ".png", 0), ("BMP", ".bmp", 0), ("TIFF", ".tif", 0), ("JPEG", ".jpg", 12), ("WEBP", ".webp", 12)],
)
def test_rgb_round_trip(tmp_path, fmt, ext, tol):
    arr = _smooth(30, 41) if tol else _noise(30, 41)
    kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    path = _save(tmp_path, Image.fromarray(arr), "img" + ext, fmt, **kw)
    info = probe_image(path, max_pixels=MAXPX)
    assert info == ImageInfo(format=fmt, width=41, height=30, mode="RGB", extension=ext)
    out = load_rgb(path, max_pixels=MAXPX)
    assert out.shape == (30, 41, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    if tol == 0:
        np.testing.assert_array_equal(out, arr)
    else:
        assert np.abs(out.astype(int) - arr.astype(int)).mean() < tol


def test_lossless_webp_exact(tmp_path):
    arr = _noise(17, 23)
    path = _save(tmp_path, Image.fromarray(arr), "a.webp", "WEBP", lossless=True)
    np.testing.assert_array_equal(load_rgb(path, max_pixels=MAXPX), arr)


def test_file_object_and_path_agree(tmp_path):
    arr = _noise(12, 9)
    path = _save(tmp_path, Image.fromarray(arr), "a.png", "PNG")
    data = path.read_bytes()
    bio = io.BytesIO(data)
    bio.seek(5)  # position is irrelevant for reading and is restored
    assert probe_image(bio, max_pixels=MAXPX) == probe_image(path, max_pixels=MAXPX)
    assert bio.tell() == 5
    np.testing.assert_array_equal(load_rgb(bio, max_pixels=MAXPX), arr)
    assert bio.tell() == 5 and not bio.closed
    np.testing.assert_array_equal(load_rgb(str(path), max_pixels=MAXPX), arr)
    with open(path, "rb") as fh:
        np.testing.assert_array_equal(load_rgb(fh, max_pixels=MAXPX), arr)
        assert not fh.closed


# --------------------------------------------------------------------------
# bit depths and modes


def test_16bit_grayscale_png_and_tiff(tmp_path):
    im = Image.new("I;16", (4, 2))
    values = [65535, 32768, 256, 255, 0, 1000, 40000, 12345]
    for i, v in enumerate(values):
        im.putpixel((i % 4, i // 4), v)
    for fmt, ext in (("PNG", ".png"), ("TIFF", ".tif")):
        path = _save(tmp_path, im, "g16" + ext, fmt)
        info = probe_image(path, max_pixels=MAXPX)
        assert info.mode.startswith("I;16")
        out = load_rgb(path, max_pixels=MAXPX)
        expected = (np.array(values).reshape(2, 4) >> 8).astype(np.uint8)
        assert out.shape == (2, 4, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], expected)
        assert out[0, 0, 0] == 255 and out[0, 1, 0] == 128


def test_16bit_big_endian_tiff(tmp_path):
    arr = np.array([[65535, 32768, 0]], dtype=np.uint16)
    im = Image.frombytes("I;16B", (3, 1), arr.astype(">u2").tobytes())
    path = _save(tmp_path, im, "g16b.tif", "TIFF")
    out = load_rgb(path, max_pixels=MAXPX)
    assert out[0, :, 0].tolist() == [255, 128, 0]


def test_16bit_rgb_png_hand_built(tmp_path):
    px = np.array([[[65535, 32768, 0x01FF], [0, 256, 65280]]], dtype=">u2")  # 2x1
    raw = b"\x00" + px.tobytes()
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_bytes(2, 1, 16, 2, raw))
    info = probe_image(path, max_pixels=MAXPX)
    assert (info.format, info.width, info.height) == ("PNG", 2, 1)
    out = load_rgb(path, max_pixels=MAXPX)
    assert out.tolist() == [[[255, 128, 1], [0, 1, 255]]]


def test_16bit_rgb_tiff_hand_built(tmp_path):
    px = np.array([[[65535, 32768, 0x01FF], [0, 256, 65280]]], dtype=np.uint16)
    path = tmp_path / "rgb16.tif"
    path.write_bytes(_tiff_rgb16(2, 1, px))
    info = probe_image(path, max_pixels=MAXPX)
    assert (info.format, info.width, info.height) == ("TIFF", 2, 1)
    out = load_rgb(path, max_pixels=MAXPX)
    assert out.tolist() == [[[255, 128, 1], [0, 1, 255]]]


def test_float_tiff_is_clipped(tmp_path):
    arr = np.array([[-10.0, 0.0, 100.4, 254.6, 300.0]], dtype=np.float32)
    path = _save(tmp_path, Image.fromarray(arr, mode="F"), "f.tif", "TIFF")
    assert probe_image(path, max_pixels=MAXPX).mode == "F"
    out = load_rgb(path, max_pixels=MAXPX)
    assert out[0, :, 1].tolist() == [0, 0, 100, 255, 255]


def test_grayscale_L(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = _save(tmp_path, Image.fromarray(arr, mode="L"), "l.png", "PNG")
    out = load_rgb(path, max_pixels=MAXPX)
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_one_bit(tmp_path):
    im = Image.new("1", (3, 2), 0)
    im.putpixel((1, 0), 1)
    for fmt, ext in (("PNG", ".png"), ("TIFF", ".tif"), ("BMP", ".bmp")):
        path = _save(tmp_path, im, "b" + ext, fmt)
        out = load_rgb(path, max_pixels=MAXPX)
        assert out[0, 1].tolist() == [255, 255, 255]
        assert out[0, 0].tolist() == [0, 0, 0] and out[1, 2].tolist() == [0, 0, 0]


def test_palette_and_palette_with_transparency(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    for i in range(3):
        im.putpixel((i, 0), i)
    path = _save(tmp_path, im, "p.png", "PNG")
    assert probe_image(path, max_pixels=MAXPX).mode == "P"
    assert load_rgb(path, max_pixels=MAXPX).tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]
    path = _save(tmp_path, im, "pt.png", "PNG", transparency=1)  # green -> transparent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "palette with transparency" warning
        out = load_rgb(path, max_pixels=MAXPX)
    assert out.tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]


def test_rgba_composited_over_white(tmp_path):
    arr = np.array(
        [[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]],
        dtype=np.uint8,
    )
    path = _save(tmp_path, Image.fromarray(arr, mode="RGBA"), "a.png", "PNG")
    assert probe_image(path, max_pixels=MAXPX).mode == "RGBA"
    out = load_rgb(path, max_pixels=MAXPX)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert out[0, 1].tolist() == [10, 20, 30]  # opaque unchanged
    assert out[0, 2].tolist() == [127, 127, 127]  # half black over white


def test_la_composited_over_white(tmp_path):
    im = Image.new("LA", (3, 1))
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (0, 255))
    im.putpixel((2, 0), (100, 128))
    path = _save(tmp_path, im, "la.png", "PNG")
    assert probe_image(path, max_pixels=MAXPX).mode == "LA"
    out = load_rgb(path, max_pixels=MAXPX)
    assert out[0, :, 0].tolist() == [255, 0, (100 * 128 + 255 * 127 + 127) // 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_color_key_transparency_rgb_png(tmp_path):
    im = Image.new("RGB", (2, 1), (1, 2, 3))
    im.putpixel((1, 0), (9, 9, 9))
    path = _save(tmp_path, im, "trns.png", "PNG", transparency=(1, 2, 3))
    assert load_rgb(path, max_pixels=MAXPX).tolist() == [[[255, 255, 255], [9, 9, 9]]]


@pytest.mark.parametrize("fmt,ext", [("JPEG", ".jpg"), ("TIFF", ".tif")])
def test_cmyk(tmp_path, fmt, ext):
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    for x in range(8, 16):
        for y in range(16):
            im.putpixel((x, y), (255, 0, 255, 0))  # pure green on the right half
    kw = {"quality": 95} if fmt == "JPEG" else {}
    path = _save(tmp_path, im, "cmyk" + ext, fmt, **kw)
    assert probe_image(path, max_pixels=MAXPX).mode == "CMYK"
    out = load_rgb(path, max_pixels=MAXPX).astype(int)
    assert np.abs(out[8, 2] - [255, 0, 0]).max() <= 12
    assert np.abs(out[8, 13] - [0, 255, 0]).max() <= 12


def test_ycbcr_and_lab_tiff(tmp_path):
    rgb = Image.new("RGB", (4, 4), (200, 30, 60))
    lab = rgb.convert("LAB")
    path = _save(tmp_path, lab, "lab.tif", "TIFF")
    assert probe_image(path, max_pixels=MAXPX).mode == "LAB"
    out = load_rgb(path, max_pixels=MAXPX).astype(int)
    assert np.abs(out[0, 0] - [200, 30, 60]).max() <= 8


# --------------------------------------------------------------------------
# EXIF orientation


def _oriented_jpeg(tmp_path: Path, orientation: int) -> Path:
    im = Image.new("RGB", (40, 20), (0, 0, 255))  # landscape, blue
    for x in range(10):
        for y in range(6):
            im.putpixel((x, y), (255, 0, 0))  # red top-left corner block
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(tmp_path, im, f"o{orientation}.jpg", "JPEG", exif=exif.tobytes(), quality=95)


def _red_corner(arr: np.ndarray) -> tuple[int, int]:
    red = (arr[..., 0] > 200) & (arr[..., 2] < 60)
    ys, xs = np.nonzero(red)
    h, w = arr.shape[:2]
    return int(ys.mean() > h / 2), int(xs.mean() > w / 2)  # (bottom?, right?)


def test_exif_orientation_6(tmp_path):
    path = _oriented_jpeg(tmp_path, 6)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)  # stored landscape
    info = probe_image(path, max_pixels=MAXPX)
    assert (info.width, info.height) == (20, 40)
    out = load_rgb(path, max_pixels=MAXPX)
    assert out.shape == (40, 20, 3)
    # Orientation 6 = rotate 90 clockwise for display: top-left goes to top-right.
    assert _red_corner(out) == (0, 1)
    assert out[1, 18, 0] > 200 and out[1, 18, 2] < 60


@pytest.mark.parametrize(
    "orientation,corner,swapped",
    [
        (1, (0, 0), False),
        (2, (0, 1), False),
        (3, (1, 1), False),
        (4, (1, 0), False),
        (5, (0, 0), True),
        (7, (1, 1), True),
        (8, (1, 0), True),
    ],
)
def test_exif_orientations(tmp_path, orientation, corner, swapped):
    path = _oriented_jpeg(tmp_path, orientation)
    info = probe_image(path, max_pixels=MAXPX)
    out = load_rgb(path, max_pixels=MAXPX)
    assert (info.width, info.height) == ((20, 40) if swapped else (40, 20))
    assert out.shape == (info.height, info.width, 3)
    assert _red_corner(out) == corner


def test_exif_orientation_tiff_and_png(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 6))
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt, ext, kw in (("TIFF", ".tif", {"exif": exif}), ("PNG", ".png", {"exif": exif.tobytes()})):
        path = _save(tmp_path, im, "o" + ext, fmt, **kw)
        info = probe_image(path, max_pixels=MAXPX)
        assert (info.width, info.height) == (20, 40), fmt
        out = load_rgb(path, max_pixels=MAXPX)
        assert out.shape == (40, 20, 3), fmt
        assert _red_corner(out) == (0, 1), fmt


def test_min_size_uses_oriented_dimensions(tmp_path):
    path = _oriented_jpeg(tmp_path, 6)  # stored 40x20 (WxH), displayed 20x40
    assert probe_image(path, max_pixels=MAXPX, min_size=(40, 20)).height == 40
    assert load_rgb(path, max_pixels=MAXPX, min_size=(40, 20)).shape == (40, 20, 3)
    with pytest.raises(ImageError) as e:
        probe_image(path, max_pixels=MAXPX, min_size=(20, 40))
    assert _code(e) == "image_too_small"


# --------------------------------------------------------------------------
# refusals


def _assert_code(source, code, **kw):
    kw.setdefault("max_pixels", MAXPX)
    with pytest.raises(ImageError) as e1:
        probe_image(source, **kw)
    assert e1.value.code == code, e1.value
    with pytest.raises(ImageError) as e2:
        load_rgb(source, **kw)
    assert e2.value.code == code, e2.value
    return e1.value


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_code(path, "empty_file")
    _assert_code(io.BytesIO(b""), "empty_file")


@pytest.mark.parametrize(
    "name,data,named",
    [
        ("text.png", b"hello, this is not an image\n" * 3, None),
        ("page.jpg", b"<!DOCTYPE html><html><body>hi</body></html>", "HTML"),
        ("doc.png", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n", "PDF"),
        ("fig.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "EPS"),
        (
            "pic.png",
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b'<rect width="10" height="10"/></svg>',
            "SVG",
        ),
        ("pic2.webp", b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
    ],
)
def test_not_images(tmp_path, name, data, named):
    path = tmp_path / name
    path.write_bytes(data)
    err = _assert_code(path, "unsupported_format")
    if named:
        assert named in err.message


def test_psd_refused(tmp_path):
    # 26-byte PSD header: signature, version 1, 6 reserved, channels, height, width, depth, mode (RGB)
    header = b"8BPS" + struct.pack(">H", 1) + b"\x00" * 6 + struct.pack(">HIIHH", 3, 4, 4, 8, 3)
    assert len(header) == 26
    data = header + struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">H", 0)
    data += b"\x00" * (4 * 4 * 3)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    err = _assert_code(path, "unsupported_format")
    assert "PSD" in err.message


def test_gif_refused_even_if_named_png(tmp_path):
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    path = tmp_path / "anim.png"
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:])
    err = _assert_code(path, "unsupported_format")
    assert err.code in ("unsupported_format", "multi_frame")
    assert "GIF" in err.message
    single = _save(tmp_path, Image.new("RGB", (4, 4)), "single.gif", "GIF")
    _assert_code(single, "unsupported_format")


def test_other_pillow_formats_refused(tmp_path):
    ico = _save(tmp_path, Image.new("RGB", (16, 16)), "a.ico", "ICO")
    assert "ICO" in _assert_code(ico, "unsupported_format").message
    eps_like = _save(tmp_path, Image.new("RGB", (4, 4)), "a.ppm", "PPM")
    _assert_code(eps_like, "unsupported_format")


def test_multipage_tiff(tmp_path):
    pages = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, "TIFF", save_all=True, append_images=pages[1:])
    _assert_code(path, "multi_frame")


def test_animated_png_and_webp(tmp_path):
    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    for fmt, ext in (("PNG", ".png"), ("WEBP", ".webp")):
        path = tmp_path / ("anim" + ext)
        frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        _assert_code(path, "multi_frame")


def test_truncated_jpeg(tmp_path):
    path = _save(tmp_path, Image.fromarray(_noise(64, 64)), "full.jpg", "JPEG")
    data = path.read_bytes()
    half = tmp_path / "half.jpg"
    half.write_bytes(data[: len(data) // 2])
    probe_image(half, max_pixels=MAXPX)  # header is intact
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageError) as e:
        load_rgb(half, max_pixels=MAXPX)
    assert e.value.code == "corrupt_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path):
    path = _save(tmp_path, Image.fromarray(_noise(64, 64)), "full.png", "PNG")
    data = path.read_bytes()
    half = tmp_path / "half.png"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        load_rgb(half, max_pixels=MAXPX)
    assert e.value.code == "corrupt_image"
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(data[:20])  # signature + half an IHDR
    _assert_code(tiny, "corrupt_image")


@pytest.mark.parametrize("compression", ["tiff_adobe_deflate", "tiff_lzw"])
def test_tiff_corrupt_strip(tmp_path, compression):
    path = _save(tmp_path, Image.fromarray(_smooth(64, 64)), "c.tif", "TIFF", compression=compression)
    with Image.open(path) as im:
        offsets = im.tag_v2[273]
        counts = im.tag_v2[279]
    offsets = offsets if isinstance(offsets, tuple) else (offsets,)
    counts = counts if isinstance(counts, tuple) else (counts,)
    data = bytearray(path.read_bytes())
    for off, cnt in zip(offsets, counts, strict=True):
        # Keep the first bytes (codec header) and destroy the rest of every strip.
        garbage = np.random.default_rng(1).integers(0, 256, cnt, dtype=np.uint8).tobytes()
        start = off + min(2, cnt - 1)
        data[start : off + cnt] = (
            b"\xff" * (off + cnt - start) if compression == "tiff_lzw" else garbage[: off + cnt - start]
        )
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(data))
    probe_image(bad, max_pixels=MAXPX)  # header intact
    with pytest.raises(ImageError) as e:
        load_rgb(bad, max_pixels=MAXPX)
    assert e.value.code == "corrupt_image"


def test_huge_png_header_is_refused_without_decoding(tmp_path, monkeypatch):
    # IHDR claims 50000 x 50000 RGB (7.5 GB decoded); the file itself is tiny.
    data = _png_bytes(50000, 50000, 8, 2, b"\x00" * 64)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    # Our limit decides, not Pillow's global guard (even when that is disabled).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_code(path, "too_many_pixels", max_pixels=100_000_000)
        _assert_code(io.BytesIO(data), "too_many_pixels", max_pixels=100_000_000)
    assert time.monotonic() - t0 < 2.0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    assert (rss1 - rss0) * scale < 200 * 1024 * 1024


def test_huge_header_with_pillow_default_guard(tmp_path):
    # With Pillow's default MAX_IMAGE_PIXELS this would be a DecompressionBombError.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(50000, 50000, 8, 2, b"\x00" * 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_code(path, "too_many_pixels", max_pixels=100_000_000)


@pytest.mark.parametrize(
    "fmt,ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("BMP", ".bmp"), ("WEBP", ".webp")]
)
def test_pixel_limit_boundary(tmp_path, fmt, ext):
    over = _save(tmp_path, Image.new("RGB", (101, 100)), "over" + ext, fmt)
    err = _assert_code(over, "too_many_pixels", max_pixels=10_000)
    assert "10000" in err.message
    at = _save(tmp_path, Image.new("RGB", (100, 100)), "at" + ext, fmt)
    assert probe_image(at, max_pixels=10_000).width == 100
    assert load_rgb(at, max_pixels=10_000).shape == (100, 100, 3)


@pytest.mark.parametrize("fmt,ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("BMP", ".bmp")])
def test_independent_of_pillow_global_limit(tmp_path, monkeypatch, fmt, ext):
    """A tiny Image.MAX_IMAGE_PIXELS changes nothing and produces no warning."""
    path = _save(tmp_path, Image.fromarray(_smooth(60, 50)), "a" + ext, fmt)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 3000 px is "a bomb" to Pillow
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe_image(path, max_pixels=10_000).width == 50
        assert load_rgb(path, max_pixels=10_000).shape == (60, 50, 3)
    assert Image.MAX_IMAGE_PIXELS == 100  # untouched


def test_image_too_small(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (40, 30)), "s.png", "PNG")
    assert probe_image(path, max_pixels=MAXPX, min_size=(30, 40)).width == 40
    assert load_rgb(path, max_pixels=MAXPX, min_size=(30, 40)).shape == (30, 40, 3)
    _assert_code(path, "image_too_small", min_size=(31, 10))
    _assert_code(path, "image_too_small", min_size=(10, 41))


def test_garbage_with_png_signature_is_corrupt(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    _assert_code(path, "corrupt_image")


def test_global_pillow_state_untouched(tmp_path):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    path = _save(tmp_path, Image.new("RGB", (10, 10)), "a.png", "PNG")
    load_rgb(path, max_pixels=100)
    with pytest.raises(ImageError):
        load_rgb(path, max_pixels=10)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_no_tensorflow_import():
    import subprocess

    code = (
        "import sys, shared.image_sources.pillow_decoder; "
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_concurrent_use_from_threads(tmp_path):
    """The API probes from several request threads at once; no shared state."""
    from concurrent.futures import ThreadPoolExecutor

    good = _save(tmp_path, Image.fromarray(_smooth(50, 60)), "g.png", "PNG").read_bytes()
    big = _save(tmp_path, Image.new("L", (200, 100)), "b.tif", "TIFF").read_bytes()

    def work(i: int):
        if i % 2:
            return probe_image(io.BytesIO(good), max_pixels=10_000).width, load_rgb(
                io.BytesIO(good), max_pixels=10_000
            ).shape
        with pytest.raises(ImageError) as e:
            load_rgb(io.BytesIO(big), max_pixels=10_000)
        return e.value.code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(200)))
    assert results[1::2] == [(60, (50, 60, 3))] * 100
    assert results[0::2] == ["too_many_pixels"] * 100
