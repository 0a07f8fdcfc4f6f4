"""/api/v1/models: the catalogue (from sidecar files; no TensorFlow in the API)."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import authenticate
from api.schemas import ModelListSchema
from shared.catalog import model_status

blp = Blueprint("models", __name__, url_prefix="/api/v1/models", description="Models")
blp.before_request(authenticate)


@blp.route("")
class Models(MethodView):
    @blp.doc(operationId="listModels")
    @blp.response(200, ModelListSchema)
    def get(self):
        """Models you can name in a job: classes, native input size, output stride, preprocessing,
        and whether each can run here (`available`; `reason` when not: a job for it is refused)."""
        ctx = current_app.extensions["heatmaps"]
        catalog = ctx.catalog()
        return {
            "models": [model_status(info, ctx.settings.vgg16_weights) for info in catalog.models.values()],
            "problems": [{"file": name, "message": message} for name, message in sorted(catalog.problems.items())],
        }
