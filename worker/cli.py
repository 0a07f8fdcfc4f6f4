"""``heatmap`` command line: the engine without the service, on the same code path.

    heatmap infer IMAGE --model NAME_OR_PATH --mode direct|tiled [--stride N]
            [--batch-size N] [--top-k K | --classes a,b] [--memory-budget-mb M] --out DIR
    heatmap models

A progress bar (tiles or window batches done) is drawn on a terminal and nothing when the
output is not a TTY.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from shared.exceptions import InputError
from shared.jobspec import validate_params
from shared.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heatmap", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    infer = commands.add_parser("infer", help="compute heatmaps for one image")
    infer.add_argument("image")
    infer.add_argument("--model", default=None, help="catalogue name or path to a .keras/.h5 file with sidecar")
    infer.add_argument("--mode", choices=("direct", "tiled"), default="direct")
    infer.add_argument("--stride", type=int, default=None, help="tiled mode: pixels between windows")
    infer.add_argument("--batch-size", type=int, default=None, help="tiled mode: windows per forward call")
    group = infer.add_mutually_exclusive_group()
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--classes", default=None, help="comma-separated class names or indices")
    infer.add_argument("--memory-budget-mb", type=int, default=None)
    infer.add_argument("--weighting", choices=("mean", "gaussian"), default="mean")
    infer.add_argument("--out", required=True, help="output folder")
    commands.add_parser("models", help="list the models in the catalogue")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    from worker.model_registry import ModelRegistry, ModelUnavailableError  # loads Keras: after parsing

    registry = ModelRegistry(settings.model_dirs, settings.vgg16_weights)
    if args.command == "models":
        for info in registry.catalog.models.values():
            print(json.dumps(info.public()))
        return 0

    from worker.engine import run_inference

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total,
                unit="tile" if args.mode == "direct" else "batch",
                disable=not sys.stderr.isatty(),
                file=sys.stderr,
            )
        bar.update(done - bar.n)

    try:
        info = registry.info(args.model or settings.default_model)
        params = validate_params(
            {
                "mode": args.mode,
                "stride": args.stride,
                "batch_size": args.batch_size,
                "top_k": args.top_k,
                "classes": args.classes,
                "memory_budget_mb": args.memory_budget_mb,
                "weighting": args.weighting,
            },
            info,
            max_batch_size=settings.max_batch_size,
            max_top_k=max(settings.max_top_k, len(info.classes)),
            memory_budget_mb=settings.memory_budget_mb,
        )
        params = params.__class__(**{**params.__dict__, "model": args.model or settings.default_model})
        summary = run_inference(
            args.image, params, registry, args.out, max_pixels=settings.max_image_pixels, progress=progress
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
