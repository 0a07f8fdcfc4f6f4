"""/api/v1/models: the catalogue (from sidecar files; no TensorFlow in the API)."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import authenticate
from api.schemas import ModelListSchema

blp = Blueprint("models", __name__, url_prefix="/api/v1/models", description="Models")
blp.before_request(authenticate)


@blp.route("")
class Models(MethodView):
    @blp.doc(operationId="listModels")
    @blp.response(200, ModelListSchema)
    def get(self):
        """Models you can name in a job: classes, native input size, output stride, preprocessing."""
        catalog = current_app.extensions["heatmaps"].catalog()
        return {
            "models": [info.public() for info in catalog.models.values()],
            "problems": [{"file": name, "message": message} for name, message in sorted(catalog.problems.items())],
        }
