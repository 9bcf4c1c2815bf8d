"""Errors that know their HTTP status, and the one handler that renders every error as JSON.

Every error body has one shape: ``{"error": {"code": "...", "message": "..."}}``, plus
``"fields"`` for a validation failure. Clients get a stable code and message; tracebacks,
upstream URLs and exception texts go to the log only.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from .schemas import ErrorBody, ErrorDetail, FieldProblem

logger = logging.getLogger(__name__)


class PiAgentError(HTTPException):
    """Base of the server's own errors: an HTTP status, a stable code and a message."""

    code = 500
    error_code = "internal_error"
    description = "internal server error"

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description)


class InvalidRequest(PiAgentError):
    """The body is not JSON, or not sent as JSON; fix the request before retrying."""

    code = 400
    error_code = "invalid_request"
    description = "the request body must be JSON sent with Content-Type: application/json"


class ValidationFailed(PiAgentError):
    """The JSON is well formed but a field is missing, of the wrong type or out of range."""

    code = 422
    error_code = "validation_error"
    description = "the request body failed validation"

    def __init__(self, fields: list[FieldProblem]) -> None:
        super().__init__()
        self.fields = fields


class AgentNotFound(PiAgentError):
    """No agent preset has that name; ``GET /agents`` lists the ones there are."""

    code = 404
    error_code = "agent_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown agent {name!r}: GET /agents lists the agents")


class TurnNotRunning(PiAgentError):
    """No turn of that conversation is queued or running, so none can be cancelled."""

    code = 404
    error_code = "turn_not_running"
    description = "no turn of this conversation is running"


class TurnCancelled(PiAgentError):
    """The turn was cancelled (``POST /chat/<id>/cancel``) before its reply started."""

    code = 409
    error_code = "cancelled"
    description = "the turn was cancelled"


class ServerShuttingDown(PiAgentError):
    """The server is shutting down and ended the turn; send it again in a moment."""

    code = 503
    error_code = "server_shutting_down"
    description = "the server is shutting down; send the turn again in a moment"


class ConversationBusy(PiAgentError):
    """The conversation has a turn queued or running; retry once that one has ended."""

    code = 409
    error_code = "conversation_busy"
    description = "this conversation has a turn in progress: wait for it to end"


class QueueFull(PiAgentError):
    """Every generation slot is taken and the wait queue is full; retry after Retry-After."""

    code = 429
    error_code = "queue_full"
    description = "the server is busy: every generation slot is taken and the queue is full"

    def __init__(self, retry_after: int) -> None:
        super().__init__()
        self.retry_after = retry_after

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [*super().get_headers(*args, **kwargs), ("Retry-After", str(self.retry_after))]


class ClientGone(PiAgentError):
    """The client closed its connection while its request waited; nobody reads the answer."""

    code = 499  # nginx's "client closed request", so that the access log says what happened
    error_code = "client_closed_request"
    description = "the client closed the connection"


class ProviderError(PiAgentError):
    """The model provider failed; the subclasses say how."""

    code = 502
    error_code = "upstream_error"
    description = "the model server answered with an error"


class UpstreamError(ProviderError):
    """The model server answered with an error status or an error line; retrying may help."""


class UpstreamProtocolError(ProviderError):
    """The model server's answer was broken: bad JSON, or a stream cut before its end."""

    error_code = "upstream_protocol_error"
    description = "the model server sent a broken or incomplete answer"


class ModelNotFound(ProviderError):
    """The model is not installed on the model server; pull it, then retry."""

    error_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is not installed in Ollama: run `ollama pull {model}`")


class ProviderUnavailable(ProviderError):
    """The model server cannot be reached; safe to retry once it runs."""

    code = 503
    error_code = "upstream_unavailable"
    description = "the model server is not reachable: is Ollama running?"


class ProviderTimeout(ProviderError):
    """The model server took longer than the configured timeout; safe to retry."""

    code = 504
    error_code = "upstream_timeout"
    description = "the model server did not answer in time"


# Status codes werkzeug raises by itself, given codes in our shape.
_WERKZEUG_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def register_error_handlers(app: Flask) -> None:
    """Render every error raised in ``app``, ours and werkzeug's, as one JSON shape."""
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(Exception, _render_unexpected_error)


def error_response(status: int, code: str, message: str, **extra: Any) -> Response:
    """Build the JSON error response that every route uses."""
    body = ErrorBody(error=ErrorDetail(code=code, message=message, **extra))
    response = jsonify(body.model_dump(mode="json", exclude_none=True))
    response.status_code = status
    return response


def _render_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if isinstance(exc, ValidationFailed):
        response = error_response(status, exc.error_code, exc.description, fields=exc.fields)
    elif isinstance(exc, PiAgentError):
        response = error_response(status, exc.error_code, exc.description)
    else:
        code = _WERKZEUG_CODES.get(status, f"http_{status}")
        response = error_response(status, code, exc.description or exc.name.lower())
    # Keep what werkzeug set for this status, such as Allow on a 405.
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _render_unexpected_error(exc: Exception) -> Response:
    logger.exception("unhandled error")
    return error_response(500, "internal_error", "internal server error")
