"""Direct mode at finer strides (a trous) against direct at the native stride and tiled mode
at the same strides: inference seconds and cells per second (printed, not asserted).

    python -m bench.bench_direct_stride --side 448 --tiled-max-windows 400

Bundled model (stride 16) and VGG16 (random weights, stride 32), one run, one image of
``side`` x ``side`` random pixels. Each figure is the best of ``--repeats`` runs after one
warm-up (which also builds the a trous network). Tiled mode runs only where its window count
is at most ``--tiled-max-windows`` (VGG16 at stride 8 is ~4x its stride-16 work).
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np

from worker.inference.direct import direct_inference
from worker.inference.fcn import to_fully_convolutional
from worker.inference.preprocess import get_preprocess
from worker.inference.tiled import tiled_inference, window_origins


def best_seconds(run, repeats: int) -> tuple[float, object]:
    result = run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_model(name, model, preprocess, image, args) -> list[dict]:
    fcn = to_fully_convolutional(model)
    native = fcn.stride[0]
    window = fcn.window
    rows = []
    for factor in (1, 2, 4):
        stride = native // factor
        net = fcn.at_factor(factor)
        seconds, grid = best_seconds(lambda net=net: direct_inference(net, image, preprocess), args.repeats)
        cells = grid.scores.shape[0] * grid.scores.shape[1]
        rows.append({"model": name, "mode": "direct", "stride": stride, "cells": cells, "s": seconds})
        windows = len(window_origins(image.shape[0], window[0], stride)) * len(
            window_origins(image.shape[1], window[1], stride)
        )
        if windows <= args.tiled_max_windows:
            seconds, grid = best_seconds(
                lambda stride=stride: tiled_inference(model, image, preprocess, window=window, stride=stride),
                args.repeats,
            )
            rows.append({"model": name, "mode": "tiled", "stride": stride, "cells": windows, "s": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=448, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tiled-max-windows", type=int, default=400)
    args = parser.parse_args()
    image = np.random.default_rng(0).integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)
    keras.utils.set_random_seed(0)
    models = [
        ("shapes", keras.models.load_model("models/shapes.keras", compile=False), get_preprocess("tf")),
        ("vgg16", keras.applications.VGG16(weights=None), get_preprocess("caffe")),
    ]
    rows = []
    for name, model, preprocess in models:
        rows += bench_model(name, model, preprocess, image, args)
    print(f"image {args.side}x{args.side}, backend {keras.backend.backend()}, best of {args.repeats} after a warm-up")
    print(f"{'model':8} {'mode':7} {'stride':>6} {'cells':>7} {'seconds':>8} {'cells/s':>9} {'vs direct native':>17}")
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["mode"] == "direct" and r["cells"])
        tiled_peer = next(
            (r for r in rows if r is not row and r["model"] == row["model"] and r["stride"] == row["stride"]), None
        )
        note = f"{row['s'] / base['s']:.2f}x"
        if row["mode"] == "direct" and tiled_peer is not None:
            note += f"  (tiled/direct {tiled_peer['s'] / row['s']:.1f}x)"
        print(
            f"{row['model']:8} {row['mode']:7} {row['stride']:>6} {row['cells']:>7} {row['s']:>8.3f} "
            f"{row['cells'] / row['s']:>9.0f} {note:>17}"
        )


if __name__ == "__main__":
    main()
