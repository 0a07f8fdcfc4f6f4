"""Synthetic scenes and training crops for the bundled ``shapes`` model.

Why this module exists
----------------------
The service must work offline and its heatmaps must be *checkable*: a test or a demo has
to know which object is where.  Real photographs cannot give that without shipping data,
so the repository bundles a tiny classifier (``models/shapes.keras``) trained on synthetic
images made here, and the same generator produces large test/demo scenes with known
objects at known places (``generate_scene``).

It is deliberately light: numpy + Pillow only, no TensorFlow/Keras import, so the demo
client and API-side scripts can import it without a deep-learning stack.

Conventions
-----------
* Images are ``uint8`` arrays of shape ``(H, W, 3)``, RGB.
* Pixel coordinates are ``(x, y)`` = (column, row) of pixel *centres*; a window of side
  ``s`` starting at column ``x0`` has its centre at ``x0 + (s - 1) / 2``.
* The classifier's native window is :data:`WINDOW` (64 px).  A window is labelled with a
  shape class when one object of that class is roughly centred in it (offset up to
  ~12 % of the window) and fills 35-75 % of it; anything else - bare texture, clutter,
  shapes that are clearly off-centre or only partly inside - is ``"background"``.
  This is what makes the class score maps of a sliding-window / FCN pass peak on object
  centres.
* Textures are specified in *pixel* scales (blob size, stripe period, noise sigma), not
  relative to the image size, so a 64 px training crop and a 6000 x 4000 scene have the
  same local statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPE_CLASSES",
    "OBJECT_CLASSES",
    "WINDOW",
    "SceneObject",
    "textured_background",
    "draw_shape",
    "random_colour",
    "make_crop",
    "generate_scene",
]

#: Class names of the bundled model, in output order (index 0 is background).
SHAPE_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle", "cross")
#: The drawable object classes (all but background).
OBJECT_CLASSES: tuple[str, ...] = SHAPE_CLASSES[1:]
#: Native input size (square window side, px) of the bundled model.
WINDOW = 64

# Geometry of positive training crops, as fractions of the window side.
_POS_JITTER = 0.12  # max centre offset of a positive object
_POS_SIZE = (0.35, 0.75)  # object bounding-box side
_NEG_MIN_OFFSET = 0.30  # off-centre shapes in background crops are at least this far out
_MIN_CONTRAST = 80.0  # minimum RGB distance between an object and its local background

_SUPERSAMPLE = 4  # anti-aliasing factor used when rasterising shapes
_CHUNK_ROWS = 256  # rows processed at once when compositing large textures


# --------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    """One drawn object of a scene: its class, centre (x, y) in px and bounding-box side."""

    label: str
    center: tuple[int, int]  # (x, y) pixels
    size: int  # bounding box side in px
    colour: tuple[int, int, int]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the object's square bounding box, x1/y1 exclusive."""
        x, y = self.center
        x0 = x - self.size // 2
        y0 = y - self.size // 2
        return (x0, y0, x0 + self.size, y0 + self.size)

    def contains(self, x: float, y: float, margin: float = 0) -> bool:
        """Whether point (x, y) lies in the bounding box grown by ``margin`` px on each side."""
        x0, y0, x1, y1 = self.bbox
        return (x0 - margin <= x <= x1 + margin) and (y0 - margin <= y <= y1 + margin)


# --------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------
def _upscaled_noise(height: int, width: int, cell: float, channels: int, rng) -> np.ndarray:
    """Smooth noise with feature size ~``cell`` px: random low-res grid, bicubic upscale.

    Returns uint8 (H, W, channels) centred on ~127.5 (scale with ``(v - 127.5) / 127.5``).
    """
    gh = max(2, int(math.ceil(height / cell)) + 2)
    gw = max(2, int(math.ceil(width / cell)) + 2)
    grid = rng.integers(0, 256, size=(gh, gw, channels), dtype=np.uint8)
    img = Image.fromarray(grid if channels == 3 else grid[:, :, 0], "RGB" if channels == 3 else "L")
    # Map the output onto a randomly offset sub-box of the grid, so that the lattice does
    # not line up with the image edges.
    ox, oy = rng.uniform(0, 1, size=2)
    box = (ox, oy, ox + width / cell, oy + height / cell)
    arr = np.asarray(img.resize((width, height), Image.BICUBIC, box=box))
    return arr if channels == 3 else arr[:, :, None]


def textured_background(height: int, width: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """A random noisy, textured background, uint8 (height, width, 3).

    Layers (each with random parameters): a smooth colour gradient across the image,
    low-frequency colour blobs, optional mid-frequency luminance mottling, optional
    stripes at a random angle, fine per-pixel gaussian noise and optional speckle grain.
    Large sizes are cheap: smooth layers are low-res noise upscaled by Pillow and the
    per-pixel layers are composited in row chunks in float32.
    """
    rng = np.random.default_rng(rng)
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {height}x{width}")
    # The layers draw from `rng` in this order; keep it so that a seed gives the same image.
    base = _gradient_base(height, width, rng)
    # 2. Low-frequency colour blobs (feature size 16-160 px).
    blob_cell = float(rng.uniform(16, 160))
    blob_amp = float(rng.uniform(8, 45))
    blobs = _upscaled_noise(height, width, blob_cell, 3, rng)
    mottle = _mottle(height, width, rng)
    stripes = _stripes(height, width, rng)
    # 5. Fine noise and speckle grain.
    sigma = float(rng.uniform(2, 14))
    grain = float(rng.uniform(0.001, 0.01)) if rng.random() < 0.3 else 0.0

    out = np.empty((height, width, 3), dtype=np.uint8)
    for r0 in range(0, height, _CHUNK_ROWS):
        r1 = min(height, r0 + _CHUNK_ROWS)
        acc = base[r0:r1].astype(np.float32)
        _add_centred(acc, blobs[r0:r1], blob_amp)
        if mottle is not None:
            _add_centred(acc, mottle[0][r0:r1], mottle[1])
        if stripes is not None:
            _add_stripes(acc, stripes, r0, r1)
        _add_noise(acc, sigma, grain, rng)
        np.clip(acc, 0, 255, out=acc)
        out[r0:r1] = acc.astype(np.uint8)
    return out


def _gradient_base(height: int, width: int, rng) -> np.ndarray:
    """1. Base colour: a gradient between random corner colours, uint8 (height, width, 3).

    The corners lie in a limited range so that some contrast remains available for objects
    of any colour.
    """
    corners = rng.uniform(30, 225, size=(2, 2, 3))
    if rng.random() < 0.5:  # sometimes nearly flat
        corners = corners.mean(axis=(0, 1), keepdims=True) + rng.uniform(-20, 20, size=(2, 2, 3))
    corners = np.clip(corners, 0, 255).astype(np.uint8)
    base = Image.fromarray(corners, "RGB").resize((width, height), Image.BILINEAR)
    return np.asarray(base)


def _mottle(height: int, width: int, rng) -> tuple[np.ndarray, float] | None:
    """3. Optional mid-frequency luminance mottling (feature size 3-12 px): (noise, amplitude)."""
    if rng.random() >= 0.6:
        return None
    amp = float(rng.uniform(4, 22))
    return _upscaled_noise(height, width, float(rng.uniform(3, 12)), 1, rng), amp


def _stripes(height: int, width: int, rng) -> tuple | None:
    """4. Optional stripes: sin(2 pi (x cos t + y sin t) / period + phase), separable.

    Returns ``(sin ax, cos ax, sin ay, cos ay, amplitude, tint)`` or None.
    """
    if rng.random() >= 0.3:
        return None
    period = float(rng.uniform(5, 40))
    theta = float(rng.uniform(0, math.pi))
    phase = float(rng.uniform(0, 2 * math.pi))
    amp = float(rng.uniform(6, 24))
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    k = 2 * math.pi / period
    ax = (k * math.cos(theta) * np.arange(width, dtype=np.float32) + phase).astype(np.float32)
    ay = (k * math.sin(theta) * np.arange(height, dtype=np.float32)).astype(np.float32)
    return np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay), amp, tint


def _add_centred(acc: np.ndarray, noise: np.ndarray, amp: float) -> None:
    """Add uint8 noise centred on 127.5, scaled to +-amp, to `acc` in place."""
    acc += noise * np.float32(amp / 127.5)
    acc -= np.float32(amp)


def _add_stripes(acc: np.ndarray, stripes: tuple, r0: int, r1: int) -> None:
    """Add rows [r0, r1) of the stripe layer to `acc` in place."""
    sx, cx, sy, cy, amp, tint = stripes
    # sin(a + b) = sin a cos b + cos a sin b
    s = sx[None, :] * cy[r0:r1, None] + cx[None, :] * sy[r0:r1, None]
    acc += (s * amp)[:, :, None] * tint


def _add_noise(acc: np.ndarray, sigma: float, grain: float, rng) -> None:
    """Add per-pixel gaussian noise and, with `grain` > 0, black/white speckles to `acc` in place."""
    acc += rng.standard_normal(size=acc.shape, dtype=np.float32) * sigma
    if grain:
        hits = rng.random(size=acc.shape[:2], dtype=np.float32) < grain
        n = int(hits.sum())
        if n:
            acc[hits] = rng.choice(np.array([0.0, 255.0], np.float32), size=(n, 1))


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------
def _unit_polygon(label: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) of a shape around the origin, before scaling; y points down."""
    if label == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if label == "triangle":
        a = np.deg2rad([-90.0, 30.0, 150.0])  # apex up
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    if label == "cross":
        t = float(rng.uniform(0.26, 0.38))  # arm half-thickness relative to half-size 1
        return np.array(
            [
                [-t, -1],
                [t, -1],
                [t, -t],
                [1, -t],
                [1, t],
                [t, t],
                [t, 1],
                [-t, 1],
                [-t, t],
                [-1, t],
                [-1, -t],
                [-t, -t],
            ],
            dtype=np.float64,
        )
    raise ValueError(f"unknown polygon shape {label!r}")


_MAX_ROTATION = {"square": 15.0, "triangle": 20.0, "cross": 12.0}


def _shape_points(label: str, center, size: float, rng, angle: float | None):
    """Polygon vertices in image coordinates, scaled so that the bbox's longer side == size."""
    pts = _unit_polygon(label, rng)
    if angle is None:
        lim = _MAX_ROTATION[label]
        angle = float(rng.uniform(-lim, lim))
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = pts @ rot.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pts = (pts - (lo + hi) / 2) * (size / float((hi - lo).max()))
    return pts + np.asarray(center, dtype=np.float64)


def draw_shape(
    image_or_pil,
    label: str,
    center: tuple[float, float],
    size: float,
    colour: tuple[int, int, int],
    rng: np.random.Generator | int | None = None,
    *,
    angle: float | None = None,
    outline: bool | None = None,
):
    """Draw one filled, anti-aliased shape and return the image.

    ``image_or_pil`` is a uint8 (H, W, 3) array (modified in place and returned) or a PIL
    RGB image (a new image is returned).  ``label`` is one of :data:`OBJECT_CLASSES`,
    ``center`` is (x, y) in pixel coordinates, ``size`` is the bounding-box side in px and
    ``colour`` is the RGB fill.  Squares, triangles and crosses get a small random rotation
    unless ``angle`` (degrees) is given; the shape may get a thin darker/lighter outline
    (random unless ``outline`` is given), a faint shading gradient and a little noise.
    Parts outside the image are clipped.
    """
    rng = np.random.default_rng(rng)
    if isinstance(image_or_pil, Image.Image):
        arr = np.array(image_or_pil.convert("RGB"))
        draw_shape(arr, label, center, size, colour, rng, angle=angle, outline=outline)
        return Image.fromarray(arr, "RGB")
    image = image_or_pil
    if label not in OBJECT_CLASSES:
        raise ValueError(f"label must be one of {OBJECT_CLASSES}, got {label!r}")
    h, w = image.shape[:2]
    cx, cy = float(center[0]), float(center[1])
    half = size / 2.0 + 2.0
    x0, y0 = max(0, int(math.floor(cx - half))), max(0, int(math.floor(cy - half)))
    x1, y1 = min(w, int(math.ceil(cx + half)) + 1), min(h, int(math.ceil(cy + half)) + 1)
    if x1 <= x0 or y1 <= y0:
        return image  # entirely outside

    ss = _SUPERSAMPLE
    pw, ph = x1 - x0, y1 - y0
    # Patch-local supersampled coordinates; +0.5 maps pixel centres to PIL's grid.
    lx, ly = (cx - x0 + 0.5) * ss, (cy - y0 + 0.5) * ss
    fill_mask = Image.new("L", (pw * ss, ph * ss), 0)
    draw = ImageDraw.Draw(fill_mask)
    if outline is None:
        outline = bool(rng.random() < 0.3)
    line_w = int(rng.integers(1, 3)) * ss
    if label == "circle":
        r = size / 2.0 * ss
        box = [lx - r, ly - r, lx + r, ly + r]
        draw.ellipse(box, fill=255)
    else:
        pts = _shape_points(label, (lx, ly), size * ss, rng, angle)
        poly = [tuple(p) for p in pts]
        draw.polygon(poly, fill=255)
    alpha = np.asarray(fill_mask.reduce(ss), dtype=np.float32) / 255.0

    patch = image[y0:y1, x0:x1].astype(np.float32)
    col = np.asarray(colour, dtype=np.float32)
    # Fill: colour with a faint linear shading and a little noise.
    gy, gx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    g = rng.uniform(-1, 1, size=2).astype(np.float32) * float(rng.uniform(0, 18)) / max(size, 1.0)
    shade = (gx - (cx - x0)) * g[0] + (gy - (cy - y0)) * g[1]
    fill = col[None, None, :] + shade[:, :, None]
    fill += rng.standard_normal(size=fill.shape, dtype=np.float32) * float(rng.uniform(0, 8))
    patch = patch * (1.0 - alpha[:, :, None]) + fill * alpha[:, :, None]

    if outline:
        line_mask = Image.new("L", (pw * ss, ph * ss), 0)
        ld = ImageDraw.Draw(line_mask)
        if label == "circle":
            ld.ellipse(box, outline=255, width=line_w)
        else:
            ld.line(poly + [poly[0]], fill=255, width=line_w, joint="curve")
        la = np.asarray(line_mask.reduce(ss), dtype=np.float32) / 255.0 * alpha
        line_col = col * 0.45 if col.mean() > 110 else col * 0.5 + 127.0
        patch = patch * (1.0 - la[:, :, None]) + line_col[None, None, :] * la[:, :, None]

    image[y0:y1, x0:x1] = np.clip(patch, 0, 255).astype(np.uint8)
    return image


def random_colour(
    rng: np.random.Generator, background_mean=None, min_contrast: float = _MIN_CONTRAST
) -> tuple[int, int, int]:
    """A random RGB colour at least ``min_contrast`` (RGB distance) from ``background_mean``."""
    bg = None if background_mean is None else np.asarray(background_mean, dtype=np.float64)
    for _ in range(64):
        c = rng.integers(0, 256, size=3)
        if rng.random() < 0.3:  # sometimes grey-ish / dark / light
            c = np.full(3, rng.integers(0, 256)) + rng.integers(-25, 26, size=3)
            c = np.clip(c, 0, 255)
        if bg is None:
            return tuple(int(v) for v in c)
        d = float(np.linalg.norm(c - bg))
        if d >= min_contrast:
            return tuple(int(v) for v in c)
    # Fallback: push away from the background towards the opposite corner of the cube.
    c = np.where(bg > 127, 0, 255)
    return tuple(int(v) for v in c)


def _local_mean(image: np.ndarray, center, size: float) -> np.ndarray:
    h, w = image.shape[:2]
    half = size / 2.0
    x0, y0 = max(0, int(center[0] - half)), max(0, int(center[1] - half))
    x1, y1 = min(w, int(center[0] + half) + 1), min(h, int(center[1] + half) + 1)
    if x1 <= x0 or y1 <= y0:
        return image.reshape(-1, 3).mean(axis=0)
    return image[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)


def _draw_object(image: np.ndarray, label: str, center, size: float, rng) -> tuple[int, int, int]:
    colour = random_colour(rng, _local_mean(image, center, size))
    draw_shape(image, label, center, size, colour, rng)
    return colour


def _draw_clutter(image: np.ndarray, rng, n_items: int, max_dot: float) -> None:
    """Distractors much smaller/thinner than objects: thin lines, small dots, tiny shapes."""
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    tiny = []
    for _ in range(n_items):
        kind = rng.random()
        col = random_colour(rng, None)
        if kind < 0.4:  # thin line / scratch
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            length = rng.uniform(8, 60)
            a = rng.uniform(0, 2 * math.pi)
            draw.line(
                [(x, y), (x + length * math.cos(a), y + length * math.sin(a))],
                fill=col,
                width=int(rng.integers(1, 3)),
            )
        elif kind < 0.8:  # small dot
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(1.0, max(1.5, max_dot / 2))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
        else:  # tiny shape (far smaller than any object)
            tiny.append(
                (
                    OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))],
                    (rng.uniform(0, w), rng.uniform(0, h)),
                    rng.uniform(4, max_dot),
                    col,
                )
            )
    image[...] = np.asarray(pil)
    for label, c, s, col in tiny:
        draw_shape(image, label, c, s, col, rng, outline=False)


# --------------------------------------------------------------------------------------
# Training crops
# --------------------------------------------------------------------------------------
def make_crop(label: str, size: int = WINDOW, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """One training crop, uint8 (size, size, 3), of class ``label``.

    Shape labels: one object of that class near the centre (offset up to +-12 % of the
    window, bbox 35-75 % of the window), contrasting with its local background, sometimes
    with small clutter or a neighbour mostly outside the window.
    ``"background"``: bare texture, texture with shapes clearly off-centre (>= 30 % of the
    window) or only partly inside, or clutter of thin lines, dots and tiny shapes.
    """
    rng = np.random.default_rng(rng)
    if label not in SHAPE_CLASSES:
        raise ValueError(f"label must be one of {SHAPE_CLASSES}, got {label!r}")
    img = textured_background(size, size, rng)
    mid = (size - 1) / 2.0
    max_dot = 0.18 * size

    if label != "background":
        if rng.random() < 0.25:
            _draw_clutter(img, rng, int(rng.integers(1, 5)), max_dot)
        if rng.random() < 0.1:  # a neighbour whose centre is well outside the window
            s = rng.uniform(*_POS_SIZE) * size
            ang = rng.uniform(0, 2 * math.pi)
            dist = rng.uniform(0.5 * size + s / 2 - 0.2 * s, 0.5 * size + s / 2)
            c = (mid + dist * math.cos(ang), mid + dist * math.sin(ang))
            _draw_object(img, OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))], c, s, rng)
        s = rng.uniform(*_POS_SIZE) * size
        c = mid + rng.uniform(-_POS_JITTER, _POS_JITTER, size=2) * size
        _draw_object(img, label, c, s, rng)
        return img

    kind = rng.random()
    if kind < 0.3:
        return img  # bare texture
    if kind < 0.75:
        # One or two shapes clearly off-centre or only partly inside the window.
        for _ in range(1 if rng.random() < 0.75 else 2):
            s = rng.uniform(0.3, 0.8) * size
            while True:
                off = rng.uniform(-(0.5 * size + 0.35 * s), 0.5 * size + 0.35 * s, size=2)
                if np.abs(off).max() >= _NEG_MIN_OFFSET * size:
                    break
            _draw_object(img, OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))], mid + off, s, rng)
        if rng.random() < 0.3:
            _draw_clutter(img, rng, int(rng.integers(1, 5)), max_dot)
        return img
    _draw_clutter(img, rng, int(rng.integers(2, 12)), max_dot)
    return img


# --------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------
def generate_scene(
    width: int,
    height: int,
    *,
    n_objects: int = 6,
    object_size: tuple[int, int] = (24, 44),
    seed: int | None = None,
    labels: Sequence[str] | None = None,
    clutter: bool = True,
    margin: int = 32,
    min_distance: float = 1.5 * WINDOW,
) -> tuple[np.ndarray, list[SceneObject]]:
    """A large textured scene with ``n_objects`` shapes at known places.

    Objects get random classes (or ``labels[i % len(labels)]`` when given), a random
    bbox side in ``object_size`` (inclusive, px), positions with every bbox at least
    ``margin`` px inside the image and centres at least ``min_distance`` px apart (1.5
    windows by default, so score-map peaks are separable).  With ``clutter`` a few small
    distractors (thin lines, dots, tiny shapes) are drawn under the objects.
    Returns ``(image uint8 (height, width, 3), objects)``.  Raises ``ValueError`` when the
    objects cannot be placed.
    """
    rng = np.random.default_rng(seed)
    width, height = int(width), int(height)
    lo, hi = int(object_size[0]), int(object_size[1])
    if not 0 < lo <= hi:
        raise ValueError(f"bad object_size {object_size!r}")
    if labels is not None:
        labels = list(labels)
        bad = [lb for lb in labels if lb not in OBJECT_CLASSES]
        if bad or not labels:
            raise ValueError(f"labels must be non-empty and from {OBJECT_CLASSES}, got {labels!r}")

    image = textured_background(height, width, rng)
    if clutter:
        _draw_clutter(image, rng, max(1, int(width * height / 40000)), 0.18 * WINDOW)

    objects: list[SceneObject] = []
    centres: list[tuple[int, int]] = []
    for i in range(int(n_objects)):
        label = labels[i % len(labels)] if labels else OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))]
        size = int(rng.integers(lo, hi + 1))
        half = size // 2
        xmin, xmax = margin + half, width - margin - (size - half)
        ymin, ymax = margin + half, height - margin - (size - half)
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"a {size}px object with a {margin}px margin does not fit in {width}x{height}")
        for _ in range(2000):
            x, y = int(rng.integers(xmin, xmax + 1)), int(rng.integers(ymin, ymax + 1))
            if all((x - px) ** 2 + (y - py) ** 2 >= min_distance**2 for px, py in centres):
                break
        else:
            raise ValueError(
                f"could not place {n_objects} objects {min_distance:.0f}px apart in {width}x{height}"
                f" (placed {len(objects)})"
            )
        colour = _draw_object(image, label, (x, y), size, rng)
        centres.append((x, y))
        objects.append(SceneObject(label=label, center=(x, y), size=size, colour=colour))
    return image, objects
