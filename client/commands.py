"""``heatmap``: the service's command line.

    heatmap submit IMAGE|--image-url URL [--server URL] [--api-key KEY] [--model M]
                         [--mode direct|tiled] [--top-k K | --classes a,b] [...] [--wait] [--out DIR] [--json]
    heatmap status JOB [--json]          heatmap jobs [--status S] [--limit N] [--cursor C]
    heatmap cancel JOB                   heatmap models [--server URL] [--json]
    heatmap infer IMAGE --out DIR [...]  (the engine on this machine; needs the worker extra)

The server and the key come from ``--server`` / ``--api-key`` or ``HEATMAP_SERVER`` /
``HEATMAP_API_KEY``. Only ``infer`` loads TensorFlow; every other command starts in a
fraction of a second. Exit status: 0 done, 1 the job failed or was canceled (its error code
is printed), 2 the request was refused or the input is wrong, 3 the service could not be
reached or failed, 130 interrupted while waiting (the job goes on). Output piped into a
reader that stops early (``heatmap jobs | head``) ends quietly, as other command-line tools do.

``submit`` uploads IMAGE, or with ``--image-url`` (or a URL as IMAGE) sends only the
reference: the worker reads the slide in place, under the service's ``INPUT_URL_PREFIXES``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from client.report import print_job, print_jobs, print_models, print_result, save_results
from shared.jobs.job_status import JobStatus
from shared.jobspec import FORM_FIELDS

if TYPE_CHECKING:
    from client.api_client import HeatmapClient

DEFAULT_SERVER = "http://127.0.0.1:8000"  # `make serve`'s default port
EXIT_OK, EXIT_JOB_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def add_job_flags(parser: argparse.ArgumentParser, model_help: str | None = None, service: bool = True) -> None:
    """One flag per job parameter, generated from shared.jobspec.FORM_FIELDS (as the API's
    form is), so that `submit` and `infer` take exactly what a job takes (`service=False`:
    without the fields only the service acts on, such as callback_url)."""
    exclusive = parser.add_mutually_exclusive_group()  # top_k or classes
    for field in FORM_FIELDS:
        if field.api_only and not service:
            continue
        target = exclusive if field.name in ("top_k", "classes") else parser
        target.add_argument(
            "--" + field.name.replace("_", "-"),
            type=int if field.type == "integer" else str,
            choices=field.choices,
            default=None,
            help=model_help if field.name == "model" and model_help else field.description,
        )


def _connection_flags(required_server: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    default = os.environ.get("HEATMAP_SERVER") or (DEFAULT_SERVER if required_server else None)
    where = f"default: $HEATMAP_SERVER or {DEFAULT_SERVER}" if required_server else "default: $HEATMAP_SERVER"
    parent.add_argument("--server", default=default, help=f"the service's base URL ({where})")
    parent.add_argument("--api-key", default=os.environ.get("HEATMAP_API_KEY"), help="default: $HEATMAP_API_KEY")
    parent.add_argument("--json", action="store_true", help="print the service's JSON instead of a table")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heatmap", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    http = _connection_flags()
    submit = commands.add_parser("submit", parents=[http], help="submit an image to the service")
    submit.add_argument("image", nargs="?", help="image file to upload, or a URL read in place (as --image-url)")
    add_job_flags(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the job (a progress bar on a terminal)")
    submit.add_argument("--out", help="download the results into this folder (implies --wait)")
    status = commands.add_parser("status", parents=[http], help="one job's status and results")
    status.add_argument("job", help="job id or URL")
    jobs = commands.add_parser("jobs", parents=[http], help="your jobs, newest first")
    jobs.add_argument("--status", choices=[s.value for s in JobStatus])
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--cursor", help="next page (printed under a full page)")
    cancel = commands.add_parser("cancel", parents=[http], help="cancel a queued or running job")
    cancel.add_argument("job", help="job id or URL")
    commands.add_parser(
        "models",
        parents=[_connection_flags(required_server=False)],
        help="models and whether they can run: the server's, or this machine's without --server",
    )
    infer = commands.add_parser("infer", help="compute heatmaps for one image on this machine (loads TensorFlow)")
    infer.add_argument("image", nargs="?", help="image file (or give --image-url)")
    add_job_flags(infer, "catalogue name or path to a .keras/.h5 file with its sidecar", service=False)
    infer.add_argument(
        "--memory-budget-mb", type=int, default=None, help="direct mode: bound for one row band or tile (MB)"
    )
    infer.add_argument("--out", required=True, help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is caught below, not printed
        return status
    except BrokenPipeError:  # the reader of our output went away (`| head`): no traceback
        _silence_stdout()
        return EXIT_JOB_FAILED


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not raise again
    (the recipe of Python's `signal` documentation for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "infer":
        from worker.local_infer import run_infer  # TensorFlow: only for this command

        return run_infer(args)
    if args.command == "models" and not args.server:
        return _local_models(args)
    from client.api_client import ClientError, HeatmapClient  # requests: only for the HTTP commands

    client = HeatmapClient(args.server, args.api_key)
    try:
        return _COMMANDS[args.command](client, args)
    except ClientError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED if exc.status is not None and exc.status < 500 else EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _job_outcome(job: dict) -> int:
    if job["status"] in (JobStatus.failed, JobStatus.canceled):
        error = job.get("error") or {}
        print(f"error: {error.get('code', job['status'])}: {error.get('message', '')}", file=sys.stderr)
        return EXIT_JOB_FAILED
    return EXIT_OK


def _submission_input(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """(file to upload, or None; the error to print, or None). A URL given as IMAGE is sent
    as image_url (by reference, nothing uploaded); a file with --image-url is refused."""
    if args.image and "://" in args.image:
        if args.image_url:
            return None, "invalid_parameter: give the URL once (IMAGE or --image-url)"
        args.image_url, args.image = args.image, None
    if args.image and args.image_url:
        return None, "invalid_parameter: give an image file or --image-url URL, not both"
    if args.image_url:
        return None, None
    if not args.image:
        return None, "missing_image: give an image file to upload, or --image-url URL for a file the service reads"
    image = Path(args.image)
    if not image.is_file():
        return None, f"file_not_found: {image} (a slide the service can read: --image-url URL)"
    return image, None


def _submit(client: HeatmapClient, args: argparse.Namespace) -> int:
    image, problem = _submission_input(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_REFUSED
    fields = {f.name: str(getattr(args, f.name)) for f in FORM_FIELDS if getattr(args, f.name) is not None}
    job = client.submit(image, fields)
    url = client.url(job["url"])
    if not (args.wait or args.out):
        print(json.dumps(job, indent=2) if args.json else f"job      {url}")
        return EXIT_OK
    if not args.json:
        print(f"job      {url}", flush=True)
    try:
        job = _wait(client, job["id"])
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the job goes on: {url} (heatmap cancel {job['id']} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return _finish(client, args, job)


def _wait(client: HeatmapClient, job_id: str) -> dict:
    """Poll with a tqdm bar on a terminal (none when stderr is not one: logs stay clean)."""
    from tqdm import tqdm

    with tqdm(
        total=100,
        unit="%",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        bar_format="{desc:<9} {percentage:3.0f}%|{bar}| {elapsed}",
    ) as bar:

        def update(job: dict) -> None:
            bar.set_description_str(job["status"], refresh=False)
            bar.update(round(job["progress"] * 100) - bar.n)

        return client.wait(job_id, update)


def _finish(client: HeatmapClient, args: argparse.Namespace, job: dict) -> int:
    """After the wait: the outcome, the files (with --out) and each class's peaks."""
    if job["status"] != JobStatus.succeeded:
        if args.json:
            print(json.dumps(job, indent=2))
        return _job_outcome(job)
    summary = client.get_json(job["result"]["summary_url"])
    saved = save_results(client, job, Path(args.out)) if args.out else []
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print_result(job, summary, saved)
    return EXIT_OK


def _status(client: HeatmapClient, args: argparse.Namespace) -> int:
    job = client.job(args.job)
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        summary = client.get_json(job["result"]["summary_url"]) if job.get("result") else None
        print_job(client, job, summary)
    return _job_outcome(job) if job["status"] != JobStatus.succeeded else EXIT_OK


def _jobs(client: HeatmapClient, args: argparse.Namespace) -> int:
    page = client.jobs(args.status, args.limit, args.cursor)
    if args.json:
        print(json.dumps(page, indent=2))
    else:
        print_jobs(page)
    return EXIT_OK


def _cancel(client: HeatmapClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job)
    print(json.dumps(job, indent=2) if args.json else f"canceled {client.url(job['url'])}")
    return EXIT_OK


def _models(client: HeatmapClient, args: argparse.Namespace) -> int:
    listing = client.models()
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        print(f"models at {client.server}")
        print_models(listing)
    return EXIT_OK


def _local_models(args: argparse.Namespace) -> int:
    """This machine's catalogue (what `heatmap infer` can use), from sidecar files: no Keras."""
    from shared.catalog import ModelCatalog, model_status
    from shared.settings import get_settings

    settings = get_settings()
    catalog = ModelCatalog(settings.model_dirs)
    listing = {
        "models": [model_status(info, settings.vgg16_weights) for info in catalog.models.values()],
        "problems": [{"file": name, "message": message} for name, message in sorted(catalog.problems.items())],
    }
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        print("models on this machine (heatmap infer; --server or HEATMAP_SERVER lists a service's)")
        print_models(listing)
    return EXIT_OK


_COMMANDS = {"submit": _submit, "status": _status, "jobs": _jobs, "cancel": _cancel, "models": _models}


if __name__ == "__main__":
    raise SystemExit(main())
