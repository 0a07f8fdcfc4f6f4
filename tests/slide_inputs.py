"""Test inputs for the large-image path, made here (nothing downloaded): a pyramidal JPEG-tiled
BigTIFF "slide" with shapes of the bundled model on textured "tissue" over blank "glass",
an OME-TIFF, a GeoTIFF with a CRS, and helpers for broken files."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import tifffile
from PIL import Image

from shapes.scenes import SceneObject, generate_scene

GLASS = (238, 236, 240)
MPP = 0.25


@dataclass
class Slide:
    path: object
    level0: np.ndarray
    fine: list[SceneObject]  # shapes of detectable size at level 0 (circle, square)
    coarse: list[SceneObject]  # shapes drawn twice as large: detectable at level 1 (triangle, cross)
    tissue: list[tuple[int, int, int, int]]  # (x, y, w, h) of each tissue patch


def _tissue(width: int, height: int, seed: int, labels, object_size, margin: int):
    """A darker textured patch with shapes (the model sees shapes; Otsu sees tissue)."""
    image, objects = generate_scene(
        width, height, n_objects=2, seed=seed, labels=labels, object_size=object_size, margin=margin
    )
    return (image.astype(np.float32) * 0.8).astype(np.uint8), objects


def slide_pixels(width: int = 3072, height: int = 2048, seed: int = 5):
    """Level-0 pixels: glass with two tissue patches (about 9 % of the area)."""
    rng = np.random.default_rng(seed)
    level0 = np.empty((height, width, 3), np.uint8)
    level0[:] = GLASS
    level0 += rng.integers(0, 3, level0.shape, dtype=np.uint8)  # faint sensor noise
    fine_img, fine = _tissue(640, 448, seed, ["circle", "square"], (28, 40), 48)
    half, coarse_half = _tissue(320, 224, seed + 1, ["triangle", "cross"], (30, 40), 24)
    coarse_img = np.asarray(Image.fromarray(half).resize((640, 448), Image.Resampling.BICUBIC))
    fx, fy, cx, cy = 256, 256, width - 1024, height - 640
    level0[fy : fy + 448, fx : fx + 640] = fine_img
    level0[cy : cy + 448, cx : cx + 640] = coarse_img
    fine = [SceneObject(o.label, (o.center[0] + fx, o.center[1] + fy), o.size, o.colour) for o in fine]
    coarse = [
        SceneObject(o.label, (2 * o.center[0] + cx, 2 * o.center[1] + cy), 2 * o.size, o.colour) for o in coarse_half
    ]
    return level0, fine, coarse, [(fx, fy, 640, 448), (cx, cy, 640, 448)]


def pyramid(level0: np.ndarray, levels: int) -> list[np.ndarray]:
    out = [level0]
    for _ in range(levels - 1):
        out.append(np.asarray(Image.fromarray(out[-1]).reduce(2)))
    return out


def write_pyramid_tiff(path, level0: np.ndarray, *, levels: int = 4, tile: int = 256, compression="jpeg", **kw):
    """A tiled BigTIFF with SubIFD levels (the layout QuPath, libvips and bfconvert write)."""
    images = pyramid(level0, levels)
    options = {"tile": (tile, tile), "compression": compression, "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            images[0],
            subifds=levels - 1,
            resolution=(1e4 / MPP, 1e4 / MPP),
            resolutionunit="CENTIMETER",
            **options,
            **kw,
        )
        for image in images[1:]:
            tif.write(image, subfiletype=1, **options)
    return images


def make_slide(tmp_path, name: str = "slide.tif") -> Slide:
    level0, fine, coarse, tissue = slide_pixels()
    path = tmp_path / name
    write_pyramid_tiff(path, level0)
    return Slide(path, level0, fine, coarse, tissue)


def write_ome_tiff(path, pixels: np.ndarray, mpp: float = 0.5) -> None:
    tifffile.imwrite(
        path,
        pixels,
        ome=True,
        tile=(128, 128),
        compression="zlib",
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
    )


def write_geotiff(path, pixels: np.ndarray, *, origin=(500000.0, 4200000.0), pixel_size=2.0, epsg=32633) -> None:
    """A tiled GeoTIFF in UTM (EPSG:32633), PixelIsArea, north up."""
    directory = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
    tifffile.imwrite(
        path,
        pixels,
        tile=(128, 128),
        compression="zlib",
        photometric="rgb",
        extratags=[
            (33550, "d", 3, (pixel_size, pixel_size, 0.0), True),
            (33922, "d", 6, (0.0, 0.0, 0.0, origin[0], origin[1], 0.0), True),
            (34735, "H", len(directory), directory, True),
        ],
    )


def tiled_tiff(width: int, height: int, tile: int, chunks) -> bytes:
    """A classic little-endian RGB deflate tiled TIFF. `chunks(index, count)` gives each tile's
    compressed bytes: b"" (byte count 0), a bytes object (stored once per distinct object),
    or the same object again (its offset shared)."""
    across, down = -(-width // tile), -(-height // tile)
    count = across * down
    entries = 12
    ifd_size = 2 + entries * 12 + 4
    bits_at = 8 + ifd_size
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * count
    data_at = counts_at + 4 * count
    blobs, placed, offsets, sizes = bytearray(), {}, [], []
    for index in range(count):
        blob = chunks(index, count)
        if not blob:
            offsets.append(0)
            sizes.append(0)
            continue
        if id(blob) not in placed:
            placed[id(blob)] = data_at + len(blobs)
            blobs += blob
        offsets.append(placed[id(blob)])
        sizes.append(len(blob))

    def entry(tag, kind, n, value):
        return struct.pack("<HHI", tag, kind, n) + struct.pack("<I", value)

    ifd = struct.pack("<H", entries) + b"".join(
        [
            entry(256, 4, 1, width),
            entry(257, 4, 1, height),
            entry(258, 3, 3, bits_at),
            entry(259, 3, 1, 8),  # deflate
            entry(262, 3, 1, 2),  # RGB
            entry(277, 3, 1, 3),
            entry(284, 3, 1, 1),
            entry(322, 3, 1, tile),
            entry(323, 3, 1, tile),
            entry(324, 4, count, offsets_at) if count > 1 else entry(324, 4, 1, offsets[0]),
            entry(325, 4, count, counts_at) if count > 1 else entry(325, 4, 1, sizes[0]),
            entry(339, 3, 1, 1),
        ]
    )
    ifd += struct.pack("<I", 0)
    body = struct.pack("<2sHI", b"II", 42, 8) + ifd + struct.pack("<3H", 8, 8, 8)
    body += struct.pack(f"<{count}I", *offsets) + struct.pack(f"<{count}I", *sizes)
    assert len(body) == data_at
    return bytes(body + blobs)
