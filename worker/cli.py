"""``heatmap`` command line: the engine without the service, on the same code path.

    heatmap infer IMAGE --model NAME_OR_PATH --mode direct|tiled [--stride N]
            [--batch-size N] [--top-k K | --classes a,b] [--memory-budget-mb M] --out DIR
    heatmap models

A progress bar (tiles or window batches done) is drawn on a terminal and nothing when the
output is not a TTY.
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heatmap", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    infer = commands.add_parser("infer", help="compute heatmaps for one image")
    infer.add_argument("image")
    exclusive = infer.add_mutually_exclusive_group()  # top_k or classes
    for field in FORM_FIELDS:
        target = exclusive if field.name in ("top_k", "classes") else infer
        help_text = field.description
        if field.name == "model":
            help_text = "catalogue name or path to a .keras/.h5 file with its sidecar"
        target.add_argument(
            "--" + field.name.replace("_", "-"),
            type=int if field.type == "integer" else str,
            choices=field.choices,
            default=None,
            help=help_text,
        )
    infer.add_argument("--memory-budget-mb", type=int, default=None, help="direct mode: bound for one tile")
    infer.add_argument("--out", required=True, help="output folder")
    commands.add_parser("models", help="list the models in the catalogue")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    from worker.model_registry import ModelRegistry  # loads Keras: after parsing

    registry = ModelRegistry(settings.model_dirs, settings.vgg16_weights, settings.worker_precision)
    if args.command == "models":
        for info in registry.catalog.models.values():
            print(json.dumps(info.public()))
        return 0
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
    from worker.model_registry import ModelUnavailableError

    raw = {field.name: getattr(args, field.name) for field in FORM_FIELDS}
    raw["memory_budget_mb"] = args.memory_budget_mb
    bar = None
    try:
        info = registry.info(args.model or settings.default_model)
        params = validate_params(
            raw,
            info,
            max_batch_size=settings.max_batch_size,
            max_top_k=max(settings.max_top_k, len(info.classes)),
            memory_budget_mb=settings.memory_budget_mb,
        )
        params = dataclasses.replace(params, model=args.model or settings.default_model)
        bar = _ProgressBar("tile" if params.mode == "direct" else "batch")
        summary = run_inference(
            args.image, params, registry, args.out, max_pixels=settings.max_image_pixels, progress=bar
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


if __name__ == "__main__":
    raise SystemExit(main())
