"""Parsing the multipart submission with the schema that documents it.

webargs reads form fields and files from two separate locations; a submission is one
multipart body, so this parser's ``files`` location (documented by flask-smorest as a
``multipart/form-data`` request body) yields both, and `api.schemas.SubmitSchema` validates
them together. The shape of the body is checked here first, with its own error codes.
"""

from __future__ import annotations

from webargs.flaskparser import FlaskParser

from api.error_handlers import ApiError
from api.schemas import IMAGE_FIELD


class MultipartParser(FlaskParser):
    """A FlaskParser whose ``files`` location is the whole multipart body."""

    DEFAULT_VALIDATION_STATUS = 400

    def load_files(self, req, schema):
        """Form fields and the one image as a flat mapping; the body's shape is checked on the
        way (415 not multipart; 400 unexpected_field, missing_image, multiple_images, repeats)."""
        if not (req.mimetype or "").startswith("multipart/form-data"):
            raise ApiError(
                415, "unsupported_media_type", f"send the image as multipart/form-data with an '{IMAGE_FIELD}' field"
            )
        files = req.files  # parses the body; werkzeug enforces the size, field and part limits (413)
        unexpected = [name for name in files if name != IMAGE_FIELD]
        if unexpected:
            raise ApiError(400, "unexpected_field", f"unexpected file field {str(unexpected[0])[:50]!r}")
        images = files.getlist(IMAGE_FIELD)
        if not images:
            raise ApiError(400, "missing_image", f"the '{IMAGE_FIELD}' file field is required")
        if len(images) > 1:
            raise ApiError(400, "multiple_images", f"send exactly one '{IMAGE_FIELD}' per job")
        allowed = set(schema.fields) - {IMAGE_FIELD}
        unknown = [name for name in req.form if name not in allowed]
        if unknown:
            raise ApiError(400, "unexpected_field", f"unknown form field {str(unknown[0])[:50]!r}")
        for name in req.form:
            if len(req.form.getlist(name)) > 1:
                raise ApiError(400, "invalid_parameter", f"form field {name[:50]!r} given more than once")
        return {**req.form.to_dict(), IMAGE_FIELD: images[0]}
