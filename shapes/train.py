"""Train the small bundled ``shapes`` classifier and write ``models/shapes.keras`` + sidecar.

Why this module exists
----------------------
The service, its tests and its demo must work offline and produce heatmaps that can be
checked against known objects.  This script trains a tiny VGG-like classifier on synthetic
64x64 crops from :mod:`shapes.scenes` (classes: background, circle, square, triangle,
cross), evaluates it on a held-out synthetic set made with a different seed, and saves:

* ``<out>/shapes.keras`` - Keras 3 native format, inference-only (no optimizer state);
* ``<out>/shapes.json``  - sidecar: class names, input size, preprocessing, training stats.

The architecture is deliberately restricted so that the FCN converter handles it exactly:
Conv2D(3x3, same, relu) / MaxPooling2D(2) trunk (no BatchNormalization, no Rescaling),
output stride 16 giving a 4x4x64 map, then Flatten -> Dense(128, relu) -> Dropout ->
Dense(5, softmax).  Preprocessing is the "tf" mode of :mod:`worker.inference.preprocess` and is applied
*outside* the model, by the inference engine (and by :func:`preprocess` here, with the same code).

Only ``keras`` + ``numpy`` are used (no ``tf.*``), so it runs under any Keras backend.
Retrain (a few minutes on a CPU)::

    python -m shapes.train --out models --epochs 6 --samples 30000 --seed 1234
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers

from shapes.scenes import SHAPE_CLASSES, WINDOW, make_crop
from worker.inference.preprocess import get_preprocess

INPUT_SIZE = (WINDOW, WINDOW)
#: Fraction of training crops that are background (the rest is split evenly).
BACKGROUND_FRACTION = 1 / 3
#: Offset added to the training seed to obtain the held-out set's seed.
HELDOUT_SEED_OFFSET = 1_000_003

DEFAULTS = {"epochs": 6, "samples": 30000, "seed": 1234, "heldout": 2000, "batch_size": 64}


#: The model's preprocessing mode, written to the sidecar; the engine applies it at inference.
PREPROCESS = "tf"


def preprocess(x: np.ndarray) -> np.ndarray:
    """The model's preprocessing (``worker.inference.preprocess``'s "tf" mode): uint8 RGB -> float32 in [-1, 1]."""
    return get_preprocess(PREPROCESS)(np.asarray(x))


def build_model() -> keras.Model:
    """The shapes classifier: VGG-like conv trunk (stride 16) + Flatten/Dense head."""
    h, w = INPUT_SIZE
    conv = dict(kernel_size=3, padding="same", activation="relu")
    return keras.Sequential(
        [
            keras.Input(shape=(h, w, 3), name="image"),
            layers.Conv2D(16, name="block1_conv1", **conv),
            layers.MaxPooling2D(2, name="block1_pool"),
            layers.Conv2D(32, name="block2_conv1", **conv),
            layers.Conv2D(32, name="block2_conv2", **conv),
            layers.MaxPooling2D(2, name="block2_pool"),
            layers.Conv2D(64, name="block3_conv1", **conv),
            layers.Conv2D(64, name="block3_conv2", **conv),
            layers.MaxPooling2D(2, name="block3_pool"),
            layers.Conv2D(64, name="block4_conv1", **conv),
            layers.MaxPooling2D(2, name="block4_pool"),  # -> 4 x 4 x 64
            layers.Flatten(name="flatten"),
            layers.Dense(128, activation="relu", name="fc1"),
            layers.Dropout(0.3, name="dropout"),
            layers.Dense(len(SHAPE_CLASSES), activation="softmax", name="predictions"),
        ],
        name="shapes",
    )


def make_dataset(n: int, seed: int, background_fraction: float = BACKGROUND_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic crops (uint8 N x 64 x 64 x 3) and integer labels, shuffled."""
    rng = np.random.default_rng(seed)
    n_bg = int(round(n * background_fraction))
    n_obj = len(SHAPE_CLASSES) - 1
    counts = [n_bg] + [(n - n_bg) // n_obj + (1 if i < (n - n_bg) % n_obj else 0) for i in range(n_obj)]
    y = np.concatenate([np.full(c, k, dtype=np.int64) for k, c in enumerate(counts)])
    rng.shuffle(y)
    x = np.empty((n, WINDOW, WINDOW, 3), dtype=np.uint8)
    for i, k in enumerate(y):
        x[i] = make_crop(SHAPE_CLASSES[k], WINDOW, rng)
    return x, y


class _CropSequence(keras.utils.PyDataset):
    """Batches of preprocessed crops from a uint8 array, reshuffled every epoch."""

    def __init__(self, x, y, batch_size, seed):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i):
        idx = np.sort(self.order[i * self.batch_size : (i + 1) * self.batch_size])
        xb = self.x[idx]
        if self.rng.random() < 0.5:  # horizontal flip keeps every class (squares tilt both ways)
            xb = xb[:, :, ::-1]
        return preprocess(xb), self.y[idx]

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.x))


def predict(model: keras.Model, x_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities for uint8 crops (preprocessing applied here)."""
    out = []
    for i in range(0, len(x_uint8), batch_size):
        out.append(np.asarray(model(preprocess(x_uint8[i : i + batch_size]), training=False)))
    return np.concatenate(out) if out else np.zeros((0, len(SHAPE_CLASSES)), np.float32)


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict:
    """Overall and per-class accuracy plus the confusion matrix (rows: true class)."""
    pred = predict(model, x).argmax(axis=1)
    k = len(SHAPE_CLASSES)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class = {
        name: float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else float("nan")
        for i, name in enumerate(SHAPE_CLASSES)
    }
    return {"accuracy": float((pred == y).mean()), "per_class": per_class, "confusion": confusion}


def train(out: Path, epochs: int, samples: int, seed: int, heldout: int, batch_size: int) -> dict:
    t_start = time.perf_counter()
    keras.utils.set_random_seed(seed)

    print(f"generating {samples} training crops (seed {seed}) ...", flush=True)
    t0 = time.perf_counter()
    x_train, y_train = make_dataset(samples, seed)
    heldout_seed = seed + HELDOUT_SEED_OFFSET
    x_val, y_val = make_dataset(heldout, heldout_seed, background_fraction=1 / len(SHAPE_CLASSES))
    print(f"  done in {time.perf_counter() - t0:.1f}s", flush=True)

    model = build_model()
    model.summary()
    steps = epochs * math.ceil(samples / batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=steps, warmup_target=None, alpha=0.02)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    t0 = time.perf_counter()
    model.fit(
        _CropSequence(x_train, y_train, batch_size, seed),
        epochs=epochs,
        validation_data=(preprocess(x_val), y_val),
        verbose=2,
    )
    fit_s = time.perf_counter() - t0

    # Save an inference-only copy: same architecture, same weights, no optimizer state.
    final = build_model()
    final.set_weights(model.get_weights())
    res = evaluate(final, x_val, y_val)
    print(f"held-out accuracy ({heldout} crops, seed {heldout_seed}): {res['accuracy']:.4f}")
    for name, acc in res["per_class"].items():
        print(f"  {name:<10s} {acc:.4f}")
    print("confusion (rows = true, cols = predicted):", SHAPE_CLASSES)
    print(res["confusion"])

    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "shapes.keras"
    final.save(model_path)
    sidecar = {
        "name": "shapes",
        "classes": list(SHAPE_CLASSES),
        "preprocess": PREPROCESS,
        "input_size": list(INPUT_SIZE),
        "background_classes": ["background"],  # "no object here": skipped by default top-k
        "description": (
            "Bundled demo/test model: a small VGG-like CNN (output stride 16, Flatten+Dense "
            "head) that says whether a 64x64 window has a circle, square, triangle or cross "
            "roughly centred in it (else background). Trained on synthetic textured crops by "
            "shapes/train.py; scenes with known objects come from shapes/scenes.py."
        ),
        "training": {
            "seed": seed,
            "samples": samples,
            "epochs": epochs,
            "batch_size": batch_size,
            "heldout_accuracy": round(res["accuracy"], 4),
            "heldout_per_class": {k: round(v, 4) for k, v in res["per_class"].items()},
            "heldout_samples": heldout,
            "heldout_seed": heldout_seed,
            "train_seconds": round(fit_s, 1),
            "keras_version": keras.__version__,
            "backend": keras.backend.backend(),
            "command": (f"python -m shapes.train --out {out} --epochs {epochs} --samples {samples} --seed {seed}"),
        },
    }
    (out / "shapes.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    total = time.perf_counter() - t_start
    print(
        f"saved {model_path} ({model_path.stat().st_size / 1e6:.2f} MB, "
        f"{final.count_params()} params) and {out / 'shapes.json'}; "
        f"fit {fit_s:.0f}s, total {total:.0f}s"
    )
    return sidecar


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("models"), help="output folder (default: models)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="training crops")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--heldout", type=int, default=DEFAULTS["heldout"], help="held-out crops")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument(
        "--evaluate",
        type=Path,
        default=None,
        metavar="MODEL",
        help="only measure MODEL (e.g. models/shapes.keras) on the held-out set of --seed",
    )
    a = p.parse_args(argv)
    if a.evaluate is not None:
        evaluate_saved(a.evaluate, a.seed, a.heldout)
        return
    train(a.out, a.epochs, a.samples, a.seed, a.heldout, a.batch_size)


def evaluate_saved(model_path: Path, seed: int, heldout: int) -> dict:
    """Held-out accuracy of a saved model, on the same crops training reported."""
    heldout_seed = seed + HELDOUT_SEED_OFFSET
    x_val, y_val = make_dataset(heldout, heldout_seed, background_fraction=1 / len(SHAPE_CLASSES))
    res = evaluate(keras.models.load_model(model_path, compile=False), x_val, y_val)
    print(f"held-out accuracy ({heldout} crops, seed {heldout_seed}): {res['accuracy']:.4f}")
    for name, acc in res["per_class"].items():
        print(f"  {name:<10s} {acc:.4f}")
    return res


if __name__ == "__main__":
    main()
