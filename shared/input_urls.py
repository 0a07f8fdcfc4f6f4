"""Input by reference: which ``image_url`` values a job may read (``INPUT_URL_PREFIXES``).

Why a whitelist of prefixes: the worker reads the URL with the service's own credentials,
so an open ``image_url`` would let any client read any file or bucket the service can.
Only URLs that start with a configured prefix (after normalisation; no ``..`` segments,
no query strings, no credentials) are accepted; an empty list turns the feature off.

Why links are resolved (issue 20): the prefix check alone is textual, so a symbolic link (or a
linked folder) under a ``file://`` prefix that points outside would let a client read any file
the service can. For ``file://`` URLs the real path (every link resolved) must lie under the
real path of a prefix, at submission (`check_input_url`) and again when the worker opens the
file (`open_location`, which also answers `input_gone` for a file that has vanished).
"""

from __future__ import annotations

import os
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
    if not any(_under(normal, prefix.rstrip("/")) for prefix in prefixes):
        raise _not_allowed()
    if parts.scheme == "file" and _real_file_path(normal, prefixes) is None:
        raise _not_allowed()  # a link under a prefix that leads outside every prefix
    return normal


def open_location(url: str, prefixes: list[str]) -> str:
    """What the worker opens for an accepted `url`, checked again now (links may have changed
    since submission): for ``file://`` the resolved real path, which must still lie under a
    prefix and exist; other schemes as they are, when the object still exists.

    Raises InputError ``url_not_allowed`` (403) or ``input_gone`` (the file or object is gone).
    """
    normal = check_input_url(url, prefixes)
    if normal.startswith("file://"):
        real = _real_file_path(normal, prefixes)
        if real is None:
            raise _not_allowed()
        if not os.path.isfile(real):
            raise _gone()
        return real
    if not _remote_exists(normal):
        raise _gone()
    return normal


def _under(location: str, base: str) -> bool:
    return location == base or location.startswith(base + "/")


def _real_file_path(normal: str, prefixes: list[str]) -> str | None:
    """The real path of a ``file://`` URL when it lies under the real path of a file prefix."""
    real = os.path.realpath(normal[len("file://") :])
    for prefix in prefixes:
        if prefix.startswith("file://") and _under(real, os.path.realpath(prefix[len("file://") :]).rstrip("/")):
            return real
    return None


def _remote_exists(url: str) -> bool:
    """Whether an object store URL names an object; an unreachable store counts as present
    (opening it then fails as the transient fault it is, not as a vanished input)."""
    try:
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(url)
        return bool(filesystem.exists(path))
    except FileNotFoundError:
        return False
    except Exception:
        return True


def _not_allowed() -> InputError:
    return InputError(
        "url_not_allowed",
        "image_url is outside the locations this service may read (its INPUT_URL_PREFIXES); "
        "ask its operator to add the location, or upload the image",
    )


def _gone() -> InputError:
    return InputError("input_gone", "the job's image_url no longer exists; submit it again once it is back")
