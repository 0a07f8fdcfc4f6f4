"""Inference parameters of a job and their validation, shared by the API (refuse bad input
before a job exists), the worker (re-check what it runs) and the CLI.

No TensorFlow here: checks use the model's catalogue entry (classes, native window).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from shared.catalog import CatalogError, ModelInfo
from shared.exceptions import InputError

MODES = ("direct", "tiled")
WEIGHTINGS = ("mean", "gaussian")
# Compute precisions: float32 is exact; bfloat16 and float16 run the model under Keras' mixed
# policy (float32 weights, scores float32 on output). float16 needs a GPU: the API cannot
# know the worker's hardware, so a float16 job on a CPU-only worker fails there with
# `precision_unavailable`.
PRECISIONS = ("float32", "bfloat16", "float16")
DEFAULT_TOP_K = 3
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class FormField:
    """One submission parameter as clients send it (a multipart form field or a CLI flag).
    The API's OpenAPI request body and the CLI's flags are generated from `FORM_FIELDS`."""

    name: str
    type: str  # JSON Schema type: "string" or "integer"
    description: str
    choices: tuple[str, ...] | None = None
    default: Any = None
    minimum: int | None = None


FORM_FIELDS: tuple[FormField, ...] = (
    FormField("model", "string", "catalogue name (GET /api/v1/models); default: the service's default model"),
    FormField("mode", "string", "direct: fully convolutional; tiled: sliding window", MODES, "direct"),
    FormField("stride", "integer", "tiled mode: pixels between windows; default half the window", minimum=1),
    FormField("batch_size", "integer", "tiled mode: windows per forward call", default=DEFAULT_BATCH_SIZE, minimum=1),
    FormField("top_k", "integer", "keep the classes with the highest maxima", default=DEFAULT_TOP_K, minimum=1),
    FormField("classes", "string", "comma-separated class names or indices (instead of top_k)"),
    FormField("weighting", "string", "blending of overlapping windows in the overlays", WEIGHTINGS, "mean"),
    FormField(
        "precision",
        "string",
        "compute precision; default the worker's WORKER_PRECISION (float32 unless set); float16 needs a GPU worker",
        PRECISIONS,
    ),
)
FORM_FIELD_NAMES = frozenset(field.name for field in FORM_FIELDS)


class ParameterError(InputError):
    """A job parameter out of range or of the wrong kind."""


@dataclass(frozen=True)
class JobParams:
    """Everything the engine needs besides the image. `class_indices` is resolved from
    `classes` (names or indices) or left None for top-k selection."""

    model: str
    mode: str = "direct"
    stride: int | None = None  # tiled mode only; default half the window
    batch_size: int = DEFAULT_BATCH_SIZE  # tiled mode: windows per forward call
    top_k: int | None = DEFAULT_TOP_K  # used when class_indices is None
    class_indices: tuple[int, ...] | None = None
    memory_budget_mb: int = 1024  # direct mode: bound for one tile's activations
    weighting: str = "mean"  # blending of overlapping windows in the overlays
    overlay_max_side: int = 1024
    precision: str | None = None  # compute precision; None = the worker's default (WORKER_PRECISION)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_indices"] = list(self.class_indices) if self.class_indices is not None else None
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobParams:
        values = dict(data)
        if values.get("class_indices") is not None:
            values["class_indices"] = tuple(values["class_indices"])
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ParameterError("invalid_parameter", f"{name} must be an integer")
    if isinstance(value, str):
        value = value.strip()
        if not value.removeprefix("-").isdecimal() or len(value) > 12:
            raise ParameterError("invalid_parameter", f"{name} must be an integer, got {value[:40]!r}")
        value = int(value)
    if not isinstance(value, int):
        raise ParameterError("invalid_parameter", f"{name} must be an integer")
    if not low <= value <= high:
        raise ParameterError("invalid_parameter", f"{name} must be between {low} and {high}, got {value}")
    return value


def _class_list(value: Any) -> list[str | int]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise ParameterError("invalid_parameter", "classes must be a comma-separated list of names or indices")
    items = [item for item in items if item != ""]
    if not items:
        raise ParameterError("invalid_parameter", "classes is empty")
    return items


def validate_params(
    raw: Mapping[str, Any],
    info: ModelInfo,
    *,
    max_batch_size: int = 256,
    max_top_k: int = 20,
    memory_budget_mb: int = 1024,
) -> JobParams:
    """Check raw (form or CLI) values against the model; raise ParameterError on the first problem."""
    mode = raw.get("mode") or "direct"
    if mode not in MODES:
        raise ParameterError("invalid_parameter", f"mode must be one of {', '.join(MODES)}, got {str(mode)[:40]!r}")
    window = info.input_size
    stride = raw.get("stride")
    if stride not in (None, ""):
        if mode != "tiled":
            raise ParameterError(
                "invalid_parameter", "stride applies to mode=tiled; direct mode uses the network's own stride"
            )
        stride = _integer("stride", stride, 1, min(window))
    else:
        stride = None
    batch_size = raw.get("batch_size")
    batch_size = (
        DEFAULT_BATCH_SIZE if batch_size in (None, "") else _integer("batch_size", batch_size, 1, max_batch_size)
    )
    top_k = raw.get("top_k")
    classes = raw.get("classes")
    class_indices = None
    if classes not in (None, "", []):
        if top_k not in (None, ""):
            raise ParameterError("invalid_parameter", "give either top_k or classes, not both")
        try:
            class_indices = tuple(info.class_indices(_class_list(classes)))
        except CatalogError as exc:
            raise ParameterError(exc.code, exc.message) from exc
        top_k = None
    else:
        top_k = DEFAULT_TOP_K if top_k in (None, "") else _integer("top_k", top_k, 1, max_top_k)
        top_k = min(top_k, len(info.classes))
    weighting = raw.get("weighting") or "mean"
    if weighting not in WEIGHTINGS:
        raise ParameterError("invalid_parameter", f"weighting must be one of {', '.join(WEIGHTINGS)}")
    precision = raw.get("precision") or None
    if precision is not None and precision not in PRECISIONS:
        raise ParameterError("invalid_parameter", f"precision must be one of {', '.join(PRECISIONS)}")
    budget = raw.get("memory_budget_mb")
    budget = memory_budget_mb if budget in (None, "") else _integer("memory_budget_mb", budget, 64, 1 << 20)
    return JobParams(
        model=info.name,
        mode=mode,
        stride=stride,
        batch_size=batch_size,
        top_k=top_k,
        class_indices=class_indices,
        memory_budget_mb=budget,
        weighting=weighting,
        precision=precision,
    )
