"""The model catalogue: what models exist, their classes, input size and preprocessing.

Read from sidecar JSON files only, so that the API can validate a submission (model name,
class names) and list models without TensorFlow. A model is ``<name>.json`` plus, for a
user model, ``<name>.keras`` (or ``.h5``) beside it. The sidecar holds::

    {"classes": ["cat", "dog"], "preprocess": "none|tf|caffe|torch",
     "input_size": [h, w]   # optional for .keras files: read from the file's config
     "background_classes": ["background"]   # optional: classes that mean "nothing here"
     "description": "..."}  # optional

Background classes are what a model says where none of its objects are: a job's default
top-k skips them, regions.geojson leaves them out and the viewer opens on another class,
unless the job names them in ``classes`` (issue 19: the bundled model's first view was a
yellow wash of ``background``).

A model file without a sidecar, or a sidecar that disagrees with its ``.keras`` file (class
count against the head's units, input size against the input layer) is not offered: it is
listed under ``problems`` with the reason, and a job naming it is refused at submission
(``model_unavailable``) instead of failing in the worker.

Built-in entries (``models/`` in the repository) may instead name a ``kind`` that the
worker knows how to build (``keras_applications_vgg16``).

Whether a listed model can run here (``model_status``) is decided here too, from files only:
the API refuses a job for a model whose weights are absent instead of accepting a job that
would fail, and the worker resolves the VGG16 weights with the same function, so the two
can never disagree about where the file is looked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.exceptions import InputError

log = logging.getLogger("heatmaps.catalog")

PREPROCESS_MODES = ("none", "tf", "caffe", "torch")
BUILTIN_KINDS = ("keras_applications_vgg16",)
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


VGG16_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
VGG16_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5"
)


class CatalogError(InputError):
    """Unknown model or class, or an invalid sidecar."""


class ModelUnavailableError(RuntimeError):
    """A known model cannot be loaded on this machine (e.g. weights missing)."""

    code = "model_unavailable"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "keras_file" or one of BUILTIN_KINDS
    path: Path | None  # the model file (keras_file)
    classes: tuple[str, ...]
    preprocess: str
    input_size: tuple[int, int]
    output_stride: int | None
    description: str
    background_classes: tuple[str, ...] = ()
    # A layer of the trunk that sees the whole image (squeeze-excitation), read from the
    # model file without Keras: direct mode is refused at submission (None: none found).
    global_context: str | None = None

    def public(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "num_classes": len(self.classes),
            "background_classes": list(self.background_classes),
            "input_size": {"height": self.input_size[0], "width": self.input_size[1]},
            "output_stride": self.output_stride,
            "preprocess": self.preprocess,
            "description": self.description,
        }

    def background_indices(self) -> tuple[int, ...]:
        """Output indices of the background classes (skipped by default top-k)."""
        return tuple(self.classes.index(name) for name in self.background_classes)

    def classes_hint(self, shown: int = 20) -> str:
        """The model's classes for an error message (the first `shown` of a long list)."""
        names = ", ".join(self.classes[:shown])
        more = f" and {len(self.classes) - shown} more (GET /api/v1/models)" if len(self.classes) > shown else ""
        return f"its classes: {names}{more}"

    def class_indices(self, wanted: Sequence[str | int]) -> list[int]:
        """Model output indices for class names or indices; raises CatalogError("unknown_class")."""
        index = {name: i for i, name in enumerate(self.classes)}
        out: list[int] = []
        seen: set[int] = set()  # a set: a long list must not cost quadratic time
        for item in wanted:
            if isinstance(item, int) or (isinstance(item, str) and item.strip().isdecimal()):
                value = int(item)
                if not 0 <= value < len(self.classes):
                    raise CatalogError(
                        "unknown_class", f"class index {value} is out of range 0..{len(self.classes) - 1}"
                    )
            else:
                name = str(item).strip()
                if name not in index:
                    raise CatalogError(
                        "unknown_class", f"model {self.name!r} has no class {name[:60]!r}; {self.classes_hint()}"
                    )
                value = index[name]
            if value not in seen:
                seen.add(value)
                out.append(value)
        if not out:
            raise CatalogError("unknown_class", "no classes given")
        return out


def _keras_config(path: Path) -> dict | None:
    """A .keras archive's config.json (None when the file is not a readable archive)."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _input_size_from_config(config: dict) -> tuple[int, int] | None:
    """The first input layer's (h, w) from a .keras config, without Keras."""
    stack = [config]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            shape = node.get("batch_shape") or node.get("batch_input_shape")
            if isinstance(shape, list) and len(shape) == 4 and all(isinstance(v, int) for v in shape[1:3]):
                return (shape[1], shape[2])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


_GLOBAL_POOLINGS = ("GlobalAveragePooling2D", "GlobalMaxPooling2D")


def global_context_layer(config: dict | None) -> str | None:
    """The first global pooling of a model config when it has more than one: the last one
    ends the trunk (the head's), any earlier one is a squeeze-excitation inside the trunk.
    (A single squeeze-excitation before a Flatten head is not seen here; the worker refuses it.)"""
    found = []
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") in _GLOBAL_POOLINGS and isinstance(node.get("config"), dict):
                found.append(str(node["config"].get("name", "")))
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
    return found[0] if len(found) > 1 else None


def _output_units_from_config(config: dict) -> int | None:
    """How many scores the model's head gives (the output Dense layer's units), or None when
    the config does not say plainly (another head; the worker checks those when it loads)."""
    body = config.get("config") if isinstance(config.get("config"), dict) else {}
    layers = body.get("layers")
    if not isinstance(layers, list) or not layers:
        return None
    last = layers[-1]
    outputs = body.get("output_layers")
    if isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], list) and outputs[0]:
        named = [layer for layer in layers if isinstance(layer, dict) and layer.get("name") == outputs[0][0]]
        last = named[0] if named else None
    if not isinstance(last, dict) or last.get("class_name") != "Dense":
        return None
    units = (last.get("config") or {}).get("units")
    return units if isinstance(units, int) else None


def _check_against_file(sidecar: Path, classes: list, size, config: dict | None) -> None:
    """Refuse a sidecar that disagrees with its .keras file (issue 19: a 5-class sidecar on
    a 3-output model was listed as available and failed in the worker)."""
    if config is None:
        return
    units = _output_units_from_config(config)
    if units is not None and units != len(classes):
        raise CatalogError(
            "invalid_model",
            f"{sidecar.name}: lists {len(classes)} classes but the model's head has {units} outputs; "
            f"give one class name per output",
        )
    actual = _input_size_from_config(config)
    if size is not None and actual is not None and tuple(size) != actual:
        raise CatalogError(
            "invalid_model",
            f"{sidecar.name}: input_size {list(size)} differs from the model's input {list(actual)}; "
            "drop input_size (it is read from the .keras file) or correct it",
        )


def _background_classes(sidecar: Path, meta: dict, classes: list) -> tuple[str, ...]:
    names = meta.get("background_classes", [])
    if not isinstance(names, list) or not all(isinstance(name, str) and name in classes for name in names):
        raise CatalogError("invalid_model", f"{sidecar.name}: 'background_classes' must list names from 'classes'")
    if len(set(names)) >= len(classes):
        raise CatalogError("invalid_model", f"{sidecar.name}: 'background_classes' must leave at least one class")
    return tuple(dict.fromkeys(names))


def load_sidecar(sidecar: Path) -> ModelInfo:
    name = sidecar.stem
    if not MODEL_NAME_RE.match(name):
        raise CatalogError("invalid_model", f"model name {name!r} is not allowed")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc  # an OSError's text names the full path
        raise CatalogError("invalid_model", f"{sidecar.name}: unreadable sidecar ({reason})") from exc
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise CatalogError("invalid_model", f"{sidecar.name}: 'classes' must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise CatalogError("invalid_model", f"{sidecar.name}: class names must be unique")
    preprocess = meta.get("preprocess")
    if preprocess not in PREPROCESS_MODES:
        choices = ", ".join(PREPROCESS_MODES)
        raise CatalogError("invalid_model", f"{sidecar.name}: 'preprocess' must be one of {choices}")
    kind = meta.get("kind", "keras_file")
    path = None
    if kind == "keras_file":
        path = next((p for p in (sidecar.with_suffix(".keras"), sidecar.with_suffix(".h5")) if p.exists()), None)
        if path is None:
            raise CatalogError("invalid_model", f"{sidecar.name}: no {name}.keras or {name}.h5 beside it")
    elif kind not in BUILTIN_KINDS:
        raise CatalogError("invalid_model", f"{sidecar.name}: unknown kind {kind!r}")
    size = meta.get("input_size")
    config = _keras_config(path) if path is not None and path.suffix == ".keras" else None
    _check_against_file(sidecar, classes, size, config)
    if size is None and config is not None:
        size = _input_size_from_config(config)
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise CatalogError("invalid_model", f"{sidecar.name}: 'input_size' [h, w] is required for this model")
    return ModelInfo(
        name=name,
        kind=kind,
        path=path,
        classes=tuple(classes),
        preprocess=preprocess,
        input_size=(int(size[0]), int(size[1])),
        output_stride=meta.get("output_stride"),
        description=str(meta.get("description", "")),
        background_classes=_background_classes(sidecar, meta, classes),
        global_context=global_context_layer(config),
    )


def keras_cache_dir() -> Path:
    """Keras' own cache folder (``KERAS_HOME``, else ``~/.keras``) + ``models``, as Keras
    computes it, without importing Keras."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _vgg16_candidates(explicit: Path | None) -> list[Path]:
    candidates = [Path(explicit)] if explicit else []
    candidates.append(keras_cache_dir() / VGG16_WEIGHTS_FILE)
    return candidates


def find_vgg16_weights(explicit: Path | None) -> Path | None:
    """The VGG16 ImageNet weights file (the configured path, else Keras' cache), or None."""
    return next((candidate for candidate in _vgg16_candidates(explicit) if candidate.is_file()), None)


def resolve_vgg16_weights(explicit: Path | None) -> Path:
    """Like `find_vgg16_weights`, but raises `ModelUnavailableError` saying where to put the
    file (with the paths looked at: for the worker's log and the local CLI, not the API)."""
    found = find_vgg16_weights(explicit)
    if found is not None:
        return found
    candidates = _vgg16_candidates(explicit)
    raise ModelUnavailableError(
        "VGG16 ImageNet weights are not available on this machine (it cannot download them). "
        f"Fetch {VGG16_WEIGHTS_URL} (528 MB) elsewhere and either put it at "
        f"{keras_cache_dir() / VGG16_WEIGHTS_FILE} or set VGG16_WEIGHTS=/path/to/{VGG16_WEIGHTS_FILE}. "
        f"Looked in: {', '.join(str(c) for c in candidates)}"
    )


def unavailable_reason(info: ModelInfo, vgg16_weights: Path | None) -> str | None:
    """Why `info` cannot run here (None when it can): a file check, no Keras. The reason
    names no server path (the API shows it to clients)."""
    if info.kind == "keras_applications_vgg16" and find_vgg16_weights(vgg16_weights) is None:
        return (
            f"VGG16 ImageNet weights are absent: fetch {VGG16_WEIGHTS_FILE} (528 MB) from {VGG16_WEIGHTS_URL} "
            "and set VGG16_WEIGHTS to its path or put it in Keras' cache (~/.keras/models)"
        )
    if info.kind == "keras_file" and (info.path is None or not info.path.is_file()):
        return f"the model file of {info.name!r} is gone from the model folder"
    return None


def model_status(info: ModelInfo, vgg16_weights: Path | None) -> dict:
    """`ModelInfo.public()` plus ``available`` and, when not, ``reason``."""
    reason = unavailable_reason(info, vgg16_weights)
    status = {**info.public(), "available": reason is None}
    if reason is not None:
        status["reason"] = reason
    return status


def require_available(info: ModelInfo, vgg16_weights: Path | None) -> None:
    """Raise CatalogError("model_unavailable") (a 400 in the API) for a model that cannot run."""
    reason = unavailable_reason(info, vgg16_weights)
    if reason is not None:
        raise CatalogError("model_unavailable", f"model {info.name!r} cannot run here: {reason}")


_reported: set[tuple[str, str]] = set()


def _report_once(sidecar: Path, message: str) -> None:
    """Log a broken sidecar once per process (the API rescans every few seconds)."""
    if (str(sidecar), message) not in _reported:
        _reported.add((str(sidecar), message))
        log.warning("model sidecar %s ignored: %s", sidecar, message)


def catalog_fingerprint(folders: Iterable[Path]) -> tuple:
    """What a catalogue scan depends on: each folder's and each model file's identity and
    modification time. The API and every worker rescan when it changes, so that both sides
    see the same models (issue 11: a model added while the stack ran was accepted by the
    API and unknown to the worker). A few `stat` calls: cheap enough for every request."""
    marks = []
    for folder in folders:
        folder = Path(folder)
        try:
            marks.append((str(folder), folder.stat().st_mtime_ns))
            for path in sorted(folder.iterdir()):
                if path.suffix in (".json", ".keras", ".h5"):
                    stat = path.stat()
                    marks.append((path.name, stat.st_mtime_ns, stat.st_size))
        except OSError:  # absent or unreadable folder, or a file removed while listing
            marks.append((str(folder), None))
    return tuple(marks)


class ModelCatalog:
    """Models found in the given folders; the first folder wins on a name clash."""

    def __init__(self, folders: Iterable[Path]):
        self.models: dict[str, ModelInfo] = {}
        self.problems: dict[str, str] = {}
        for folder in folders:
            folder = Path(folder)
            if not folder.is_dir():
                continue
            for sidecar in sorted(folder.glob("*.json")):
                if sidecar.stem in self.models:
                    continue
                try:
                    self.models[sidecar.stem] = load_sidecar(sidecar)
                except CatalogError as exc:
                    self.problems[sidecar.name] = exc.message
                    _report_once(sidecar, exc.message)
            self._find_orphans(folder)

    def _find_orphans(self, folder: Path) -> None:
        """Model files without a sidecar: listed as problems (they used to be silently absent)."""
        for path in sorted([*folder.glob("*.keras"), *folder.glob("*.h5")]):
            if path.stem in self.models or path.with_suffix(".json").exists():
                continue
            message = (
                f"{path.name}: no sidecar {path.stem}.json beside it; write one naming its classes "
                '(one per output) and preprocessing, e.g. {"classes": ["a", "b"], "preprocess": "tf"}'
            )
            self.problems.setdefault(path.name, message)
            _report_once(path, message)

    def names(self) -> list[str]:
        return sorted(self.models)

    def problem_of(self, name: str) -> str | None:
        """Why a model file or sidecar called `name` was not taken into the catalogue."""
        return next(
            (self.problems[f] for f in (f"{name}.json", f"{name}.keras", f"{name}.h5") if f in self.problems), None
        )

    def get(self, name: str) -> ModelInfo:
        info = self.models.get(name)
        problem = self.problem_of(name) if info is None and isinstance(name, str) else None
        if problem is not None:
            raise CatalogError("model_unavailable", f"model {name!r} cannot be used: {problem}")
        if info is None:
            raise CatalogError("unknown_model", f"unknown model {name!r}; available: {', '.join(self.names())}")
        return info
