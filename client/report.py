"""What the ``heatmap`` commands print for people (``--json`` prints the service's JSON
instead), and saving a job's results into a folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.api_client import HeatmapClient


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart."""
    cells = [[str(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(line.rstrip() for line in lines)


def save_results(client: HeatmapClient, job: dict, out: Path) -> list[Path]:
    """Download every output the job has into `out`, under the names the worker gives them
    (the same layout as ``heatmap infer --out``): heatmap, summary, overlays and the map
    outputs (heatmap.tif, regions.geojson, regions_map.geojson) that QuPath and QGIS open."""
    from shared.storage import (  # fsspec: only when saving
        HEATMAP_FILE,
        RASTER_FILE,
        REGIONS_FILE,
        REGIONS_MAP_FILE,
        SUMMARY_FILE,
        overlay_filename,
    )

    result = job["result"]
    wanted = [(result["heatmap_url"], HEATMAP_FILE), (result["summary_url"], SUMMARY_FILE)]
    wanted += [(entry["overlay_url"], overlay_filename(entry["index"])) for entry in result["classes"]]
    maps = (("raster_url", RASTER_FILE), ("regions_url", REGIONS_FILE), ("regions_map_url", REGIONS_MAP_FILE))
    wanted += [(result[link], name) for link, name in maps if result.get(link)]
    return [client.download(url, out / name) for url, name in wanted]


def _peaks_text(entry: dict, limit: int = 5) -> str:
    peaks = entry.get("peaks") or [dict(entry["peak"], score=entry["max"])]
    text = "  ".join(f"({p['x']}, {p['y']}: {p['score']:.2f})" for p in peaks[:limit])
    return text + (f"  +{len(peaks) - limit} more" if len(peaks) > limit else "")


def class_table(job: dict, summary: dict | None) -> str:
    """Per class: maximum, mean and the peaks (window centres in image pixels, best first)."""
    by_name = {entry["name"]: entry for entry in (summary or {}).get("classes", [])}
    rows = [
        (entry["name"], f"{entry['max']:.3f}", f"{entry['mean']:.3f}", _peaks_text(by_name.get(entry["name"], entry)))
        for entry in job["result"]["classes"]
    ]
    return table(("class", "max", "mean", "peaks (x, y: score), best first"), rows)


def print_result(job: dict, summary: dict, saved: list[Path]) -> None:
    timings = job["result"]["timings"]
    print(f"done     {job['status']} in {timings['total_s']:.1f} s (inference {timings['inference_s']:.1f} s)")
    if saved:
        print(f"saved    {saved[0].parent}/  {' '.join(path.name for path in saved)}")
    print(class_table(job, summary))


def print_job(client: HeatmapClient, job: dict, summary: dict | None) -> None:
    image = job["image"]
    lines = [
        ("job", client.url(job["url"])),
        ("status", f"{job['status']}  {job['progress'] * 100:.0f}%  (attempts {job['attempts']})"),
        ("model", f"{job['model']}, {job['mode']}"),
        ("image", f"{image['width']}x{image['height']} {image['format']}"),
        ("created", job["created_at"]),
    ]
    if job.get("finished_at"):
        lines.append(("finished", job["finished_at"]))
    if job.get("error"):
        lines.append(("error", f"{job['error']['code']}: {job['error']['message']}"))
    print("\n".join(f"{name:<9}{value}" for name, value in lines))
    if job.get("result"):
        print(class_table(job, summary))


def print_jobs(page: dict) -> None:
    rows = [
        (
            job["id"],
            job["status"],
            f"{job['progress'] * 100:.0f}%",
            job["model"],
            job["mode"],
            f"{job['image']['width']}x{job['image']['height']}",
            job["created_at"],
        )
        for job in page["jobs"]
    ]
    print(table(("id", "status", "progress", "model", "mode", "image", "created"), rows) if rows else "no jobs")
    if page.get("next_cursor"):
        print(f"more: heatmap jobs --cursor {page['next_cursor']}")


def _shorten(text: str, width: int = 50) -> str:
    text = text.split(". ")[0].strip()
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def print_models(listing: dict) -> None:
    """The table (name, input size, classes, availability); why a model cannot run below it."""
    rows = []
    for model in listing["models"]:
        size = model["input_size"]
        available = "yes" if model["available"] else "no"
        rows.append(
            (
                model["name"],
                f"{size['width']}x{size['height']}",
                model["num_classes"],
                available,
                _shorten(model.get("description", "")),
            )
        )
    print(table(("name", "input", "classes", "available", "description"), rows))
    for model in listing["models"]:
        if not model["available"]:
            print(f"{model['name']} cannot run: {model.get('reason', 'unknown reason')}")
    for problem in listing.get("problems", []):
        message = problem["message"]  # the catalogue's messages name their file already
        print(f"ignored  {message if message.startswith(problem['file']) else problem['file'] + ': ' + message}")
