"""Headers every answer carries at the edge: ``X-Content-Type-Options: nosniff`` everywhere,
and a Content-Security-Policy on the Swagger UI page (``/api/v1/docs``).

Why (issue 20): without ``nosniff`` a browser may guess that an artifact or an error body is
HTML and run it; the docs page is the one HTML page not rendered by ``api.routes.ui_routes``
(which sets its own policy), so it had none. Its one inline script (flask-smorest's start-up
of Swagger UI) is allowed by its hash, computed from the page as served, never by
``'unsafe-inline'``.
"""

from __future__ import annotations

import base64
import hashlib
import re

from flask import Flask, Response, request

DOCS_PATH = "/api/v1/docs"
_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)


def docs_policy(html: bytes) -> str:
    """The docs page's policy: its own scripts, plus its inline ones by sha256."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'" for body in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )


def _edge_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path.rstrip("/") == DOCS_PATH and response.mimetype == "text/html" and not response.is_streamed:
        response.headers["Content-Security-Policy"] = docs_policy(response.get_data())
    return response


def register_edge_headers(app: Flask) -> None:
    app.after_request(_edge_headers)
