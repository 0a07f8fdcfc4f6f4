"""API keys: ``X-API-Key: <key>`` (or ``Authorization: Bearer <key>``).

Keys are configured as ``name:sha256(key)`` so the service never stores a key itself. With
keys configured every /api/v1 route needs one (401 without, 403 for an unknown one) and a
job belongs to the key that created it; with none configured the service runs in open mode
(and says so at start) and every job belongs to the anonymous owner "".
"""

from __future__ import annotations

import hmac

from flask import current_app, g, request

from api.error_handlers import ApiError
from shared.settings import hash_api_key

ANONYMOUS = ""


def presented_key() -> str | None:
    key = request.headers.get("X-API-Key")
    if key:
        return key
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def authenticate() -> None:
    """before_request for the /api/v1 blueprints: sets g.owner or raises 401/403."""
    hashes = current_app.config["HEATMAP_SETTINGS"].key_hashes
    if not hashes:
        g.owner = ANONYMOUS
        return
    key = presented_key()
    if not key:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required (X-API-Key header)",
            {"WWW-Authenticate": 'Bearer realm="heatmaps"'},
        )
    digest = hash_api_key(key)
    for known, name in hashes.items():
        if hmac.compare_digest(known, digest):
            g.owner = name
            return
    raise ApiError(403, "forbidden", "this API key is not valid")
