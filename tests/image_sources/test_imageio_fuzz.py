"""Deterministic fuzz test for shared.image_sources.pillow_decoder.

Every input must either decode to a valid (H, W, 3) uint8 array or raise
ImageError; any other exception, a call slower than PER_CALL_LIMIT_S, or a large
jump in peak memory fails the test.  The seed is fixed, so a failure reproduces;
the failure message carries the case number, how the input was made, and the
first bytes of the input.
"""

from __future__ import annotations

import io
import os
import random
import resource
import sys
import time
import traceback
import warnings

import numpy as np
from PIL import Image

from shared.image_sources.pillow_decoder import ImageError, ImageInfo, load_rgb, probe_image

SEED = 20240611
# ~300 inputs run in well under a second; IMAGEIO_FUZZ_CASES / IMAGEIO_FUZZ_SEED allow
# longer local runs (e.g. 20000 cases take a few seconds).
N_CASES = int(os.environ.get("IMAGEIO_FUZZ_CASES", "300"))
SEED = int(os.environ.get("IMAGEIO_FUZZ_SEED", str(SEED)))
MAX_PIXELS = 4_000_000
PER_CALL_LIMIT_S = 5.0
RSS_LIMIT_BYTES = 1 << 30

MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xdb",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",  # BigTIFF
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
    b"GIF89a",
    b"GIF87a",
]


def _seed_images() -> list[tuple[str, bytes]]:
    """Small valid images of every allowed format (and GIF), in several modes."""
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:24, 0:32]
    smooth = np.stack([x * 8, y * 10, (x + y) * 4], axis=-1).astype(np.uint8)
    noise = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    rgb = Image.fromarray(smooth)
    cases: list[tuple[str, Image.Image, str, dict]] = [
        ("png-rgb", rgb, "PNG", {}),
        ("png-noise", Image.fromarray(noise), "PNG", {}),
        ("png-p", rgb.convert("P"), "PNG", {}),
        ("png-p-trns", rgb.convert("P"), "PNG", {"transparency": 3}),
        ("png-rgba", rgb.convert("RGBA"), "PNG", {}),
        ("png-la", rgb.convert("LA"), "PNG", {}),
        ("png-i16", Image.fromarray(smooth[..., 0].astype(np.uint16) * 257).convert("I;16"), "PNG", {}),
        ("png-1", rgb.convert("1"), "PNG", {}),
        ("jpeg-rgb", rgb, "JPEG", {"quality": 90}),
        ("jpeg-progressive", rgb, "JPEG", {"progressive": True}),
        ("jpeg-l", rgb.convert("L"), "JPEG", {}),
        ("jpeg-cmyk", rgb.convert("CMYK"), "JPEG", {}),
        ("tiff-raw", rgb, "TIFF", {}),
        ("tiff-lzw", rgb, "TIFF", {"compression": "tiff_lzw"}),
        ("tiff-deflate", Image.fromarray(noise), "TIFF", {"compression": "tiff_adobe_deflate"}),
        ("tiff-packbits", rgb.convert("L"), "TIFF", {"compression": "packbits"}),
        ("tiff-i16", Image.fromarray(smooth[..., 1].astype(np.uint16) * 257).convert("I;16"), "TIFF", {}),
        ("tiff-cmyk", rgb.convert("CMYK"), "TIFF", {}),
        ("tiff-f", Image.fromarray(smooth[..., 2].astype(np.float32)), "TIFF", {}),
        ("bmp-rgb", rgb, "BMP", {}),
        ("bmp-p", rgb.convert("P"), "BMP", {}),
        ("bmp-1", rgb.convert("1"), "BMP", {}),
        ("webp-lossy", rgb, "WEBP", {"quality": 80}),
        ("webp-lossless", Image.fromarray(noise), "WEBP", {"lossless": True}),
        ("webp-rgba", rgb.convert("RGBA"), "WEBP", {}),
        ("gif", rgb.convert("P"), "GIF", {}),
    ]
    exif = Image.Exif()
    exif[0x0112] = 6
    cases.append(("jpeg-exif6", rgb, "JPEG", {"exif": exif.tobytes()}))
    out = []
    for name, im, fmt, kw in cases:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out.append((name, buf.getvalue()))
    # multi-frame inputs
    frames = [Image.new("RGB", (16, 16), (i * 50, 0, 0)) for i in range(3)]
    for fmt in ("TIFF", "PNG", "WEBP", "GIF"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50)
        out.append((f"{fmt.lower()}-multi", buf.getvalue()))
    return out


def _mutate(rnd: random.Random, data: bytes, others: list[bytes]) -> tuple[str, bytes]:
    kind = rnd.choice(["flip", "flip", "truncate", "splice", "overwrite", "header", "dup", "delete"])
    b = bytearray(data)
    if len(b) < 2:  # stacked mutations can shrink an input to almost nothing
        return "grow", bytes(b) + rnd.randbytes(rnd.randint(1, 64))
    if kind == "flip":
        for _ in range(rnd.randint(1, 16)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    elif kind == "truncate":
        b = b[: rnd.randrange(1, len(b))]
    elif kind == "splice":
        other = rnd.choice(others)
        cut = rnd.randrange(1, len(b))
        b = b[:cut] + other[rnd.randrange(len(other)) :]
    elif kind == "overwrite":
        i = rnd.randrange(len(b))
        n = rnd.randint(1, 64)
        b[i : i + n] = bytes(rnd.choice([0, 0xFF, rnd.randrange(256)]) for _ in range(n))
    elif kind == "header":
        # Hit the header region hard (dimensions, bit depths, offsets, counts).
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(min(len(b), 64))
            b[i] = rnd.choice([0, 1, 0x7F, 0x80, 0xFF, rnd.randrange(256)])
    elif kind == "dup":
        i = rnd.randrange(len(b))
        n = rnd.randint(1, 256)
        b[i:i] = b[i : i + n] * rnd.randint(1, 4)
    else:  # delete
        i = rnd.randrange(len(b))
        del b[i : i + rnd.randint(1, 128)]
    return kind, bytes(b)


def _inputs() -> list[tuple[str, bytes]]:
    rnd = random.Random(SEED)
    seeds = _seed_images()
    datas = [d for _, d in seeds]
    out: list[tuple[str, bytes]] = [(f"valid:{name}", data) for name, data in seeds]
    n_random = 30
    n_magic = 60
    for _ in range(n_random):
        n = rnd.choice([0, 1, 2, 7, 16, 100, rnd.randrange(4096)])
        out.append((f"random[{n}]", rnd.randbytes(n)))
    for _ in range(n_magic):
        magic = rnd.choice(MAGICS)
        n = rnd.choice([0, 8, 32, 200, rnd.randrange(4096)])
        out.append((f"magic:{magic[:12]!r}+{n}", magic + rnd.randbytes(n)))
    while len(out) < N_CASES:
        name, data = rnd.choice(seeds)
        kind, mutated = _mutate(rnd, data, datas)
        if rnd.random() < 0.2:  # stack a second mutation now and then
            kind2, mutated = _mutate(rnd, mutated, datas)
            kind = f"{kind}+{kind2}"
        out.append((f"mutant:{name}:{kind}", mutated))
    return out[:N_CASES]


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _check_one(idx: int, label: str, data: bytes) -> list[str]:
    problems = []
    where = f"case {idx} ({label}, {len(data)} bytes, head={data[:24].hex()})"
    for fn in (probe_image, load_rgb):
        t0 = time.monotonic()
        try:
            result = fn(io.BytesIO(data), max_pixels=MAX_PIXELS)
        except ImageError as e:
            if not (isinstance(e.code, str) and e.code and isinstance(e.message, str)):
                problems.append(f"{where}: {fn.__name__} raised malformed ImageError {e!r}")
        except Exception:
            problems.append(f"{where}: {fn.__name__} raised a non-ImageError:\n{traceback.format_exc(limit=4)}")
        else:
            if fn is probe_image:
                ok = isinstance(result, ImageInfo) and result.width * result.height <= MAX_PIXELS
            else:
                ok = (
                    isinstance(result, np.ndarray)
                    and result.dtype == np.uint8
                    and result.ndim == 3
                    and result.shape[2] == 3
                    and result.shape[0] * result.shape[1] <= MAX_PIXELS
                    and result.flags.c_contiguous
                )
            if not ok:
                problems.append(f"{where}: {fn.__name__} returned an invalid result {result!r:.200}")
        elapsed = time.monotonic() - t0
        if elapsed > PER_CALL_LIMIT_S:
            problems.append(f"{where}: {fn.__name__} took {elapsed:.1f}s")
    return problems


def test_seed_images_are_valid():
    """Sanity check of the fuzz corpus itself: single-frame allowed formats load."""
    for name, data in _seed_images():
        if name.startswith("gif") or name.endswith("-multi"):
            continue
        arr = load_rgb(io.BytesIO(data), max_pixels=MAX_PIXELS)
        assert arr.ndim == 3 and arr.shape[2] == 3, name


def test_fuzz_probe_and_load():
    inputs = _inputs()
    assert len(inputs) == N_CASES
    rss_before = _maxrss_bytes()
    problems: list[str] = []
    counts: dict[str, int] = {}
    # Pillow legitimately warns about damaged metadata (e.g. "Corrupt EXIF data");
    # record those quietly, but a DecompressionBombWarning must never appear: the
    # pixel budget is ours and is reported as an ImageError.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for idx, (label, data) in enumerate(inputs):
            problems.extend(_check_one(idx, label, data))
            # Outcome tally (helps when reading a failure report).
            try:
                load_rgb(io.BytesIO(data), max_pixels=MAX_PIXELS)
                counts["ok"] = counts.get("ok", 0) + 1
            except ImageError as e:
                counts[e.code] = counts.get(e.code, 0) + 1
            except Exception:
                pass  # already reported by _check_one
    bombs = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    if bombs:
        problems.append(f"DecompressionBombWarning leaked: {bombs[0].message}")
    rss_growth = _maxrss_bytes() - rss_before
    if rss_growth > RSS_LIMIT_BYTES:
        problems.append(f"peak RSS grew by {rss_growth / 2**20:.0f} MiB during the fuzz run")
    assert not problems, f"{len(problems)} problem(s); outcomes {counts}:\n" + "\n".join(problems[:10])
    # The corpus must exercise both paths.
    assert counts.get("ok", 0) > 10 and counts.get("corrupt_image", 0) > 10, counts
