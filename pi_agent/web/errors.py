"""The one error handler: every error raised while serving a request, ours and werkzeug's,
is rendered by the renderer of the front that was called, in that API's shape (each front
has its own: web/native/errors.py, web/openai/errors.py, web/ollama/errors.py). Clients get
a stable code and message; tracebacks, upstream URLs and exception texts go to the log only.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..errors import PiAgentError
from .client_socket import client_closer

logger = logging.getLogger(__name__)

# Renders one error as a response in one API's shape.
Renderer = Callable[[PiAgentError], Response]
# Whether a request path belongs to a front.
Owns = Callable[[str], bool]

# Status codes werkzeug raises by itself, given codes in our shape.
_WERKZEUG_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def init_app(app: Flask, fronts: Sequence[tuple[Owns, Renderer]], default: Renderer) -> None:
    """Render every error raised in ``app`` with the renderer of the first front that owns
    the request's path, else with ``default``: also a 404 for a path no route has."""

    def render(exc: PiAgentError | HTTPException) -> Response:
        error = exc if isinstance(exc, PiAgentError) else _as_ours(exc)
        path = request.path
        renderer = next((render for owns, render in fronts if owns(path)), default)
        response = renderer(error)
        # Keep what werkzeug or the error set for this status: Allow on a 405, Retry-After...
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        if error.close_connection or response.status_code == 413:
            # The body, or the rest of it, may still be on its way: the connection must not
            # read it as the next request, nor wait for it.
            close = client_closer(request.environ, socket.SHUT_WR)
            if close is not None:
                response.call_on_close(close)
        return response

    def render_unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error")
        return render(PiAgentError())

    app.register_error_handler(PiAgentError, render)
    app.register_error_handler(HTTPException, render)
    app.register_error_handler(Exception, render_unexpected)


def _as_ours(exc: HTTPException) -> PiAgentError:
    """A werkzeug error (404, 405, 413, ...) with a code in our style."""
    error = PiAgentError(exc.description or exc.name.lower())
    error.code = exc.code or 500
    error.error_code = _WERKZEUG_CODES.get(error.code, f"http_{error.code}")
    return error
