"""Whole processes, cold and warm (issue 21), timed in one run (printed, not asserted):

    python -m bench.bench_cold_start [--size 2048] [--precision bfloat16] [--rounds 2]

VGG16 with random weights saved as a user model (``.keras`` + sidecar) and a random PNG of
``--size`` squared. Each round runs, as separate processes, one after the other:

1. the seed's recipe: import Keras, load the model file, convert it to a fully convolutional
   network, read the PNG, scale by /255 and ``predict`` the whole image in one pass (float32:
   the seed has no other precision) - ``bench/seed_recipes.py``;
2. ``heatmap infer`` (``python -m client infer``), direct mode, ``--precision``, with the model
   cache emptied first: a cold start (it writes the cache entry);
3. ``heatmap infer`` again: a warm cache.

Printed: each process's wall seconds (best of the rounds) and the engine's own
``model_load_s`` and ``inference_s`` from its ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SEED_PROCESS = """
import sys, time
import numpy as np
from PIL import Image
import keras
from bench.seed_recipes import seed_whole_image_direct
from worker.inference.fcn import to_fully_convolutional
model = keras.models.load_model(sys.argv[1], compile=False)
fcn = to_fully_convolutional(model)
image = np.asarray(Image.open(sys.argv[2]).convert("RGB"))
scores = seed_whole_image_direct(fcn.model, image)
print(scores.shape)
"""


def _prepare(folder: Path, size: int) -> tuple[Path, Path]:
    import keras
    import numpy as np
    from PIL import Image

    keras.utils.set_random_seed(0)
    model = folder / "vgg16_random.keras"
    keras.applications.VGG16(weights=None).save(model)
    sidecar = {"classes": [f"class_{i}" for i in range(1000)], "preprocess": "caffe", "input_size": [224, 224]}
    (folder / "vgg16_random.json").write_text(json.dumps(sidecar))
    image = folder / "image.png"
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image, compress_level=1)
    return model, image


def _timed(cmd: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{result.stderr[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_cold_") as tmp:
        folder = Path(tmp)
        model, image = _prepare(folder, args.size)
        cache = folder / "model-cache"
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", MODEL_CACHE_DIR=str(cache))
        infer = [sys.executable, "-m", "client", "infer", str(image), "--model", str(model), "--mode", "direct"]
        infer += ["--precision", args.precision, "--top-k", "3"]
        rows: dict[str, list] = {"seed": [], "cold": [], "warm": []}
        for round_ in range(args.rounds):
            rows["seed"].append((_timed([sys.executable, "-c", SEED_PROCESS, str(model), str(image)], env), None))
            shutil.rmtree(cache, ignore_errors=True)
            for name in ("cold", "warm"):
                out = folder / f"out-{name}-{round_}"
                seconds = _timed([*infer, "--out", str(out)], env)
                timings = json.loads((out / "summary.json").read_text())["timings"]
                rows[name].append((seconds, timings))
            print(json.dumps({k: [round(v[0], 2) for v in rows[k]] for k in rows}), flush=True)
    seed = min(s for s, _ in rows["seed"])
    head = f"process ({args.size}^2, VGG16 random weights) | wall s (best of {args.rounds})"
    print(f"\n| {head} | model_load_s | inference_s | seed / this |")
    print("|---|---|---|---|---|")
    print(f"| seed recipe (float32, whole image, one predict) | {seed:.1f} | | | 1.00x |")
    for name, label in (("cold", "heatmap infer, empty model cache"), ("warm", "heatmap infer, warm model cache")):
        seconds, timings = min(rows[name], key=lambda r: r[0])
        print(
            f"| {label} ({args.precision}) | {seconds:.1f} | {timings['model_load_s']:.2f} "
            f"| {timings['inference_s']:.1f} | {seed / seconds:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
