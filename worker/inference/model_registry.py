"""Loading classifiers and keeping them warm: one registry per worker process.

Models are found through the catalogue (``shared.catalog``); this module turns a catalogue
entry into a Keras classifier, its fully convolutional form (converted once, lazily) and
its preprocessing function. Each (model, precision) pair is one warm copy: a bfloat16 job
gets its own copy under Keras' mixed policy (``worker.inference.compute_precision``), so float32 jobs
on the same worker stay exact. VGG16's ImageNet weights are never downloaded at run time:
they are resolved from ``VGG16_WEIGHTS`` or Keras' cache (``shared.catalog.resolve_vgg16_weights``,
the same lookup the API uses to say whether the model is available), and a clear error says
how to provide them when absent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from shared.catalog import (  # noqa: F401 (re-exported: the worker's names for them)
    VGG16_WEIGHTS_FILE,
    CatalogError,
    ModelCatalog,
    ModelInfo,
    ModelUnavailableError,
    catalog_fingerprint,
    load_sidecar,
    resolve_vgg16_weights,
)
from shared.jobspec import direct_stride_factor
from worker.inference.compute_precision import apply_precision, compute_device, precision_problem
from worker.inference.fcn import FullyConvolutional, to_fully_convolutional
from worker.inference.model_cache import load_through_cache
from worker.inference.preprocess import get_preprocess


class PrecisionUnavailableError(ModelUnavailableError):
    """The job's precision cannot run on this worker (float16 without a GPU); the job fails
    with this code. The API cannot refuse it: it does not know which worker runs the job."""

    code = "precision_unavailable"


@dataclass
class LoadedModel:
    info: ModelInfo
    classifier: keras.Model
    preprocess: Callable[[np.ndarray], np.ndarray]
    precision: str = "float32"
    _fcn: FullyConvolutional | None = field(default=None, repr=False)
    _finer: dict = field(default_factory=dict, repr=False)  # a trous factor -> FullyConvolutional
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def device(self) -> dict:
        """The device this copy computes on (backend, cpu/gpu, name), for summary.json."""
        return compute_device()

    @property
    def window(self) -> tuple[int, int]:
        return self.info.input_size

    @property
    def fcn(self) -> FullyConvolutional:
        with self._lock:
            if self._fcn is None:
                self._fcn = to_fully_convolutional(self.classifier, input_size=self.info.input_size)
            return self._fcn

    def fcn_at(self, stride: int | None) -> FullyConvolutional:
        """The converted network at output stride `stride` (None: its native stride); a finer
        one is the a trous conversion, built once per stride and kept with the model."""
        native = self.fcn
        if stride is None or (stride, stride) == native.stride:
            return native
        factor = direct_stride_factor(native.stride, stride)
        with self._lock:
            fine = self._finer.get(factor)
            if fine is None:
                fine = self._finer[factor] = native.at_factor(factor)
            return fine


def build_classifier(info: ModelInfo, vgg16_weights: Path | None = None, cache_dir: Path | None = None) -> keras.Model:
    """The classifier of a catalogue entry, through the disk cache (``worker.inference.model_cache``)
    when `cache_dir` is given."""
    if info.kind == "keras_applications_vgg16":
        weights = resolve_vgg16_weights(vgg16_weights)
        return load_through_cache(
            cache_dir,
            Path(weights),
            lambda: keras.applications.VGG16(weights=str(weights), input_shape=(*info.input_size, 3)),
        )
    try:
        model = load_through_cache(
            cache_dir, Path(info.path), lambda: keras.models.load_model(info.path, compile=False)
        )
    except Exception as exc:  # a broken user file must not take the worker down
        raise ModelUnavailableError(f"cannot load model file {info.path}: {exc}") from exc
    outputs = int(model.output_shape[-1])
    if outputs != len(info.classes):
        raise ModelUnavailableError(
            f"model {info.name!r} has {outputs} outputs but its sidecar lists {len(info.classes)} classes"
        )
    return model


class ModelRegistry:
    """Loads each (model, precision) once per process and keeps it.

    ``default_precision`` (the worker's ``WORKER_PRECISION``) applies to jobs that name none;
    ``cache_dir`` (``MODEL_CACHE_DIR``) holds the disk cache of loaded models.
    """

    def __init__(
        self,
        folders,
        vgg16_weights: Path | None = None,
        default_precision: str = "float32",
        cache_dir: Path | None = None,
    ):
        self.folders = list(folders)
        self.cache_dir = cache_dir  # converted-model disk cache (None: none), worker.inference.model_cache
        self._fingerprint = catalog_fingerprint(self.folders)
        self.catalog = ModelCatalog(self.folders)
        self.vgg16_weights = vgg16_weights
        self.default_precision = default_precision
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._lock = threading.Lock()

    def rescan_if_changed(self) -> None:
        """Re-read the catalogue when the model folders changed since the last scan, as
        the API does: a model added while the worker runs is found, a removed one is not."""
        fingerprint = catalog_fingerprint(self.folders)
        if fingerprint != self._fingerprint:
            self.catalog, self._fingerprint = ModelCatalog(self.folders), fingerprint

    def info(self, name_or_path: str) -> ModelInfo:
        """A catalogue name, or (for the CLI) a path to a .keras/.h5 file with its sidecar."""
        self.rescan_if_changed()
        if name_or_path in self.catalog.models:
            return self.catalog.get(name_or_path)
        path = Path(name_or_path)
        if path.suffix in (".keras", ".h5") and path.exists():
            sidecar = path.with_suffix(".json")
            if not sidecar.exists():
                raise CatalogError(
                    "invalid_model", f"{path}: needs a sidecar {sidecar.name} with classes and preprocess"
                )
            return load_sidecar(sidecar)
        return self.catalog.get(name_or_path)  # raises unknown_model

    def load(self, name_or_path: str, precision: str | None = None) -> LoadedModel:
        """The warm copy of a model in `precision` (None: the registry's default).

        Raises PrecisionUnavailableError (a ModelUnavailableError, code
        ``precision_unavailable``) for float16 on a worker without a GPU.
        """
        precision = precision or self.default_precision
        problem = precision_problem(precision)
        if problem is not None:
            raise PrecisionUnavailableError(problem)
        info = self.info(name_or_path)
        key = str(info.path or info.name)
        if info.path is not None and info.path.exists():  # a replaced model file is loaded anew
            key = f"{key}@{info.path.stat().st_mtime_ns}"
        key = (key, precision)
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                classifier = apply_precision(build_classifier(info, self.vgg16_weights, self.cache_dir), precision)
                loaded = LoadedModel(
                    info=info,
                    classifier=classifier,
                    preprocess=get_preprocess(info.preprocess),
                    precision=precision,
                )
                self._loaded[key] = loaded
            return loaded
