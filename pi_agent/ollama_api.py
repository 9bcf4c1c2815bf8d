"""The Ollama-compatible API: Ollama's own routes, relayed to the upstream Ollama.

Ollama clients pointed at the gateway get Ollama's exact answers: its status codes, its
error bodies, its NDJSON framing streamed as it comes (one object per line). Generations
(``/api/chat``, ``/api/generate``) go through the same admission control, cancellation,
timeouts and watchdog as ``/chat``, and get the configured ``num_predict`` cap, ``num_ctx``
and ``keep_alive`` unless they set their own (a lower ``num_predict`` only). Model
management is refused: a chat gateway must not let its clients fill or wipe the disk.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request
from pydantic import BaseModel, ConfigDict, StrictBool

from .errors import InvalidRequest, ModelManagementRefused, ProviderError
from .providers.base import Forwarded
from .schemas import OllamaErrorBody
from .state import current_state
from .streaming import StreamBody, TurnWatch, client_probe
from .turns import STOPPED, WatchedTurn
from .validation import parse_body

bp = Blueprint("ollama", __name__)

# Ollama's model management routes and their methods.
MANAGEMENT_ROUTES = {
    "/api/pull": ["POST"], "/api/push": ["POST"], "/api/create": ["POST"],
    "/api/copy": ["POST"], "/api/delete": ["DELETE"], "/api/blobs/<path:digest>": ["HEAD", "POST"],
}


class GenerationRequest(BaseModel):
    """``/api/chat`` and ``/api/generate``: only what the gateway reads is checked; every
    other field goes to Ollama as it came."""

    model_config = ConfigDict(extra="allow")

    stream: StrictBool | None = None
    options: dict[str, Any] | None = None
    keep_alive: int | float | str | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    name: str | None = None  # the old name of "model"


@bp.route("/", methods=["GET", "HEAD"])
def root() -> Response:
    return _relay_whole(request.method, "/")


@bp.get("/api/version")
@bp.get("/api/tags")
@bp.get("/api/ps")
def read_only() -> Response:
    return _relay_whole("GET", request.path)


@bp.post("/api/show")
def show() -> Response:
    body = parse_body(ShowRequest, any_content_type=True)
    return _relay_whole("POST", "/api/show", _encode(_given(body)))


@bp.post("/api/chat")
@bp.post("/api/generate")
def generate() -> Response:
    """Relay one generation, streamed unless ``"stream": false``, as Ollama's default is."""
    body = parse_body(GenerationRequest, any_content_type=True)
    state = current_state()
    settings = state.settings
    payload = _given(body)
    options = dict(body.options or {})
    num_predict = options.get("num_predict", -1)
    if not isinstance(num_predict, int) or isinstance(num_predict, bool):
        raise InvalidRequest("options.num_predict must be a whole number",
                             param="options.num_predict")
    # -1 (Ollama's default) means no limit: the configured cap is the limit then.
    options["num_predict"] = settings.num_predict if num_predict < 0 else min(
        num_predict, settings.num_predict)
    options.setdefault("num_ctx", settings.num_ctx)  # another num_ctx reloads the model
    payload["options"] = options
    payload.setdefault("keep_alive", settings.keep_alive)
    streamed = body.stream is not False
    data = _encode(payload)

    turn = WatchedTurn(state, "ollama-" + uuid.uuid4().hex, client_probe(request.environ))
    relaying = False
    try:
        watch = turn.begin()
        upstream = turn.run(lambda abort: state.provider.forward(
            "POST", request.path, data, wait="stream" if streamed else "whole", abort=abort))
        relaying = True

        def finish() -> None:
            upstream.close()
            turn.release()

        return Response(
            StreamBody(_relay_pieces(upstream, watch, lines=streamed), finish),
            status=upstream.status, content_type=upstream.content_type,
            headers={"X-Accel-Buffering": "no"} if streamed else {},
            direct_passthrough=True,
        )
    finally:
        # A relayed body gives its slot back when it is closed, after the upstream is.
        if not relaying:
            turn.release()


def refuse_management(digest: str = "") -> Response:
    raise ModelManagementRefused()


for _rule, _methods in MANAGEMENT_ROUTES.items():
    bp.add_url_rule(_rule, "refuse_management", refuse_management, methods=_methods)


def _relay_whole(method: str, path: str, body: bytes | None = None) -> Response:
    """Relay a request that does not generate: its answer is small and comes at once."""
    upstream = current_state().provider.forward(method, path, body)
    try:
        content = b"".join(upstream)
    finally:
        upstream.close()
    return Response(content, status=upstream.status, content_type=upstream.content_type)


def _relay_pieces(upstream: Forwarded, watch: TurnWatch, lines: bool) -> Iterator[bytes]:
    """Yield Ollama's body as it comes. A failure after the status went out is told as
    Ollama tells it in a stream: one more line, ``{"error": "..."}``. A single JSON body
    cut short just ends: a line after half an object would not make it JSON either."""
    finished = False
    try:
        for piece in upstream:
            watch.last_chunk = watch.last_write = time.monotonic()
            # Ollama writes compact JSON, one object per piece: the last one says this.
            finished = finished or b'"done":true' in piece
            # A client that reads slowly holds the write up; that is not Ollama idling.
            watch.writing = True
            yield piece
            watch.writing = False
    except ProviderError as exc:
        reason = watch.abort.reason if watch.abort.requested else ""
        if reason == "client_gone" or not lines or finished:
            # The reply is whole when only the end of its body failed.
            return
        error = STOPPED[reason]() if reason in STOPPED else exc
        yield OllamaErrorBody(error=error.description).model_dump_json().encode() + b"\n"


def _given(body: BaseModel) -> dict[str, Any]:
    """The fields of a body as the client sent them, the unknown ones included."""
    return {name: value for name, value in body if name in body.model_fields_set}


def _encode(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload).encode()
    except (ValueError, RecursionError):  # nesting deep enough to pass json.loads only
        raise InvalidRequest("the request body is nested too deeply") from None
