"""Errors as Ollama words them: ``{"error": "..."}``, under ``/api`` and on ``/``."""
from __future__ import annotations

from flask import Response, jsonify

from ...errors import PiAgentError, ValidationFailed
from ...providers.ollama_replies import OllamaErrorBody


def owns(path: str) -> bool:
    return path == "/" or path.startswith("/api/")


def render_error(error: PiAgentError) -> Response:
    status = error.code or 500
    message = error.summary() if isinstance(error, ValidationFailed) else error.description
    response = jsonify(OllamaErrorBody(error=message).model_dump())
    response.status_code = 400 if status == 422 else status  # Ollama has no 422 either
    return response
