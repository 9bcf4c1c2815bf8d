"""``GET /health``: liveness only; it never calls the model server."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from . import __version__
from .schemas import Health

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    return jsonify(Health(status="ok", version=__version__).model_dump())
