"""Inference parameters of a job and their validation, shared by the API (refuse bad input
before a job exists), the worker (re-check what it runs) and the CLI.

No TensorFlow here: checks use the model's catalogue entry (classes, native window).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from shared.catalog import CatalogError, ModelInfo
from shared.exceptions import InputError

MODES = ("direct", "tiled")
# Overlay blending of overlapping windows (worker.outputs.blend); max keeps objects smaller than the
# window visible (docs/outputs.md, "Overlays").
WEIGHTINGS = ("max", "mean", "gaussian")
DEFAULT_WEIGHTING = "max"
#: mask modes; "image" means a mask picture was sent (the `mask_image` file field, or a path on the CLI)
MASKS = ("none", "auto", "image")
MAX_LEVEL = 63
# Compute precisions: float32 is exact; bfloat16 and float16 run the model under Keras' mixed
# policy (float32 weights, scores float32 on output). float16 needs a GPU: the API cannot
# know the worker's hardware, so a float16 job on a CPU-only worker fails there with
# `precision_unavailable`.
PRECISIONS = ("float32", "bfloat16", "float16")
# How direct mode computes the trunk (worker.inference.direct): "rows" streams full-width row bands layer
# by layer (no halo recomputation), "tiles" uses tiles with halos; "auto" picks per job.
DIRECT_SCHEMES = ("auto", "rows", "tiles")
# Direct mode's finer grids: the output stride divided by these (worker.inference.atrous).
DIRECT_STRIDE_FACTORS = (1, 2, 4, 8)
DEFAULT_TOP_K = 3
DEFAULT_BATCH_SIZE = 32
DEFAULT_THRESHOLD = 0.5
CALLBACK_URL_MAX_LENGTH = 2000
IMAGE_URL_MAX_LENGTH = 4096


@dataclass(frozen=True)
class FormField:
    """One submission parameter as clients send it (a multipart form field or a CLI flag).
    The API's OpenAPI request body and the CLI's flags are generated from `FORM_FIELDS`."""

    name: str
    type: str  # JSON Schema type: "string", "integer" or "number"
    description: str
    choices: tuple[str, ...] | None = None
    default: Any = None
    minimum: int | None = None
    maximum_setting: str | None = None  # the Settings field that bounds an integer from above
    max_length: int | None = None  # longest accepted string, checked before any parsing
    api_only: bool = False  # a service option (not an inference parameter): no CLI flag


FORM_FIELDS: tuple[FormField, ...] = (
    FormField(
        "model", "string", "catalogue name (GET /api/v1/models); default: the service's default model", max_length=200
    ),
    FormField("mode", "string", "direct: fully convolutional; tiled: sliding window", MODES, "direct"),
    FormField(
        "stride",
        "integer",
        "pixels between windows. tiled mode: 1 to the window, default half the window; direct mode: the "
        "model's output stride divided by 2, 4 or 8 (a finer exact grid: only the blocks after the "
        "last kept downsampling and the head run on the extra positions, a trous), default the output stride",
        minimum=1,
    ),
    FormField(
        "batch_size",
        "integer",
        "tiled mode: windows per forward call",
        default=DEFAULT_BATCH_SIZE,
        minimum=1,
        maximum_setting="max_batch_size",
    ),
    FormField(
        "top_k",
        "integer",
        "keep the classes with the highest maxima",
        default=DEFAULT_TOP_K,
        minimum=1,
        maximum_setting="max_top_k",
    ),
    FormField("classes", "string", "comma-separated class names or indices (instead of top_k)", max_length=16384),
    FormField(
        "weighting",
        "string",
        "overlays: each pixel shows the max of the windows covering it, or their (gaussian-weighted) mean",
        WEIGHTINGS,
        DEFAULT_WEIGHTING,
    ),
    FormField("level", "integer", "pyramid level to analyse (0 = full resolution); instead of mpp", minimum=0),
    FormField("mpp", "string", "target microns per pixel: the nearest finer level, resampled; instead of level"),
    FormField(
        "mask",
        "string",
        "windows to compute: none, auto (tissue; the default for slides) or image "
        "(a mask picture sent as the file field `mask_image`)",
    ),
    FormField(
        "image_url",
        "string",
        "instead of an upload: an fsspec URL under the service's INPUT_URL_PREFIXES",
        max_length=IMAGE_URL_MAX_LENGTH,
    ),
    FormField(
        "threshold", "number", "regions.geojson: cells scoring at or above this form regions", default=DEFAULT_THRESHOLD
    ),
    FormField(
        "callback_url",
        "string",
        "webhook: POSTed the signed job JSON when the job finishes (hosts allowed by WEBHOOK_ALLOWED_HOSTS)",
        max_length=CALLBACK_URL_MAX_LENGTH,
        api_only=True,
    ),
    FormField(
        "shards",
        "string",
        "split the job into bands of rows that idle workers compute in parallel (same grid): auto (the "
        "default: only when the job is large enough to pay for it) or 1 to SHARDS_MAX (1: one worker)",
        max_length=8,
    ),
    FormField(
        "precision",
        "string",
        "compute precision; default the worker's WORKER_PRECISION (float32 unless set); float16 needs a GPU worker",
        PRECISIONS,
    ),
)
FORM_FIELD_NAMES = frozenset(field.name for field in FORM_FIELDS)

#: Longest value of each form field, checked before any other work on the form (issue 11:
#: a 467 KB `classes` field cost a second of CPU): each field's `max_length`; fields without
#: one are names or numbers. `classes` fits every class name of a 1,000-class model (VGG16's
#: list is 10.5 K characters).
FIELD_MAX_CHARS = {field.name: field.max_length for field in FORM_FIELDS if field.max_length}
OTHER_FIELD_MAX_CHARS = 64


def check_field_sizes(raw: Mapping[str, Any]) -> None:
    """Refuse (413 `payload_too_large`) a form field longer than its bound."""
    for name, value in raw.items():
        limit = FIELD_MAX_CHARS.get(name, OTHER_FIELD_MAX_CHARS)
        if isinstance(value, str) and len(value) > limit:
            raise ParameterError(
                "payload_too_large", f"form field {str(name)[:40]!r} is longer than {limit} characters"
            )


class ParameterError(InputError):
    """A job parameter out of range or of the wrong kind."""


@dataclass(frozen=True)
class JobParams:
    """Everything the engine needs besides the image. `class_indices` is resolved from
    `classes` (names or indices) or left None for top-k selection."""

    model: str
    mode: str = "direct"
    stride: int | None = None  # tiled: default half the window; direct: output stride / 1, 2, 4 or 8
    batch_size: int = DEFAULT_BATCH_SIZE  # tiled mode: windows per forward call
    top_k: int | None = DEFAULT_TOP_K  # used when class_indices is None
    class_indices: tuple[int, ...] | None = None
    memory_budget_mb: int = 1024  # direct mode: bound for one row band's or tile's activations
    weighting: str = DEFAULT_WEIGHTING  # blending of overlapping windows in the overlays
    overlay_max_side: int = 1024
    level: int | None = None  # pyramid level analysed (None: level 0, or the one mpp picks)
    mpp: float | None = None  # target microns per pixel
    mask: str | None = None  # none | auto | image; None: auto for slides, none otherwise
    mask_min_fraction: float = 0.25  # windows with less of their area in the mask are not computed
    image_url: str | None = None  # input by reference (checked against INPUT_URL_PREFIXES)
    threshold: float = DEFAULT_THRESHOLD  # regions.geojson: cells scoring at or above this
    precision: str | None = None  # compute precision; None = the worker's default (WORKER_PRECISION)
    shards: int | None = None  # bands computed by separate workers; None = auto (worker.inference.shard_bands)

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


def _integer(name: str, value: Any, low: int, high: int, high_is: str = "") -> int:
    """`value` as an integer in [low, high]; `high_is` says what the upper bound is (e.g.
    "the model's window"), so that the refusal tells the user why."""
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
        bound = f"{high} ({high_is})" if high_is else f"{high}"
        raise ParameterError("invalid_parameter", f"{name} must be between {low} and {bound}, got {value}")
    return value


def _threshold(value: Any) -> float:
    """Any finite number: scores need not be probabilities (a user model may output logits)."""
    if value in (None, ""):
        return DEFAULT_THRESHOLD
    try:
        number = float(value) if not isinstance(value, str) or len(value) <= 40 else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ParameterError("invalid_parameter", "threshold must be a finite number")
    return number


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
    mask_min_fraction: float = 0.25,
    shards_max: int = 16,
) -> JobParams:
    """Check raw (form or CLI) values against the model; raise ParameterError on the first problem."""
    mode = raw.get("mode") or "direct"
    if mode not in MODES:
        raise ParameterError("invalid_parameter", f"mode must be one of {', '.join(MODES)}, got {str(mode)[:40]!r}")
    stride = _stride(raw.get("stride"), mode, info)
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
        top_k = min(top_k, len(info.classes) - len(info.background_classes))  # top-k skips background
    weighting = raw.get("weighting") or DEFAULT_WEIGHTING
    if weighting not in WEIGHTINGS:
        raise ParameterError("invalid_parameter", f"weighting must be one of {', '.join(WEIGHTINGS)}")
    precision = raw.get("precision") or None
    if precision is not None and precision not in PRECISIONS:
        raise ParameterError("invalid_parameter", f"precision must be one of {', '.join(PRECISIONS)}")
    budget = raw.get("memory_budget_mb")
    budget = memory_budget_mb if budget in (None, "") else _integer("memory_budget_mb", budget, 64, 1 << 20)
    level, mpp = _resolution(raw)
    return JobParams(
        model=info.name,
        mode=mode,
        stride=stride,
        batch_size=batch_size,
        top_k=top_k,
        class_indices=class_indices,
        memory_budget_mb=budget,
        weighting=weighting,
        level=level,
        mpp=mpp,
        mask=_mask(raw.get("mask")),
        mask_min_fraction=mask_min_fraction,
        image_url=(raw.get("image_url") or None),
        threshold=_threshold(raw.get("threshold")),
        precision=precision,
        shards=_shards(raw.get("shards"), shards_max),
    )


def _shards(value: Any, shards_max: int) -> int | None:
    """None for auto (or nothing given), else an integer 1..`shards_max`."""
    if value in (None, "") or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    return _integer("shards", value, 1, shards_max, "SHARDS_MAX")


def _stride(stride: Any, mode: str, info: ModelInfo) -> int | None:
    """The stride, after refusing direct mode for a model whose trunk sees the whole image."""
    if mode == "direct" and info.global_context:
        raise ParameterError(
            "invalid_parameter",
            f"direct mode cannot run model {info.name!r}: its layer {info.global_context[:80]!r} pools over the "
            "whole image inside the network (squeeze-excitation), so tiles cannot be exact; use mode=tiled",
        )
    if stride in (None, ""):
        return None
    value = _integer("stride", stride, 1, min(info.input_size), "the model's window: windows must touch or overlap")
    if mode == "direct" and info.output_stride:
        direct_stride_factor((info.output_stride, info.output_stride), value)
    return value


def direct_stride_factor(native: tuple[int, int], stride: int) -> int:
    """How much finer than the network's own `native` stride a direct-mode `stride` is (1, 2, 4
    or 8: ``DIRECT_STRIDE_FACTORS``); ParameterError for any other stride."""
    allowed = [native[0] // f for f in DIRECT_STRIDE_FACTORS if native[0] % f == 0 and native[1] == native[0]]
    if stride not in allowed:
        choices = ", ".join(str(v) for v in allowed) or "none (the model's stride is not square)"
        raise ParameterError(
            "invalid_parameter",
            f"direct mode: stride must be the model's output stride {native[0]} or a divisor of it by 2, 4 or 8 "
            f"({choices}); use mode=tiled for any other stride",
        )
    return native[0] // stride


def _resolution(raw: Mapping[str, Any]) -> tuple[int | None, float | None]:
    """level or mpp (not both); the file's own facts are checked when it is opened."""
    level, mpp = raw.get("level"), raw.get("mpp")
    if level not in (None, "") and mpp not in (None, ""):
        raise ParameterError("invalid_parameter", "give either level or mpp, not both")
    level = None if level in (None, "") else _integer("level", level, 0, MAX_LEVEL)
    if mpp in (None, ""):
        return level, None
    try:
        value = float(str(mpp).strip()[:40])
    except ValueError:
        raise ParameterError("invalid_parameter", f"mpp must be a number, got {str(mpp)[:40]!r}") from None
    if not (math.isfinite(value) and 0.01 <= value <= 1e6):
        raise ParameterError("invalid_parameter", "mpp must be between 0.01 and 1000000 microns per pixel")
    return None, value


def _mask(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if value not in MASKS:
        raise ParameterError("invalid_parameter", f"mask must be one of {', '.join(MASKS)}")
    return value
