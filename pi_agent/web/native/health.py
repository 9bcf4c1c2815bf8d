"""``GET /health`` (liveness: never calls Ollama) and ``GET /ready`` (Ollama and the model)."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ...state import current_state
from ...version import __version__
from .schemas import Health, Readiness

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    return jsonify(Health(status="ok", version=__version__).model_dump())


@bp.get("/ready")
def ready() -> Response:
    state = current_state()
    reason = state.readiness.check()
    body = Readiness(
        status="not_ready" if reason else "ready",
        model=state.settings.model,
        reason=reason or None,
    )
    response = jsonify(body.model_dump(exclude_none=True))
    response.status_code = 503 if reason else 200
    return response
