"""On-disk cache of loaded classifiers: raw weight arrays a cold worker maps instead of parsing.

A cold start spends its model time in Keras reading the weights (``load_model`` of VGG16's
553 MB: 4-8 s here), not in the conversion to a fully convolutional network (0.5 s with the
'valid' twins; bench/README.md has the figures). So the cache keeps what is slow to get:
the classifier's architecture (its Keras JSON, every initializer replaced by zeros, so that
building it costs no random initialisation) and each weight as an uncompressed ``.npy`` that is
memory-mapped and assigned. The conversion then runs on the loaded model as before.

Key: the sha256 of the source file (the ``.keras``/``.h5`` model, or VGG16's weights file) and
``ENGINE_VERSION``. A changed model file has another hash, so its old entry is never used. The
precision is not in the key: a bfloat16 copy keeps float32 weights under Keras' mixed policy,
so one entry serves every precision. An entry is written to a temporary folder and renamed into
place whole (a crash leaves no half entry), and read defensively: anything missing, unreadable
or of another shape is not trusted; the model is loaded from its file and the entry written anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

#: Bump when the engine changes what an entry holds or how a model is built from it.
ENGINE_VERSION = "21.1"

_ZEROS = {"module": "keras.initializers", "class_name": "Zeros", "config": {}, "registered_name": None}
_log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_dir(cache_dir: Path, source: Path) -> Path:
    """The entry of `source` as it is now (its content's hash and the engine version)."""
    return Path(cache_dir) / f"{file_sha256(source)}-{ENGINE_VERSION}"


def load_through_cache(cache_dir: Path | None, source: Path, build: Callable[[], keras.Model]) -> keras.Model:
    """The classifier from the cache entry of `source`, or ``build()`` (then cached).

    ``build`` loads the model from its file the ordinary way; its errors propagate. A failure
    to write the entry (a full or read-only disk) only costs the next start its speed.
    """
    if cache_dir is None:
        return build()
    entry = entry_dir(cache_dir, source)
    model = _read_entry(entry)
    if model is not None:
        return model
    model = build()
    try:
        _write_entry(entry, model)
    except OSError as exc:
        _log.warning("model cache: cannot write %s: %s", entry.name, exc)
    return model


def _read_entry(entry: Path) -> keras.Model | None:
    """The model in `entry`, or None when it is absent or not to be trusted (it is removed)."""
    manifest_path = entry / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("engine_version") != ENGINE_VERSION:
            raise ValueError("another engine version")
        model = keras.models.model_from_json((entry / "config.json").read_text())
        weights = model.weights
        if len(weights) != len(manifest["shapes"]):
            raise ValueError("weight count differs")
        for index, (variable, shape) in enumerate(zip(weights, manifest["shapes"], strict=True)):
            array = np.load(entry / f"w{index}.npy", mmap_mode="r", allow_pickle=False)
            if tuple(array.shape) != tuple(shape) or tuple(variable.shape) != tuple(shape):
                raise ValueError(f"weight {index} has another shape")
            variable.assign(np.asarray(array))
        return model
    except Exception as exc:  # corrupt, truncated, stale: rebuilt, never trusted
        _log.warning("model cache: entry %s not used (%s); rebuilding it", entry.name, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _write_entry(entry: Path, model: keras.Model) -> None:
    """Write the entry beside its place and rename it in whole."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        config = _zero_initializers(json.loads(model.to_json()))
        (staging / "config.json").write_text(json.dumps(config))
        shapes = []
        for index, variable in enumerate(model.weights):
            array = keras.ops.convert_to_numpy(variable.value)
            np.save(staging / f"w{index}.npy", array, allow_pickle=False)
            shapes.append(list(array.shape))
        manifest = {"engine_version": ENGINE_VERSION, "shapes": shapes, "name": model.name}
        (staging / "manifest.json").write_text(json.dumps(manifest))  # last: an entry without it is unfinished
        try:
            os.replace(staging, entry)
        except OSError:
            if not (entry / "manifest.json").exists():  # another process wrote it first: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _zero_initializers(node):
    """The config with every ``*_initializer`` set to zeros (the weights are assigned after)."""
    if isinstance(node, dict):
        return {
            key: (_ZEROS if key.endswith("_initializer") and isinstance(value, dict) else _zero_initializers(value))
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_zero_initializers(value) for value in node]
    return node
