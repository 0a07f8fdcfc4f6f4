"""``heatmap infer``: the engine without the service, on the same code path as the worker.

    heatmap infer IMAGE --model NAME_OR_PATH --mode direct|tiled [--stride N]
            [--batch-size N] [--top-k K | --classes a,b] [--memory-budget-mb M] --out DIR

The ``heatmap`` program itself (its parser and the HTTP commands) is ``client.commands``,
which starts without TensorFlow; this module is imported for ``infer`` only. A progress bar
(tiles or window batches done) is drawn on a terminal and nothing when the output is not a
TTY. It never imports the client (layers point down): ``client.commands`` calls
:func:`run_infer` with the flags it parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from tqdm import tqdm

from shared.exceptions import InputError
from shared.jobspec import FORM_FIELDS, validate_params
from shared.settings import get_settings


def run_infer(args: argparse.Namespace) -> int:
    """`heatmap infer` with its parsed flags (client.commands builds the parser)."""
    from worker.inference.model_registry import ModelRegistry  # loads Keras: after parsing

    settings = get_settings()
    registry = ModelRegistry(
        settings.model_dirs, settings.vgg16_weights, settings.worker_precision, settings.resolved_model_cache_dir
    )
    return _infer(args, settings, registry)


class _ProgressBar:
    """A tqdm bar on a terminal, created on the first callback (when the total is known)."""

    def __init__(self, unit: str):
        self.unit, self.bar = unit, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, unit=self.unit, disable=not sys.stderr.isatty(), file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _infer(args: argparse.Namespace, settings, registry) -> int:
    from worker.engine import run_inference
    from worker.inference.model_registry import ModelUnavailableError

    if not (args.image or args.image_url):
        print("error: missing_image: give an image file or --image-url", file=sys.stderr)
        return 2
    raw = {field.name: getattr(args, field.name, None) for field in FORM_FIELDS if not field.api_only}
    raw["memory_budget_mb"] = args.memory_budget_mb
    mask_image = None
    if raw.get("mask") not in (None, "none", "auto"):  # --mask PATH: a mask picture
        mask_image, raw["mask"] = raw["mask"], "image"
    bar = None
    try:
        info = registry.info(args.model or settings.default_model)
        params = validate_params(
            raw,
            info,
            max_batch_size=settings.max_batch_size,
            max_top_k=max(settings.max_top_k, len(info.classes)),
            memory_budget_mb=settings.memory_budget_mb,
            mask_min_fraction=settings.mask_min_fraction,
            shards_max=settings.shards_max,
        )
        params = dataclasses.replace(params, model=args.model or settings.default_model)
        bar = _ProgressBar("tile" if params.mode == "direct" else "batch")
        summary = run_inference(
            params.image_url or args.image,
            params,
            registry,
            args.out,
            max_pixels=settings.max_image_pixels,
            max_region_pixels=settings.max_region_pixels,
            mask_image=mask_image,
            progress=bar,
            shards=params.shards or 1,  # one process: auto is one shard; N runs N bands in turn, same grid
        )
    except InputError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except (ModelUnavailableError, ValueError) as exc:
        print(f"error: {getattr(exc, 'code', 'invalid_input')}: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # a mistyped image path is a usage error, not a crash
        print(f"error: file_not_found: {exc.filename or exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps({"out": args.out, "classes": summary["classes"], "timings": summary["timings"]}, indent=2))
    return 0
