"""Flask application factory for the heatmap job API.

flask --app api run                      # development
gunicorn 'api:create_app()'              # production (no TensorFlow in this process)
"""

from __future__ import annotations

import logging

from flask import Flask

from api.context import ApiContext
from api.edge_headers import register_edge_headers
from api.error_handlers import HeatmapApi, register_error_handlers
from api.schemas import document_limits
from api.tile_server import gevent_patched
from shared.settings import Settings, get_settings

log = logging.getLogger("heatmaps.api")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__, static_folder=None)  # artifacts are served only through the job routes
    app.config.update(
        HEATMAP_SETTINGS=settings,
        # Uploads above this are refused with 413 while reading, before anything is stored.
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + 64 * 1024,
        MAX_FORM_MEMORY_SIZE=settings.max_form_memory_kb * 1024,
        MAX_FORM_PARTS=settings.max_form_parts,
        API_TITLE="Heatmap jobs",
        API_VERSION="v1",
        OPENAPI_VERSION="3.1.0",  # nullable nested objects as anyOf [$ref, null]: typed in generated clients
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="/static/vendor/swagger-ui/",  # vendored (api/static/vendor): no CDN
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},  # the validator badge would call swagger.io
        API_SPEC_OPTIONS={
            "info": {"description": "Asynchronous heatmaps for large images from Keras classifiers."},
            "components": {"securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
            "security": [{"ApiKey": []}] if settings.api_keys else [],
        },
    )
    context = ApiContext(settings)
    app.extensions["heatmaps"] = context

    from api.routes import health, job_routes, metrics, model_routes, ui_routes, viewer_routes

    api = HeatmapApi(app)
    app.extensions["heatmap_api"] = api
    document_limits(api, settings)
    api.register_blueprint(job_routes.blp)
    api.register_blueprint(model_routes.blp)
    api.register_blueprint(viewer_routes.blp)
    app.register_blueprint(ui_routes.bp)
    app.register_blueprint(health.bp)
    context.metrics_registry = metrics.make_registry(context)
    register_error_handlers(app)
    register_edge_headers(app)
    if gevent_patched():
        context.tiles.start()  # the tile process imports while the worker starts up
    if not settings.api_keys:
        log.warning("API_KEYS is empty: the API is in OPEN MODE (no authentication, all jobs shared)")
    return app
