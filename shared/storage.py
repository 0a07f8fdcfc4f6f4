"""Uploads and artifacts, behind fsspec so that a local folder, a shared volume or an object
store (``s3://bucket/prefix``) all work the same way.

Keys are relative POSIX paths built by the service (``uploads/<job_id>/image.png``,
``results/<job_id>/heatmap.npz``); a client-supplied name never becomes a key.

A reader never sees half a file. On a filesystem a write goes to a temporary name, is
fsynced and renamed into place. An object store has no rename (s3fs's ``mv`` is a copy and a
delete, and a reader could see the temporary object), but it needs none: a PUT - or the
completion of a multipart upload - is atomic, the object is visible whole or not at all, so
objects are written straight to their final key. A job's results as a whole are committed by
the row: the worker writes every object first and commits ``succeeded`` (with the list of
keys) only after all of them exist, and readers only follow keys the row lists. A crash
between the two leaves objects without a row under the job's own prefix, never a row
pointing at missing objects; a re-run overwrites them, deleting the job removes the prefix.

``s3://bucket/prefix`` uses s3fs; credentials come from the usual AWS sources (environment,
profile, instance role) and ``S3_ENDPOINT_URL`` points at an S3-compatible server.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

# --- storage keys: the one place they are built ------------------------------------------
HEATMAP_FILE = "heatmap.npz"
SUMMARY_FILE = "summary.json"
RASTER_FILE = "heatmap.tif"  # tiled pyramidal (Geo)TIFF of the score grid
REGIONS_FILE = "regions.geojson"  # regions at or above the threshold, level-0 pixels (QuPath)
REGIONS_MAP_FILE = "regions_map.geojson"  # the same regions in the source's map CRS (georeferenced input)


def upload_prefix(job_id: str) -> str:
    """Folder of a job's input (the upload), removed with the job."""
    return f"uploads/{job_id}"


def mask_key(job_id: str) -> str:
    """A job's uploaded mask picture (read by content, so no extension)."""
    return f"{upload_prefix(job_id)}/mask"


def upload_key(job_id: str, extension: str) -> str:
    """The stored upload: a generated name, never the client's file name."""
    return f"{upload_prefix(job_id)}/image{extension}"


def results_prefix(job_id: str) -> str:
    """Folder of a job's artifacts, written by the worker, removed with the job."""
    return f"results/{job_id}"


def shard_prefix(job_id: str) -> str:
    """Folder of a sharded job's partial grids (one per shard run), removed once the job is
    assembled, and with the job."""
    return f"shards/{job_id}"


def shard_key(job_id: str, index: int, token: str) -> str:
    """One shard run's partial grid: named by its claim token too, so that a straggler's
    backup run never overwrites the run that won (issue 16)."""
    return f"{shard_prefix(job_id)}/{int(index):05d}-{token}.npz"


def overlay_filename(class_index: int) -> str:
    """Overlay PNG of one class, named by index (class names may hold any character)."""
    return f"overlay_{int(class_index)}.png"


def artifact_keys(job_id: str, classes: Iterable[tuple[str, int]], *, map_regions: bool = False) -> dict:
    """Keys of every artifact of a succeeded job, as stored in its row's ``result``:
    ``{"heatmap", "summary", "raster", "regions", "overlays": {class name: key}}`` for
    (name, index) pairs, plus ``"regions_map"`` when the input was georeferenced."""
    prefix = results_prefix(job_id)
    keys = {
        "heatmap": f"{prefix}/{HEATMAP_FILE}",
        "summary": f"{prefix}/{SUMMARY_FILE}",
        "raster": f"{prefix}/{RASTER_FILE}",
        "regions": f"{prefix}/{REGIONS_FILE}",
        "overlays": {name: f"{prefix}/{overlay_filename(index)}" for name, index in classes},
        "viewer": viewer_key(job_id),
    }
    if map_regions:
        keys["regions_map"] = f"{prefix}/{REGIONS_MAP_FILE}"
    return keys


# --- viewer (Deep Zoom) keys ---
# results/<job_id>/viewer/{viewer.json, <layer>.dzi, <layer>_files/<level>/<col>_<row>.<ext>}
VIEWER_DIR = "viewer"
VIEWER_FILE = "viewer.json"
IMAGE_LAYER = "image"
_LAYER_RE = re.compile(r"^(image|heat_[0-9]{1,9})$")


def heat_layer_name(class_index: int) -> str:
    """Deep Zoom layer of one class's heat, named by index like the overlays."""
    return f"heat_{int(class_index)}"


def is_layer_name(layer: str) -> bool:
    """Whether a name from a URL is a layer the worker writes (checked before building a key)."""
    return bool(_LAYER_RE.match(layer))


def viewer_key(job_id: str, name: str = VIEWER_FILE) -> str:
    """A file of the job's viewer folder (the manifest by default)."""
    return f"{results_prefix(job_id)}/{VIEWER_DIR}/{name}"


def dzi_descriptor_name(layer: str) -> str:
    return f"{layer}.dzi"


def dzi_tile_name(layer: str, level: int, col: int, row: int, extension: str) -> str:
    """Deep Zoom's own tile layout, relative to the descriptor: <layer>_files/<level>/<col>_<row>.<ext>."""
    return f"{layer}_files/{int(level)}/{int(col)}_{int(row)}.{extension}"


_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*$")
CHUNK = 1024 * 1024


_JOB_ID_RE = re.compile(r"[0-9a-f]{32}")


def _modified(info: dict) -> float:
    """Modification time of an fsspec listing entry: ``mtime`` (local), ``LastModified``
    (S3, a datetime); 0 when the backend gives none (a pseudo-folder of an object store)."""
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if value is None:
        return 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


class StorageError(RuntimeError):
    """A storage operation failed (disk full, permission, network); transient or not."""


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def fsspec_options(url: str, endpoint_url: str | None = None) -> dict:
    """fsspec options: for s3://, the endpoint (S3_ENDPOINT_URL) and no stale listings. Used
    for the storage and for an image_url alike, so an s3:// input reads the same endpoint."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    if endpoint_url is None:
        from shared.settings import get_settings

        endpoint_url = get_settings().s3_endpoint_url
    options: dict = {"use_listings_cache": False}
    if endpoint_url:
        options["client_kwargs"] = {"endpoint_url": endpoint_url}
    return options


class Storage:
    def __init__(self, url: str, endpoint_url: str | None = None):
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **fsspec_options(url, endpoint_url))
        self.root = root.rstrip("/")
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings) -> Storage:
        return cls(settings.resolved_storage_url, settings.s3_endpoint_url)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for the key when storage is local (lets Pillow seek cheaply)."""
        return Path(self.path(key)) if self.is_local else None

    def open(self, key: str) -> BinaryIO:
        return self.fs.open(self.path(key), "rb")

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Opens now (FileNotFoundError before a response starts), reads as it is iterated."""
        return _read_chunks(self.open(key), chunk_size)

    def put_stream(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        """Copy a stream to `key` atomically; returns (bytes written, sha256 hex)."""
        if not self.is_local:
            return self._put_object(key, stream)
        digest = hashlib.sha256()
        size = 0
        final = self.path(key)
        temp = f"{final}.tmp-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.fs._parent(final), exist_ok=True)
            with self.fs.open(temp, "wb") as out:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                if self.is_local:
                    out.flush()
                    os.fsync(out.fileno())
            self.fs.mv(temp, final)
        except OSError as exc:
            self._discard(temp)
            raise StorageError(f"could not write {key}: {exc}") from exc
        return size, digest.hexdigest()

    def _put_object(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        """Object stores: straight to the final key; the object appears whole when the
        (multipart) upload completes, and an aborted upload leaves nothing visible."""
        digest = hashlib.sha256()
        size = 0
        try:
            out = self.fs.open(self.path(key), "wb")
            try:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            except BaseException:
                getattr(out, "discard", lambda: None)()  # abort: closing would commit the part written so far
                out.closed = True
                raise
            out.close()
        except OSError as exc:
            raise StorageError(f"could not write {key}: {exc}") from exc
        return size, digest.hexdigest()

    def put_file(self, key: str, local_path: str | Path) -> int:
        with open(local_path, "rb") as handle:
            size, _ = self.put_stream(key, handle)
        return size

    def put_dir(self, prefix: str, local_dir: str | Path) -> dict[str, int]:
        """Upload every file of a local folder (subfolders too: the viewer's tiles) under
        `prefix/`, each atomically."""
        written = {}
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(local_dir).as_posix()}"
                written[key] = self.put_file(key, path)
        return written

    def delete_prefix(self, prefix: str) -> None:
        target = self.path(prefix)
        try:
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
        except FileNotFoundError:
            pass

    def delete_job_files(self, job_id: str) -> None:
        """Remove a job's results, partial grids and upload (deleted job, retention, orphans)."""
        self.delete_prefix(results_prefix(job_id))
        self.delete_prefix(shard_prefix(job_id))
        self.delete_prefix(upload_prefix(job_id))

    def job_folders(self) -> dict[str, float]:
        """Every job id that has an upload, results or shards folder, with the newest
        modification time (epoch seconds) of the folder or anything in it; for the orphan sweep."""
        found: dict[str, float] = {}
        for parent in (upload_prefix(""), results_prefix(""), shard_prefix("")):
            base = self.path(parent.rstrip("/"))
            try:
                entries = self.fs.ls(base, detail=True) if self.fs.exists(base) else []
            except FileNotFoundError:
                entries = []
            for entry in entries:
                job_id = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                if _JOB_ID_RE.fullmatch(job_id):
                    found[job_id] = max(found.get(job_id, 0.0), self._newest(entry))
        return found

    def _newest(self, entry: dict) -> float:
        """Newest modification time of a folder entry and everything below it."""
        times = [_modified(entry)]
        try:
            times.extend(_modified(info) for info in self.fs.find(entry["name"], detail=True).values())
        except FileNotFoundError:
            pass
        return max(times)

    def _discard(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path)
        except OSError:
            pass

    def fetch_to(self, key: str, local_path: Path) -> Path:
        """Copy a stored object to a local file (for non-local storage)."""
        with self.open(key) as src, open(local_path, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        return local_path


def _read_chunks(handle: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk
