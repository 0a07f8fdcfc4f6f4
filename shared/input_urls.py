"""Input by reference: which ``image_url`` values a job may read (``INPUT_URL_PREFIXES``).

Why a whitelist of prefixes: the worker reads the URL with the service's own credentials,
so an open ``image_url`` would let any client read any file or bucket the service can.
Only URLs that start with a configured prefix (after normalisation; no ``..`` segments,
no query strings, no credentials) are accepted; an empty list turns the feature off.
"""

from __future__ import annotations

import posixpath
from urllib.parse import urlsplit

from shared.exceptions import InputError

#: The job row keeps the URL in its image_key column (500 characters).
MAX_URL_LENGTH = 500
#: Schemes fsspec reads by region that make sense as job input.
SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs", "http", "https")


def check_input_url(url: str, prefixes: list[str]) -> str:
    """The normalised URL when it is allowed; InputError (400/403) otherwise."""
    if not prefixes:
        raise InputError(
            "image_url_disabled",
            "image_url is off on this service: upload the image instead, or have its operator set "
            "INPUT_URL_PREFIXES to the locations it may read (e.g. file:///data/slides,s3://bucket/slides)",
        )
    text = (url or "").strip()
    if not text or len(text) > MAX_URL_LENGTH:
        raise InputError("invalid_image_url", f"image_url must be a URL of at most {MAX_URL_LENGTH} characters")
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES or not (parts.netloc or parts.scheme == "file"):
        raise InputError("invalid_image_url", f"image_url must be one of {', '.join(s + '://' for s in SCHEMES)}")
    if parts.query or parts.fragment or "@" in parts.netloc or "\\" in text or "\x00" in text:
        raise InputError("invalid_image_url", "image_url must not carry credentials, a query or a fragment")
    if any(segment in ("..", ".") for segment in parts.path.split("/")):
        raise InputError("invalid_image_url", "image_url must not contain '.' or '..' segments")
    normal = f"{parts.scheme}://{parts.netloc}{posixpath.normpath(parts.path) if parts.path else ''}"
    for prefix in prefixes:
        base = prefix.rstrip("/")
        if normal == base or normal.startswith(base + "/"):
            return normal
    raise InputError(
        "url_not_allowed",
        "image_url is outside the locations this service may read (its INPUT_URL_PREFIXES); "
        "ask its operator to add the location, or upload the image",
    )
