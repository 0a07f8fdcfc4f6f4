"""Image reading shared by the API and the worker.

Why one module for both: the API decides whether to *accept* an upload (format,
frame count, pixel budget, minimum size) and the worker later *decodes* the stored
file.  If these two used different code, an upload could be accepted by the API
and then fail (or, worse, decode differently) in the worker hours later.  Both
therefore go through this module: the API calls :func:`probe_image` (header only,
cheap, never decodes pixel data, safe to run inside a request), and the worker
calls :func:`load_rgb`, which runs exactly the same checks first and then decodes.
Every failure is an :class:`ImageError` with a stable machine ``code``; no Pillow
exception or warning escapes for bad input.

Policies (documented here because callers depend on them):

* Only ``ALLOWED_FORMATS`` are opened.  Files are identified by content, never by
  their name.  Other formats Pillow knows (GIF, EPS, PSD, ICO, ...) are refused
  *without* running their parsers; the message names the detected format.
* JPEG files are always read as plain JPEG: for MPO-style JPEGs (phone photos with
  an embedded depth map / gain map / second view) the primary image is used.
* The pixel budget (``max_pixels``) is decided from the header, before any pixel
  memory is allocated, and never depends on ``PIL.Image.MAX_IMAGE_PIXELS``; no
  global Pillow state is modified.  (Pillow's own guard is bypassed where Pillow
  allows it.  One exception: Pillow's WebP opener refuses canvases larger than
  ``2 * Image.MAX_IMAGE_PIXELS`` (about 179 MP by default) itself; that is reported
  as ``too_many_pixels`` too.)
* EXIF orientation is applied; reported width/height are the oriented ones.
* Colour: 16-bit samples are scaled to 8 bit by their full range (``v >> 8``);
  float images are clipped to [0, 255]; transparent images are composited over a
  WHITE background (documents and scans are mostly white paper; black would
  invent dark structure where the image is empty); CMYK, YCbCr, LAB, HSV... go
  through Pillow's ``convert``.
* ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone and must stay False:
  truncated files are ``corrupt_image``.
* Multi-frame files (animated PNG/WebP, multi-page TIFF) are refused.

A file object passed as ``source`` is read from offset 0 (like Pillow does) and its
position is restored afterwards, so the API can probe an upload and then save it.
The caller keeps ownership of file objects; paths are opened and closed here.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, NoReturn

import numpy as np
from PIL import Image, ImageFile

from shared.image_sources.source_types import ImageError

__all__ = [
    "ALLOWED_FORMATS",
    "ImageError",
    "ImageInfo",
    "load_rgb",
    "probe_image",
]


ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "TIFF", "BMP", "WEBP"})

_EXTENSIONS = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "TIFF": ".tif",
    "BMP": ".bmp",
    "WEBP": ".webp",
}


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow format name, e.g. "PNG"
    width: int  # AFTER applying EXIF orientation (swapped for orientations 5-8)
    height: int
    mode: str  # Pillow mode as stored, e.g. "I;16", "CMYK", "P", "RGBA"
    extension: str  # canonical extension for storage: ".jpg", ".png", ...


# --------------------------------------------------------------------------
# Opening (header only)


def _openers() -> list[tuple[str, Callable[..., Any], Callable[[bytes], Any] | None]]:
    """(format, factory, accept) for the allowed formats, in probing order.

    Uses the plugin registry directly instead of ``Image.open`` so that (a) the
    parsers of refused formats never run on untrusted bytes and (b) Pillow's
    global decompression-bomb check (``Image.MAX_IMAGE_PIXELS``) is not consulted:
    our own ``max_pixels`` decides.
    """
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin  # noqa: F401

    try:
        from PIL import WebPImagePlugin  # noqa: F401
    except ImportError:  # pragma: no cover - Pillow built without WebP
        pass
    result = []
    for fmt in ("JPEG", "PNG", "TIFF", "BMP", "WEBP"):
        entry = Image.OPEN.get(fmt)
        if entry is None:  # pragma: no cover - plugin unavailable
            continue
        factory, accept = entry
        if fmt == "JPEG":
            # jpeg_factory may return an MPO image; we always want the primary JPEG.
            factory = JpegImagePlugin.JpegImageFile
        result.append((fmt, factory, accept))
    return result


_SNIFF = (
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS/PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "PSD"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"\x89HDF", "HDF5"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip archive"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)


def _sniff_other(head: bytes) -> str | None:
    """Best-effort name of a refused format, for the error message only."""
    for magic, name in _SNIFF:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return _iso_media_name(head[8:12])
    return _sniff_text(head) or _sniff_pillow(head)


def _iso_media_name(brand: bytes) -> str:
    """Name of an ISO base media file (``ftyp`` box) from its major brand."""
    if brand in (b"avif", b"avis"):
        return "AVIF"
    if brand in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
        return "HEIF"
    return "ISO media (" + brand.decode("ascii", "replace").strip() + ")"


def _sniff_text(head: bytes) -> str | None:
    """Name of a text format (SVG, HTML, XML, JSON) from the file's first bytes."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    if text.startswith(b"<!doctype html") or text.startswith(b"<html"):
        return "HTML"
    if text.startswith(b"<?xml"):
        return "XML"
    if text.startswith(b"{") or text.startswith(b"["):
        return "JSON/text"
    return None


def _sniff_pillow(head: bytes) -> str | None:
    """Ask Pillow's (cheap, prefix-only) accept functions of refused formats; never run their parsers."""
    try:
        Image.init()
        for fmt in Image.ID:
            if fmt in ALLOWED_FORMATS:
                continue
            accept = Image.OPEN[fmt][1]
            if accept is None:
                continue
            try:
                verdict = accept(head[:16])
                if verdict and not isinstance(verdict, str):
                    return fmt
            except Exception:
                continue
    except Exception:  # pragma: no cover - defensive
        pass
    return None


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent or unreadable). Never decodes pixels."""
    try:
        if im.format == "PNG":
            # PngImageFile.getexif() would decode the image to look for an eXIf
            # chunk after the pixel data; the base implementation reads only what
            # the header pass collected.
            exif = Image.Image.getexif(im)
        else:
            exif = im.getexif()
        value = exif.get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


class _Opened:
    """An opened (not decoded) image plus the checks' results."""

    def __init__(self, im: ImageFile.ImageFile, info: ImageInfo):
        self.im = im
        self.info = info


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _with_stream(source: Any, fn: Callable[[IO[bytes]], Any]) -> Any:
    """Call fn with a seekable binary stream positioned at 0; clean up after."""
    if _is_path(source):
        with open(source, "rb") as fp:
            return fn(fp)
    if not hasattr(source, "read"):
        raise TypeError(f"source must be a path or a binary file object, not {type(source).__name__}")
    try:
        pos = source.tell()
        source.seek(0)
    except (AttributeError, OSError, ValueError):
        # Not seekable: buffer it (the caller can't re-read it anyway).
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("source file object must be opened in binary mode") from None
        return fn(io.BytesIO(data))
    try:
        return fn(source)
    finally:
        try:
            source.seek(pos)
        except Exception:  # pragma: no cover - defensive
            pass


def _open_checked(fp: IO[bytes], *, max_pixels: int, min_size: tuple[int, int] | None) -> _Opened:
    head = _read_head(fp)
    im, accepted = _open_allowed(fp, head)
    try:
        fmt = im.format or accepted[-1]
        return _Opened(im, _checked_info(im, fmt, max_pixels=max_pixels, min_size=min_size))
    except BaseException:
        _release(im)
        raise


def _read_head(fp: IO[bytes]) -> bytes:
    """The file's first bytes (up to 512), for format detection."""
    head = fp.read(512)
    if isinstance(head, str):
        raise TypeError("source file object must be opened in binary mode")
    if not head:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    return head


def _accepts(accept: Callable[[bytes], Any] | None, prefix: bytes) -> bool:
    """Whether a plugin's accept function claims `prefix` (a string verdict is a refusal)."""
    try:
        if accept is not None:
            verdict = accept(prefix)
            if isinstance(verdict, str) or not verdict:
                return False
    except Exception:
        return False
    return True


def _open_allowed(fp: IO[bytes], head: bytes) -> tuple[ImageFile.ImageFile, list[str]]:
    """Open (not decode) `fp` with the first allowed format whose header parses.

    Returns the image and the formats that claimed the file, in probing order.
    """
    accepted: list[str] = []
    failure: BaseException | None = None
    for fmt, factory, accept in _openers():
        if not _accepts(accept, head[:16]):
            continue
        accepted.append(fmt)
        fp.seek(0)
        try:
            return factory(fp, ""), accepted
        except MemoryError:
            raise
        except Image.DecompressionBombError as e:
            # Pillow's WebP opener checks before allocating its canvas.
            raise ImageError("too_many_pixels", f"{fmt} image is too large: {e}") from None
        except Exception as e:  # broken header of an allowed format
            failure = e
            continue
    _raise_unopened(head, accepted, failure)


def _raise_unopened(head: bytes, accepted: list[str], failure: BaseException | None) -> NoReturn:
    """The error for a file no allowed format could open: corrupt, or another format."""
    if accepted:
        raise ImageError(
            "corrupt_image",
            f"cannot read the {'/'.join(accepted)} header: {failure}",
        ) from None
    name = _sniff_other(head)
    if name:
        raise ImageError(
            "unsupported_format",
            f"{name} files are not supported; allowed formats: {_allowed_text()}",
        )
    raise ImageError(
        "unsupported_format",
        f"not a recognised image file; allowed formats: {_allowed_text()}",
    )


def _checked_info(im: ImageFile.ImageFile, fmt: str, *, max_pixels: int, min_size: tuple[int, int] | None) -> ImageInfo:
    """Check an opened image against the limits and describe it (size after EXIF orientation)."""
    if fmt not in ALLOWED_FORMATS:  # pragma: no cover - defensive
        raise ImageError("unsupported_format", f"{fmt} files are not supported")
    width, height = im.size
    if not (isinstance(width, int) and isinstance(height, int)) or width <= 0 or height <= 0:
        raise ImageError("corrupt_image", f"invalid image dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    _check_single_frame(im, fmt)
    width, height = _oriented_size(im, fmt, width, height)
    _check_min_size(width, height, min_size)
    return ImageInfo(
        format=fmt,
        width=int(width),
        height=int(height),
        mode=im.mode,
        extension=_EXTENSIONS[fmt],
    )


def _check_single_frame(im: ImageFile.ImageFile, fmt: str) -> None:
    try:
        n_frames = getattr(im, "n_frames", 1)
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError("corrupt_image", f"cannot read the {fmt} frame structure: {e}") from None
    if isinstance(n_frames, int) and n_frames > 1:
        raise ImageError(
            "multi_frame",
            f"{fmt} file has {n_frames} frames/pages; only single-frame images are supported",
        )


def _oriented_size(im: ImageFile.ImageFile, fmt: str, width: int, height: int) -> tuple[int, int]:
    """(width, height) as displayed, after the EXIF orientation."""
    orientation = _orientation(im)
    # Raw (stored) size; Pillow >= 12 already reports the oriented size for TIFF
    # (and keeps the stored one in _tile_size), other formats report stored size.
    raw_w, raw_h = width, height
    tile_size = getattr(im, "_tile_size", None) if fmt == "TIFF" else None
    if isinstance(tile_size, tuple) and len(tile_size) == 2:
        raw_w, raw_h = tile_size
    if orientation in (5, 6, 7, 8):
        return raw_h, raw_w
    return raw_w, raw_h


def _release(im: Image.Image) -> None:
    """Drop an image's pixel memory without closing the stream it reads from.

    ``Image.close()`` would also close the underlying file object, which belongs to
    the caller (or to our own ``with open(...)``).
    """
    try:
        im.fp = None  # type: ignore[attr-defined]
        im._fp = None  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - defensive
        pass
    try:
        im.close()
    except Exception:  # pragma: no cover - defensive
        pass


def _allowed_text() -> str:
    return ", ".join(sorted(ALLOWED_FORMATS))


def _check_min_size(width: int, height: int, min_size: tuple[int, int] | None) -> None:
    if min_size is None:
        return
    min_h, min_w = min_size
    if height < min_h or width < min_w:
        raise ImageError(
            "image_too_small",
            f"image is {width}x{height} (WxH); at least {min_w}x{min_h} is required",
        )


def probe_image(source, *, max_pixels: int, min_size: tuple[int, int] | None = None) -> ImageInfo:
    """Identify an image from its header only, without decoding pixel data.

    source: a filesystem path (str/Path) or a seekable binary file object (read
    from offset 0; its position is restored).
    min_size is (min_height, min_width), compared with the oriented size.
    Raises ImageError with code empty_file, unsupported_format, multi_frame,
    too_many_pixels, image_too_small or corrupt_image.  A missing path raises
    FileNotFoundError (that is not a property of the image).
    """

    def run(fp: IO[bytes]) -> ImageInfo:
        opened = _open_checked(fp, max_pixels=max_pixels, min_size=min_size)
        _release(opened.im)
        return opened.info

    return _with_stream(source, run)


# --------------------------------------------------------------------------
# Decoding

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _decode(im: ImageFile.ImageFile) -> None:
    """im.load() without Pillow's global bomb check (our max_pixels already held)."""
    if im.format == "TIFF" and getattr(im, "_im", "missing") is None:
        tile_size = getattr(im, "_tile_size", None)
        if isinstance(tile_size, tuple):
            # TiffImageFile.load_prepare() runs Image._decompression_bomb_check
            # (a warning above MAX_IMAGE_PIXELS, an error above twice that) unless
            # the target image already exists.  Allocating it here keeps the
            # decision on our own max_pixels, without touching global state.
            try:
                im.im = Image.core.new(im.mode, tile_size)
            except MemoryError:
                raise
            except Exception:
                pass
    im.load()


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 straight alpha -> (H, W, 3) uint8 over white, row-chunked."""
    h, w = rgba.shape[:2]
    out = np.empty((h, w, 3), dtype=np.uint8)
    step = max(1, (1 << 22) // max(1, w))  # ~4M pixels per chunk bounds temporaries
    for y in range(0, h, step):
        chunk = rgba[y : y + step]
        a = chunk[..., 3:4].astype(np.uint16)
        rgb = chunk[..., :3].astype(np.uint16)
        # max: 255 * 255 + 127 = 65152, fits uint16; +127 rounds to nearest
        out[y : y + step] = (rgb * a + 255 * (255 - a) + 127) // 255
    return out


def _transparency_mask(arr: np.ndarray, trns: Any) -> np.ndarray | None:
    if isinstance(trns, int) and arr.ndim == 2:
        return arr == trns
    return None


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        arr = np.asarray(im)
        if mode == "I":
            # 32-bit signed container; 16-bit sources land here (e.g. signed TIFF).
            # Same full-range rule as 16 bit; out-of-range values saturate.
            arr = np.clip(arr, 0, 65535)
        mask = _transparency_mask(arr, im.info.get("transparency"))
        gray = (arr >> 8).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
        if mask is not None:
            gray[mask] = 255  # transparent (tRNS colour key) -> white
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        gray = np.rint(np.clip(arr, 0.0, 255.0)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("L", "1") and "transparency" not in im.info:
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)

    has_alpha = mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha:
        if mode == "La":
            im = im.convert("LA")
        rgba_im = im if mode == "RGBA" else im.convert("RGBA")
        rgba = np.asarray(rgba_im, dtype=np.uint8)
        del rgba_im, im  # drop this function's references before allocating the output
        return _composite_over_white(rgba)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def load_rgb(source, *, max_pixels: int, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Fully decode to a C-contiguous uint8 array of shape (H, W, 3), RGB order.

    Runs the probe_image checks first (same errors), then decodes, applies the
    EXIF orientation and converts to RGB (see the module docstring for the colour
    rules; transparency is composited over WHITE).  Truncated or corrupt data
    raises ImageError("corrupt_image"); MemoryError propagates.
    """

    def run(fp: IO[bytes]) -> np.ndarray:
        opened = _open_checked(fp, max_pixels=max_pixels, min_size=min_size)
        im = opened.im
        fmt = opened.info.format
        try:
            try:
                _decode(im)
                # Orientation as it stands after decoding: Pillow >= 12 applies
                # (and removes) the TIFF orientation during load itself.
                method = _TRANSPOSE.get(_orientation(im))
                if method is not None:
                    img: Image.Image = im.transpose(method)
                    _release(im)  # free the un-rotated copy before converting
                else:
                    img = im
                arr = _to_rgb(img)
                del img
            except (ImageError, MemoryError):
                raise
            except Image.DecompressionBombError as e:
                raise ImageError("too_many_pixels", f"{fmt} image is too large: {e}") from None
            except Exception as e:
                raise ImageError(
                    "corrupt_image", f"cannot decode the {fmt} image data: {type(e).__name__}: {e}"
                ) from None
        finally:
            _release(im)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:  # pragma: no cover
            raise ImageError("corrupt_image", f"decoder produced an unexpected array {arr.shape}")
        h, w = arr.shape[:2]
        if h * w > max_pixels:  # pragma: no cover - defensive, size comes from the header
            raise ImageError("too_many_pixels", f"image is {w}x{h}; the limit is {max_pixels}")
        _check_min_size(w, h, min_size)
        return np.ascontiguousarray(arr)

    return _with_stream(source, run)
