"""Errors as OpenAI's API words them: ``{"error": {"message", "type", "param", "code"}}``,
as a response or as an event in a stream."""
from __future__ import annotations

from flask import Response, jsonify

from ...errors import PiAgentError, ProviderTimeout, TurnCancelled, ValidationFailed
from .schemas import OpenAIError, OpenAIErrorBody


def owns(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def openai_error(exc: PiAgentError) -> OpenAIErrorBody:
    """The error as OpenAI's API words it, for a response or for an event in a stream."""
    status = exc.code or 500
    message = exc.summary() if isinstance(exc, ValidationFailed) else exc.description
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    elif status == 401:
        kind, code = "invalid_request_error", "invalid_api_key"
    elif status >= 500:
        kind, code = "server_error", exc.error_code
    else:
        kind, code = "invalid_request_error", exc.error_code
    return OpenAIErrorBody(error=OpenAIError(message=message, type=kind, param=exc.param,
                                             code=code))


def render_error(error: PiAgentError) -> Response:
    status = error.code or 500
    response = jsonify(openai_error(error).model_dump())
    # OpenAI has no 422: its SDKs expect a 400 for a body that fails validation.
    response.status_code = 400 if status == 422 else status
    if isinstance(error, (TurnCancelled, ProviderTimeout)):
        # OpenAI's SDKs retry a 409 and a 5xx: a cancel must stick, and a turn that
        # ran out of time would only take as long again.
        response.headers["x-should-retry"] = "false"
    return response
