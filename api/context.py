"""What the views share, built once per application: settings, storage, the model
catalogue, a Redis client and the viewer's tile server."""

from __future__ import annotations

import threading

import redis

from api.tile_server import TileServer
from shared.catalog import ModelCatalog, catalog_fingerprint
from shared.settings import Settings
from shared.storage import Storage


class ApiContext:
    """What the views share: settings, storage, the model catalogue, a Redis client."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.storage = Storage.from_settings(settings)
        self._catalog: ModelCatalog | None = None
        self._catalog_fingerprint: tuple = ()
        self._lock = threading.Lock()
        self._redis = (
            redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=2)
            if settings.redis_url
            else None
        )
        self.metrics_registry = None
        self.tiles = TileServer(settings.tile_threads, settings.tile_cache_mb * 2**20, settings.tile_open_sources)

    def catalog(self) -> ModelCatalog:
        """Re-scanned whenever the model folders change (the workers do the same), so that
        a model dropped into MODELS_DIR is accepted at once and a removed one refused."""
        fingerprint = catalog_fingerprint(self.settings.model_dirs)
        with self._lock:
            if self._catalog is None or fingerprint != self._catalog_fingerprint:
                self._catalog = ModelCatalog(self.settings.model_dirs)
                self._catalog_fingerprint = fingerprint
            return self._catalog

    def redis(self) -> redis.Redis:
        if self._redis is None:
            raise redis.ConnectionError("REDIS_URL is not configured")
        return self._redis
