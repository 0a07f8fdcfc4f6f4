"""gunicorn settings module (``gunicorn -c python:api.gunicorn_config``): gunicorn's own
refusals in the API's error envelope.

Why (issue 20): a request gunicorn refuses while parsing it (a control character in a header,
a request line over its limit, a path that is not ASCII) never reaches Flask, and gunicorn
answers it with an HTML page. gunicorn has no hook for these; every such answer goes through
``gunicorn.util.write_error``, which this module replaces (once, in the master, inherited by
the forked workers) with one that writes ``{"error": {"code", "message"}}`` with the same
status, ``nosniff``, and never the offending input. nginx maps its own refusals the same way
(docker/nginx.conf.template).
"""

from __future__ import annotations

import json

from gunicorn import util

#: (code, message) of each status gunicorn answers by itself.
REFUSALS = {
    400: ("bad_request", "the request could not be parsed (request line, a header, or its encoding)"),
    403: ("forbidden", "the request was refused"),
    414: ("uri_too_long", "the request line is too long"),
    417: ("expectation_failed", "the Expect header is not supported"),
    431: ("headers_too_large", "the request headers are too large"),
    501: ("not_implemented", "the transfer coding is not supported"),
}
INTERNAL = ("internal_error", "the server could not answer this request")


def json_error(status: int, reason: str) -> bytes:
    """The whole HTTP answer gunicorn writes for `status`, as the API's envelope."""
    code, message = REFUSALS.get(status, INTERNAL)
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"X-Content-Type-Options: nosniff\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """`gunicorn.util.write_error`'s signature; `mesg` (it echoes the input) is left out."""
    util.write_nonblock(sock, json_error(int(status_int), reason))


util.write_error = write_json_error
