"""The acceptance check of a job's input, shared by the API (before a job exists): the image
(an upload or an allowed ``image_url``) and an optional mask picture, from headers only.

Why here and not in the view: the same rules must hold for every entry point, and the
worker later opens the same input with the same readers (shared.image_sources).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shared.exceptions import InputError
from shared.image_sources.pillow_decoder import ImageError
from shared.image_sources.source_opener import probe_source
from shared.image_sources.source_types import SourceInfo
from shared.input_urls import check_input_url
from shared.jobspec import JobParams


def probe_input(settings: Any, submission: Any, params: JobParams, min_size) -> tuple[JobParams, SourceInfo]:
    """(params with image_url normalised and mask resolved, the image's header facts)."""
    limits = {"max_pixels": settings.max_image_pixels, "max_region_pixels": settings.max_region_pixels}
    if params.image_url:
        url = check_input_url(params.image_url, settings.input_url_prefixes)
        params = dataclasses.replace(params, image_url=url)
        info = _probe_url(url, limits | {"endpoint_url": settings.s3_endpoint_url}, min_size)
    else:
        info = probe_source(submission.image, min_size=min_size, **limits)
        submission.image.seek(0)
    if submission.mask is not None:
        if params.mask not in (None, "image"):
            raise InputError("invalid_parameter", f"a mask picture was sent, but mask={params.mask}")
        # the same readers and checks as the image (issue 20: a corrupt tiled TIFF was
        # refused as the image but accepted as the mask, to fail only in the job)
        probe_source(submission.mask, **limits)
        submission.mask.seek(0)
        params = dataclasses.replace(params, mask="image")
    elif params.mask == "image":
        raise InputError("invalid_parameter", "mask=image needs a mask picture in the file field `mask_image`")
    _check_resolution(params, info)
    return params, info


def _probe_url(url: str, limits: dict, min_size) -> SourceInfo:
    """Header facts of a remote image; a missing or unreadable object is the client's error."""
    try:
        return probe_source(url, min_size=min_size, **limits)
    except ImageError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        raise InputError("url_unreadable", f"image_url cannot be read: {type(exc).__name__}") from None


def _check_resolution(params: JobParams, info: SourceInfo) -> None:
    """level/mpp against the file's own pyramid and metadata (the worker checks them again)."""
    if params.level is not None and params.level >= len(info.levels):
        raise InputError("invalid_parameter", f"level {params.level} does not exist; the image has {len(info.levels)}")
    if params.mpp is not None and info.mpp is None:
        raise InputError("no_resolution", "the image file states no microns per pixel; give a pyramid level instead")
