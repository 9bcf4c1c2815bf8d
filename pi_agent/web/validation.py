"""Turn a request body into a pydantic model, or into a 400 or 422 in the error shape."""
from __future__ import annotations

import json
import logging
from typing import TypeVar

from flask import current_app, request
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..errors import (
    FieldProblem,
    InvalidRequest,
    PiAgentError,
    RequestTimeout,
    ValidationFailed,
)
from ..state import current_state
from .body_deadline import allowance, body_deadline

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

# A 422 names the failing fields, but a client chooses the names of unknown ones: bound both.
MAX_PROBLEMS = 20
MAX_FIELD_CHARS = 100


def parse_body(model: type[ModelT], any_content_type: bool = False) -> ModelT:
    """Read the JSON body of the current request as ``model``.

    ``any_content_type`` takes a JSON body whatever its Content-Type, as Ollama does: its
    clients (curl -d above all) often send none or the wrong one.

    :raise InvalidRequest: 400 for a body that is not JSON or not sent as JSON.
    :raise ValidationFailed: 422 naming each failing field, without echoing the input.
    :raise RequestEntityTooLarge: 413 for a body over the configured size.
    """
    if not request.is_json and not any_content_type:
        raise InvalidRequest()
    settings = current_state().settings
    raw = _read_body(current_app.config["MAX_CONTENT_LENGTH"], settings.body_timeout,
                     settings.body_min_rate)
    try:
        data = json.loads(raw.decode("utf-8"))  # JSON on the wire is UTF-8 (RFC 8259)
    except (ValueError, RecursionError):
        # ValueError covers bad JSON and bytes that are not UTF-8; RecursionError, deep nesting.
        raise InvalidRequest("the request body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)[:MAX_PROBLEMS]
        raise ValidationFailed([_describe(error) for error in errors]) from None


def _read_body(limit: int, timeout: float, min_rate: int) -> bytes:
    """Read at most ``limit`` bytes of body, or fail: never cut a body short silently, and
    never wait for it longer than its allowance (see body_deadline.py).

    werkzeug rejects a Content-Length over the limit itself, but it stops reading a chunked
    body at the limit without saying so; that body is read here from the raw input instead.

    :raise RequestTimeout: 408, the body did not arrive in time.
    """
    chunked = request.content_length is None and request.environ.get("wsgi.input_terminated")
    stream = request.input_stream if chunked else request.stream
    seconds = allowance(timeout, min_rate, request.content_length or limit)
    try:
        with body_deadline(request.environ, seconds):
            raw = stream.read(limit + 1)
    except (HTTPException, PiAgentError):
        raise
    except TimeoutError:
        raise RequestTimeout() from None
    except Exception as exc:
        # The WSGI server could not decode the body, e.g. a broken chunked encoding; each
        # server has its own exception for that (gunicorn: ParseException, IOError).
        logger.info("unreadable request body: %s", type(exc).__name__)
        raise InvalidRequest("the request body could not be read") from None
    if len(raw) > limit:
        raise RequestEntityTooLarge()
    return raw


def _describe(error: ErrorDetails) -> FieldProblem:
    field = ".".join(str(part) for part in error["loc"])[:MAX_FIELD_CHARS] or "body"
    return FieldProblem(field=field, problem=str(error["msg"]).removeprefix("Value error, "))
