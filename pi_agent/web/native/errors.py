"""Errors in the project's own shape: ``{"error": {"code": "...", "message": "..."}}``, plus
``"fields"`` naming each failing field of a body that failed validation."""
from __future__ import annotations

from flask import Response, jsonify

from ...errors import PiAgentError, ValidationFailed
from .schemas import ErrorBody, ErrorDetail


def render_error(error: PiAgentError) -> Response:
    fields = error.fields if isinstance(error, ValidationFailed) else None
    body = ErrorBody(error=ErrorDetail(code=error.error_code, message=error.description,
                                       fields=fields))
    response = jsonify(body.model_dump(mode="json", exclude_none=True))
    response.status_code = error.code or 500
    return response
