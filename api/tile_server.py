"""The viewer's image tiles, read on demand from the job's own input (issue 17).

Why: the input is immutable for the job's life, so a copy of it as a Deep Zoom pyramid (tens
of thousands of files per gigapixel job, written by the worker whether anyone looks or not)
buys nothing but storage and write time. The API opens the job's input with the readers the
worker uses (``shared.image_sources``), reads each tile's box from the best pyramid level,
resizes and encodes it when it is asked for, as OpenSlide's Deep Zoom server or QuPath do.

Bounded everywhere, per API process: a few open inputs (opening a slide or an ``s3://``
object costs round trips; each is read by one thread at a time), an LRU of encoded tiles (by
bytes), and a fixed number of render threads, so decoding never runs on the request loop:

* in a threaded server (gthread, the Flask dev server, tests) a thread pool in the process;
* under gevent (``make serve``) a child process (``api.tile_process``) with one thread per
  connection to it. Native threads inside a gevent process do not work for this: zarr and
  s3fs wait on threading primitives that gevent has replaced (``LoopExit``), and a greenlet
  that decoded a tile itself would stall every other connection of its worker. A greenlet
  waits on the child's socket instead, and the loop serves the others meanwhile.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import socket
import struct
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from shared.image_sources.dzi_geometry import JPEG_QUALITY, TileBox, read_tile
from shared.image_sources.source_opener import open_image_source
from shared.image_sources.source_types import ImageError, ImageSource

#: Part of every tile's ETag: bump it when the rendering changes (quality, filter).
RENDER_VERSION = "1"


@dataclass(frozen=True)
class InputRef:
    """Where a job's input is and the limits to open it with (picklable: it crosses to the
    tile process)."""

    source: str  # a local path or an fsspec URL
    endpoint_url: str | None
    max_pixels: int
    max_region_pixels: int

    def open(self) -> ImageSource:
        return open_image_source(
            self.source,
            endpoint_url=self.endpoint_url,
            max_pixels=self.max_pixels,
            max_region_pixels=self.max_region_pixels,
        )


def input_ref(settings: Any, storage: Any, image_key: str, image_url: str | None) -> InputRef:
    """A job's input: its ``image_url`` in place, or the stored upload (a local path when
    storage is a folder, so OpenSlide can read it; its URL on object storage)."""
    if image_url:
        source = image_url
    else:
        local = storage.local_path(image_key)
        source = str(local) if local is not None else storage.fs.unstrip_protocol(storage.path(image_key))
    return InputRef(source, settings.s3_endpoint_url, settings.max_image_pixels, settings.max_region_pixels)


class _OpenInput:
    """One job's input, opened on first use and read by one thread at a time."""

    def __init__(self, ref: InputRef):
        self._ref = ref
        self._source: ImageSource | None = None
        self._lock = threading.Lock()

    def tile(self, box: TileBox) -> bytes:
        with self._lock:
            if self._source is None:
                try:
                    self._source = self._ref.open()
                except (FileNotFoundError, PermissionError):  # removed or moved since the job ran
                    raise ImageError("input_unavailable", "the job's input image can no longer be read") from None
            pixels = read_tile(self._source, box)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()

    def close(self) -> None:
        with self._lock:
            if self._source is not None:
                self._source.close()
                self._source = None


class TileRenderer:
    """Reads and encodes tiles with native threads: the open inputs, least recently used out."""

    def __init__(self, open_inputs: int):
        self._inputs: OrderedDict[str, _OpenInput] = OrderedDict()
        self._max = open_inputs
        self._lock = threading.Lock()

    def render(self, job_id: str, ref: InputRef, box: TileBox) -> bytes:
        with self._lock:
            job_input = self._inputs.get(job_id)
            if job_input is None:
                job_input = self._inputs[job_id] = _OpenInput(ref)
            self._inputs.move_to_end(job_id)
            evicted = [self._inputs.popitem(last=False)[1] for _ in range(len(self._inputs) - self._max)]
        for old in evicted:
            old.close()  # waits for a read it is serving
        return job_input.tile(box)

    def forget(self, job_id: str) -> None:
        with self._lock:
            job_input = self._inputs.pop(job_id, None)
        if job_input is not None:
            job_input.close()


class _ThreadBackend:
    """A threaded server: a pool of `threads` in this process."""

    def __init__(self, threads: int, open_inputs: int):
        self._renderer = TileRenderer(open_inputs)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tiles")

    def call(self, request: tuple) -> Any:
        method = getattr(self._renderer, request[0])
        return self._pool.submit(method, *request[1:]).result()


def send_message(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def receive_message(sock: socket.socket) -> Any:
    """The next message, or EOFError when the other side closed."""
    (length,) = struct.unpack("!Q", _receive_exactly(sock, 8))
    return pickle.loads(_receive_exactly(sock, length))


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the tile process closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class TileProcessLost(RuntimeError):
    """The tile process died (or closed a connection) while answering."""


class _ProcessBackend:
    """A gevent server: a child process (api.tile_process) with `threads` connections, one
    request at a time on each; a greenlet takes a free connection (or waits for one)."""

    def __init__(self, threads: int, open_inputs: int):
        self._free: queue.Queue = queue.Queue()
        ours, theirs = zip(*(socket.socketpair() for _ in range(threads)), strict=True)
        fds = [s.fileno() for s in theirs]
        command = [sys.executable, "-m", "api.tile_process", str(open_inputs), *map(str, fds)]
        root = str(Path(__file__).resolve().parent.parent)  # where this `api` package is imported from
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(command, pass_fds=fds, env=dict(os.environ, PYTHONPATH=path))
        for sock in theirs:
            sock.close()
        for sock in ours:
            self._free.put(sock)

    def call(self, request: tuple) -> Any:
        sock = self._free.get()
        if sock is None:  # closed while this greenlet waited for a connection
            self._free.put(None)
            raise TileProcessLost("the tile process was replaced")
        try:
            send_message(sock, request)
            status, value = receive_message(sock)
        except (EOFError, OSError) as exc:
            sock.close()
            raise TileProcessLost(str(exc)) from None
        except BaseException:
            sock.close()  # a half-read answer: this connection is of no further use
            raise
        self._free.put(sock)
        if status == "input_error":
            raise ImageError(*value)
        if status == "error":
            raise RuntimeError(f"tile process: {value}")
        return value

    def close(self) -> None:
        """End the process and its connections (after it was lost: a fresh one replaces it)."""
        self.process.kill()
        while True:
            try:
                self._free.get_nowait().close()
            except queue.Empty:
                break
        self._free.put(None)  # wakes whoever waits for a connection of this process
        self.process.wait()


def gevent_patched() -> bool:
    """Whether this process runs under gevent's monkey patching (gunicorn's gevent worker)."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return monkey.is_module_patched("threading")


class TileServer:
    """Encoded image tiles of jobs: cached, rendered off the request loop, bounded everywhere."""

    def __init__(self, threads: int, cache_bytes: int, open_inputs: int):
        self._threads, self._open_inputs = threads, open_inputs
        self._backend: _ThreadBackend | _ProcessBackend | None = None
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._cache_bytes, self._cached = cache_bytes, 0
        self._lock = threading.Lock()  # a greenlet lock under gevent: held only around dict work
        self.stats = {"hits": 0, "misses": 0}

    def tile(self, job_id: str, ref: InputRef, box: TileBox, key: tuple) -> bytes:
        """The JPEG of `box` of the job's input; `key` names it in the cache."""
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
                return data
            self.stats["misses"] += 1
        data = self._call(("render", job_id, ref, box))
        self._remember(key, data)
        return data

    def forget(self, job_id: str) -> None:
        """Close the job's input (a deleted job); its cached tiles age out of the LRU."""
        if self._backend is not None:
            self._call(("forget", job_id))

    def start(self) -> _ThreadBackend | _ProcessBackend:
        """Start the render threads or the tile process now (else on the first tile): the
        application factory does under gevent, so that no viewer waits for the tile
        process's imports (about a second) on its first tiles."""
        with self._lock:
            if self._backend is None:  # in the process that serves: after gunicorn forked
                backend = _ProcessBackend if gevent_patched() else _ThreadBackend
                self._backend = backend(self._threads, self._open_inputs)
            return self._backend

    def _call(self, request: tuple) -> Any:
        """Ask the backend; a tile process that died is replaced and asked once more."""
        backend = self._backend or self.start()
        try:
            return backend.call(request)
        except TileProcessLost:
            with self._lock:
                if self._backend is backend:
                    self._backend = None
            backend.close()
            return self.start().call(request)

    def _remember(self, key: tuple, data: bytes) -> None:
        if len(data) > self._cache_bytes:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = data
            self._cached += len(data)
            while self._cached > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)
