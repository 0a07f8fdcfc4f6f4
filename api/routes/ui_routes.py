"""The web page at `/`: submit an image, list jobs, follow one and explore its heatmaps in a
deep-zoom viewer.

Only HTML, JavaScript and CSS are served here, without a key: every piece of data comes from
the keyed /api/v1 routes, called by the page with the `X-API-Key` header it keeps in
`sessionStorage`. There is no cookie session, so the page can never see more than its key.
Every asset (OpenSeadragon, Swagger UI) is vendored in `api/static/`: an offline browser
shows the whole page.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, current_app, render_template

from shared.jobs.job_status import ACTIVE, JobStatus
from shared.jobspec import FORM_FIELDS

API_DIR = Path(__file__).resolve().parent.parent  # api/: its templates/ and static/ (not api/routes/)
bp = Blueprint(
    "ui", __name__, template_folder=API_DIR / "templates", static_folder=API_DIR / "static", static_url_path="/static"
)

#: The pages talk to this service only (the browser tests check it too).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def page_config() -> dict:
    """What the page needs before its first API call: whether a key is needed, the form's
    fields with their limits (from the one list in shared.jobspec and the settings)."""
    settings = current_app.config["HEATMAP_SETTINGS"]
    maxima = {"batch_size": settings.max_batch_size, "top_k": settings.max_top_k}
    fields = [
        {
            "name": field.name,
            "type": field.type,
            "description": field.description,
            "choices": list(field.choices) if field.choices else None,
            "default": field.default,
            "minimum": field.minimum,
            "maximum": maxima.get(field.name),
        }
        for field in FORM_FIELDS
    ]
    return {
        "auth_required": bool(settings.key_hashes),
        "fields": fields,
        "max_upload_mb": settings.max_upload_mb,
        "default_model": settings.default_model,
        "statuses": [status.value for status in JobStatus],
        "active_statuses": sorted(status.value for status in ACTIVE),
        "status_succeeded": JobStatus.succeeded.value,
    }


def _page(template: str, **values):
    response = current_app.make_response(render_template(template, config=page_config(), **values))
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/")
def submit_page():
    """Submit an image."""
    return _page("submit.html", page="submit")


@bp.get("/jobs")
def jobs_page():
    """Your jobs, newest first."""
    return _page("jobs.html", page="jobs")


@bp.get("/jobs/<string:job_id>")
def job_page(job_id: str):
    """One job: progress, then the viewer. The id is checked by the API, with the key."""
    return _page("job.html", page="job", job_id=job_id)
