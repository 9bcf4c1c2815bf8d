"""``GET /health`` (liveness: never calls Ollama) and ``GET /ready`` (Ollama and the model)."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ...state import current_state
from ...version import __version__
from .schemas import Health, Readiness, UpstreamState

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    return jsonify(Health(status="ok", version=__version__).model_dump())


@bp.get("/ready")
def ready() -> Response:
    """200 while at least one upstream answers and has the model ("degraded" while the
    shared store does not answer: conversations then answer 503, the rest works); 503 when
    none does. With several upstreams, each is listed with its state."""
    state = current_state()
    reason, upstreams = state.readiness.check()
    trouble = state.readiness.check_store()
    body = Readiness(
        status="not_ready" if reason else "degraded" if trouble else "ready",
        model=state.settings.model,
        reason=reason or trouble or None,
        upstreams=[UpstreamState(upstream=name, status="not_ready" if why else "ready",
                                 reason=why or None) for name, why in upstreams]
        if len(upstreams) > 1 else None,
    )
    response = jsonify(body.model_dump(exclude_none=True))
    response.status_code = 503 if reason else 200
    return response
