"""Every error the API returns has the same shape: ``{"error": {"code", "message"}}``.

Views raise `ApiError`; werkzeug's HTTP errors (404, 405, 413 ...) and webargs' validation
errors are rewritten into that shape; a database or broker outage is a 503, never a 500; a
value the database refuses (psycopg's DataError: a NUL byte, an out-of-range number) is a 400.
Every message is capped and stripped of server paths (`shared.error_text`).
"""

from __future__ import annotations

import logging

import marshmallow as ma
from flask import jsonify
from flask_smorest import Api
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from shared.error_text import public_message
from shared.exceptions import InputError

log = logging.getLogger("heatmaps.api")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}


#: HTTP status of each bad-input code (shared.exceptions.InputError and its subclasses:
#: image, catalogue and parameter errors); a code not listed is a 400.
INPUT_ERROR_STATUS = {
    "unsupported_format": 415,
    "multi_frame": 415,
    "too_many_pixels": 413,
    "payload_too_large": 413,
    "image_too_small": 422,
    # large-image path (shared.image_sources, shared.input_urls)
    "tile_too_large": 413,
    "sparse_image": 422,
    "grid_too_large": 413,
    "no_resolution": 422,
    "image_url_disabled": 403,
    "url_not_allowed": 403,
    "url_unreadable": 422,
    "input_gone": 409,
    # viewer tiles read from a job's input (api.tile_server)
    "input_unavailable": 410,
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class ErrorBodySchema(ma.Schema):
    code = ma.fields.String(required=True, metadata={"description": "stable machine-readable code"})
    message = ma.fields.String(required=True, metadata={"description": "what went wrong, for people"})


class ErrorSchema(ma.Schema):
    error = ma.fields.Nested(ErrorBodySchema, required=True)


def error_response(status: int, code: str, message: str, headers: dict | None = None):
    response = jsonify({"error": {"code": code, "message": public_message(message)}})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


class HeatmapApi(Api):
    """flask-smorest's Api with our error envelope (documented as the default response)."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException):
        status = error.code or 500
        data = getattr(error, "data", None) or {}
        message = data.get("message") or error.description or error.name
        messages = data.get("messages") or data.get("errors")
        if messages:  # webargs validation errors: name the fields
            status = 400
            message = "; ".join(_flatten(messages)) or message
        code = "invalid_parameter" if messages else _CODES.get(status, "error")
        headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}  # e.g. Allow on 405
        headers.update(data.get("headers") or {})
        return error_response(status, code, str(message), headers)


def _flatten(messages, prefix="") -> list[str]:
    out = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key in ("json", "form", "query", "files", "headers", "view_args"):
                out.extend(_flatten(value, prefix))
            else:
                out.extend(_flatten(value, f"{prefix}{key}: "))
    elif isinstance(messages, (list, tuple)):
        for value in messages:
            out.extend(_flatten(value, prefix))
    else:
        out.append(f"{prefix}{messages}")
    return out


def register_error_handlers(app) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        return error_response(error.status, error.code, error.message, error.headers)

    @app.errorhandler(InputError)
    def _input_error(error: InputError):
        return error_response(INPUT_ERROR_STATUS.get(error.code, 400), error.code, error.message)

    @app.errorhandler(DataError)
    def _bad_value(error):  # more specific than DBAPIError: Flask picks it first
        log.info("database refused a value: %s", str(error).splitlines()[0][:200])
        return error_response(400, "invalid_parameter", "a value in the request is not acceptable")

    @app.errorhandler(OperationalError)
    @app.errorhandler(DBAPIError)
    def _database_down(error):
        log.warning("database unavailable: %s", str(error).splitlines()[0])
        return error_response(
            503, "database_unavailable", "the database is unavailable; try again shortly", {"Retry-After": "5"}
        )

    @app.errorhandler(RedisError)
    def _redis_down(error):
        log.warning("redis unavailable: %s", error)
        return error_response(
            503, "broker_unavailable", "the broker is unavailable; try again shortly", {"Retry-After": "5"}
        )

    @app.errorhandler(Exception)
    def _unexpected(error):
        if isinstance(error, HTTPException):
            return app.extensions["heatmap_api"].handle_http_exception(error)
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
