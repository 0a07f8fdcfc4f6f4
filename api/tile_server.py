"""The viewer's image tiles, read on demand from the job's own input (issue 17).

Why: the input is immutable for the job's life, so a copy of it as a Deep Zoom pyramid (tens
of thousands of files per gigapixel job, written by the worker whether anyone looks or not)
buys nothing but storage and write time. The API opens the job's input with the readers the
worker uses (``shared.image_sources``), reads each tile's box from the best pyramid level,
resizes and encodes it when it is asked for, as OpenSlide's Deep Zoom server or QuPath do.

Three bounded things per API process make it cheap: a few open readers (opening a slide or
an ``s3://`` object costs round trips; each reader is read by one thread at a time), an LRU
of encoded tiles (by bytes), and a small pool of native threads for the decoding, resizing
and encoding. The pool matters under gevent (``make serve``): a greenlet that decoded a tile
itself would stall every other connection of its worker; here it waits on the pool's future
and the loop serves the others (Pillow, numpy and the codecs release the GIL meanwhile).
"""

from __future__ import annotations

import io
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from shared.image_sources.dzi_geometry import JPEG_QUALITY, TileBox, read_tile
from shared.image_sources.source_opener import open_image_source
from shared.image_sources.source_types import ImageSource

#: Part of every tile's ETag: bump it when the rendering changes (quality, filter).
RENDER_VERSION = "1"


def _gevent_patched() -> bool:
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return monkey.is_module_patched("threading")


def _native_lock():
    """A lock of the operating system: pool threads are native even under gevent, and a
    gevent lock must not be waited on from them."""
    if _gevent_patched():
        from gevent import monkey

        return monkey.get_original("threading", "Lock")()
    return threading.Lock()


def _make_pool(threads: int):
    """Native threads whose futures a greenlet can wait on without blocking its loop."""
    if _gevent_patched():
        from gevent.threadpool import ThreadPoolExecutor as GeventPool

        return GeventPool(max_workers=threads)
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tiles")


class _OpenInput:
    """One job's input, opened on first use and read by one pool thread at a time."""

    def __init__(self, opener: Callable[[], ImageSource]):
        self._opener = opener
        self._source: ImageSource | None = None
        self._lock = _native_lock()

    def tile(self, box: TileBox) -> bytes:
        with self._lock:
            if self._source is None:
                self._source = self._opener()
            pixels = read_tile(self._source, box)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()

    def close(self) -> None:
        with self._lock:
            if self._source is not None:
                self._source.close()
                self._source = None


class TileServer:
    """Encoded image tiles of jobs: cached, read off the request loop, bounded everywhere."""

    def __init__(self, threads: int, cache_bytes: int, open_inputs: int):
        self._pool = _make_pool(threads)
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._cache_bytes, self._cached = cache_bytes, 0
        self._inputs: OrderedDict[str, _OpenInput] = OrderedDict()
        self._max_inputs = open_inputs
        self._lock = threading.Lock()  # request side only (a greenlet lock under gevent)
        self.stats = {"hits": 0, "misses": 0}

    def tile(self, job_id: str, box: TileBox, key: tuple, opener: Callable[[], ImageSource]) -> bytes:
        """The JPEG of `box` of the job's input; `key` names it in the cache."""
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
                return data
            self.stats["misses"] += 1
            job_input = self._input(job_id, opener)
        data = self._pool.submit(job_input.tile, box).result()
        self._remember(key, data)
        return data

    def forget(self, job_id: str) -> None:
        """Close the job's input (a deleted job); its cached tiles age out of the LRU."""
        with self._lock:
            job_input = self._inputs.pop(job_id, None)
        if job_input is not None:
            self._pool.submit(job_input.close)

    def _input(self, job_id: str, opener: Callable[[], ImageSource]) -> _OpenInput:
        job_input = self._inputs.get(job_id)
        if job_input is None:
            job_input = self._inputs[job_id] = _OpenInput(opener)
            while len(self._inputs) > self._max_inputs:
                _, oldest = self._inputs.popitem(last=False)
                self._pool.submit(oldest.close)  # after the reads it is serving
        self._inputs.move_to_end(job_id)
        return job_input

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


def input_opener(settings: Any, storage: Any, image_key: str, image_url: str | None) -> Callable[[], ImageSource]:
    """How to open a job's input: its ``image_url`` in place, or the stored upload (a local
    path when storage is a folder, so OpenSlide can read it; its URL on object storage)."""
    limits = {"max_pixels": settings.max_image_pixels, "max_region_pixels": settings.max_region_pixels}
    if image_url:
        return lambda: open_image_source(image_url, endpoint_url=settings.s3_endpoint_url, **limits)
    local = storage.local_path(image_key)
    if local is not None:
        return lambda: open_image_source(local, **limits)
    url = storage.fs.unstrip_protocol(storage.path(image_key))
    return lambda: open_image_source(url, endpoint_url=settings.s3_endpoint_url, **limits)
