"""Liveness, readiness and Prometheus metrics (outside /api/v1: no API key needed)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.routes.metrics import check_scrape_auth
from shared.jobs.database import session_scope

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process is up."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """The database and Redis answer; 503 with what is down otherwise."""
    ctx = current_app.extensions["heatmaps"]
    checks = {}
    try:
        with session_scope(ctx.settings.resolved_database_url) as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"down: {type(exc).__name__}"
    try:
        ctx.redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"down: {type(exc).__name__}"
    if all(value == "ok" for value in checks.values()):
        response = jsonify({"status": "ready", "checks": checks})
        if ctx.settings.instance_token:  # lets the dev stack know it is talking to its own API
            response.headers["X-Heatmaps-Instance"] = ctx.settings.instance_token
        return response
    down = ", ".join(name for name, value in checks.items() if value != "ok")
    response = jsonify({"error": {"code": "not_ready", "message": f"unavailable: {down}"}, "checks": checks})
    response.status_code = 503
    return response


@bp.get("/metrics")
def metrics():
    """Prometheus text format: job outcomes, durations, tiles per second; jobs by status, queue depth."""
    context = current_app.extensions["heatmaps"]
    check_scrape_auth(context.settings, request.headers.get("Authorization"))
    registry = context.metrics_registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
