"""How readable the overlays of `make demo`'s scene are, per blending (printed, not asserted).

    python -m bench.bench_overlays [--width 4096 --height 3072] [--max-side 1024]

The demo's scene (shapes.scenes.generate_scene, ten shapes, seed 2026) through the bundled
model in direct mode, then for each blending the heat that the overlays draw (each class
scaled to its own range, worker.outputs.blend.class_heat) at the overlay's size, and per object of
its own class: the mean heat inside the object's box, the mean far (more than two windows)
from every object, and the area at or above half the range near the object. The first row
is the overlay before the readable overlays (mean blending drawn on an absolute 0..1 scale).
tests/test_overlays.py asserts the same measure, with margins, on a half-size scene.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from shapes.scenes import generate_scene
from shared.jobspec import WEIGHTINGS, JobParams
from shared.settings import BUNDLED_MODELS_DIR
from worker.engine import compute_grid
from worker.inference.model_registry import ModelRegistry
from worker.outputs.artifacts import overlay_size
from worker.outputs.blend import blend, class_heat

CLASSES = ("circle", "square", "triangle", "cross")


def measure(values, objects, size, scale, window) -> tuple[float, float, float]:
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    far = np.ones(size, bool)
    for obj in objects:
        far &= np.hypot((xx + 0.5) / scale - obj.center[0], (yy + 0.5) / scale - obj.center[1]) > 2 * window
    inside, background, area = [], [], []
    for obj in objects:
        channel = CLASSES.index(obj.label)
        x0, y0, x1, y1 = (int(round(v * scale)) for v in obj.bbox)
        inside.append(values[y0:y1, x0:x1, channel].mean())
        background.append(values[:, :, channel][far].mean())
        near = np.hypot(xx - obj.center[0] * scale, yy - obj.center[1] * scale) < window * scale
        area.append((values[:, :, channel][near] >= 0.5).sum())
    return float(min(inside)), float(max(background)), float(np.median(area))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--height", type=int, default=3072)
    parser.add_argument("--max-side", type=int, default=1024)
    args = parser.parse_args()
    image, objects = generate_scene(args.width, args.height, n_objects=10, seed=2026)
    loaded = ModelRegistry([BUNDLED_MODELS_DIR]).load("shapes")
    started = time.perf_counter()
    params = JobParams(model="shapes", mode="direct", top_k=None, class_indices=(1, 2, 3, 4))
    grid = compute_grid(image, params, loaded).select([1, 2, 3, 4])
    print(f"scene {args.width}x{args.height}, direct mode in {time.perf_counter() - started:.1f} s")
    size = overlay_size(args.height, args.width, args.max_side)
    scale = size[1] / args.width
    boxes = sorted(int(round(obj.size * scale)) for obj in objects)
    print(f"overlay {size[1]}x{size[0]} (scale {scale:g}); object boxes there: {boxes[0]}-{boxes[-1]} px")
    print(f"{'blending':<28} {'min in-box heat':>16} {'max far heat':>13} {'hot px/object':>14}  colour bar top")
    before = np.clip(blend(grid, image.shape[:2], size, weighting="mean"), 0.0, 1.0)
    tops = " ".join(f"{v:.2f}" for v in before.max(axis=(0, 1)))
    row = measure(before, objects, size, scale, loaded.window[0])
    print(f"{'mean on 0..1 (before)':<28} {row[0]:>16.3f} {row[1]:>13.4f} {row[2]:>14.0f}  1 (map max {tops})")
    for weighting in WEIGHTINGS:
        heat = class_heat(grid, image.shape[:2], size, weighting=weighting)
        row = measure(heat.values, objects, size, scale, loaded.window[0])
        tops = " ".join(f"{v:.2f}" for v in heat.high)
        print(f"{weighting + ', own range':<28} {row[0]:>16.3f} {row[1]:>13.4f} {row[2]:>14.0f}  {tops}")


if __name__ == "__main__":
    main()
