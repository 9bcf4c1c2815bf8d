"""The native API described for people and tools: ``GET /openapi.json`` (OpenAPI 3.1), built
from the pydantic models the views validate and answer with (schemas.py: one source of
truth), and ``GET /docs``, Swagger UI from the flask-swagger-ui package's own files (no CDN:
a Pi may be offline). Both are public, as ``/health`` is: they describe, they serve nothing.
"""
from __future__ import annotations

import functools
from typing import Any

from flask import Blueprint, Flask, Response, jsonify
from flask_swagger_ui import get_swaggerui_blueprint
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ...version import __version__
from . import schemas

bp = Blueprint("openapi", __name__)

DOCS_PATH = "/docs"
SPEC_PATH = "/openapi.json"
REF = "#/components/schemas/{model}"

_ERRORS = {
    "400": "the body is not JSON, or not an object",
    "401": "no valid API key (with a key file)",
    "403": "this key may not use it, or a client on another machine without a key file",
    "404": "no such agent, conversation or turn",
    "409": "the conversation has a turn queued or running",
    "413": "the body is too large",
    "422": "the body does not fit the request's model (the fields say where)",
    "429": "a limit of the key, or the queue, is full (Retry-After says when to try again)",
    "502": "the model server failed",
    "503": "the model server, or the shared store, cannot be reached",
    "504": "the model server did not answer in time",
}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.register_blueprint(get_swaggerui_blueprint(
        DOCS_PATH, SPEC_PATH, config={"app_name": "Pi Agent Server"}))


@bp.get(SPEC_PATH)
def openapi() -> Response:
    return jsonify(build_document())


@functools.cache
def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the native API (made once: the models do not change)."""
    models: list[type[BaseModel]] = [
        schemas.ChatReply, schemas.Cancelled, schemas.ConversationList,
        schemas.ConversationTurns, schemas.Forgotten, schemas.Health, schemas.Readiness,
        schemas.AgentList, schemas.AgentInfo, schemas.ErrorBody, *schemas.EVENTS.values()]
    _, found = models_json_schema([(model, "serialization") for model in models],
                                  ref_template=REF)
    components = found.get("$defs", {})
    # The request as it is validated (its bounds), the rest as it is written.
    request_schema = schemas.ChatRequest.model_json_schema(ref_template=REF, mode="validation")
    components.update(request_schema.pop("$defs", {}))
    components["ChatRequest"] = request_schema
    return {
        "openapi": "3.1.0",
        "info": {"title": "Pi Agent Server", "version": __version__,
                 "description": "The native API. The OpenAI-compatible /v1 and the "
                                "Ollama-compatible /api fronts follow their own APIs "
                                "(docs/compatibility.md)."},
        "paths": _paths(),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        # With a key file, every route but /health, /openapi.json and /docs needs a key;
        # without one, none does (and only this machine is served).
        "security": [{"apiKey": []}, {"bearer": []}, {}],
    }


def _paths() -> dict[str, Any]:
    """Each native route: its answers' models, its errors, its event stream."""
    chat_body = {"required": True, "content": {"application/json": {"schema": _ref(
        schemas.ChatRequest)}}}
    conversation = {"name": "conversation_id", "in": "path", "required": True,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}}
    # NDJSON's heartbeat too (SSE's is a comment, which no schema shows).
    ping = {"title": "ping event", "type": "object",
            "properties": {"event": {"const": "ping"}}, "required": ["event"]}
    events = {"oneOf": [*(_event_schema(name, model) for name, model in schemas.EVENTS.items()),
                        ping]}
    return {
        "/health": {"get": {**_operation(
            "Liveness: the server answers (it never calls Ollama)", schemas.Health,
            errors=()), "security": []}},
        "/ready": {"get": _operation(
            "Readiness: an Ollama answers and has the model; each upstream's state",
            schemas.Readiness, errors=("401", "403", "503"))},
        "/agents": {"get": _operation("The agents' names", schemas.AgentList)},
        "/agents/{name}": {"get": {**_operation("One agent", schemas.AgentInfo,
                                                errors=("401", "403", "404")),
                                   "parameters": [{"name": "name", "in": "path",
                                                   "required": True,
                                                   "schema": {"type": "string"}}]}},
        "/chat": {"post": {**_operation(
            "Answer a message: whole (JSON), or streamed as plain text with "
            '"stream": true, or as events when Accept asks for text/event-stream or '
            "application/x-ndjson", schemas.ChatReply,
            errors=tuple(_ERRORS), stream={"text/plain": {"schema": {"type": "string"}},
                                           "text/event-stream": {"schema": events},
                                           "application/x-ndjson": {"schema": events}}),
            "requestBody": chat_body}},
        "/chat/stream": {"post": {**_operation(
            "Answer a message as an event stream: start, queued, route, sources, token, "
            "tool_call, tool_result, then one done or error; SSE unless Accept asks for "
            "NDJSON (a heartbeat, an SSE comment or {\"event\":\"ping\"}, while nothing "
            "else is sent)", None, errors=tuple(_ERRORS),
            stream={"text/event-stream": {"schema": events},
                    "application/x-ndjson": {"schema": events}}),
            "requestBody": chat_body}},
        "/chat/{conversation_id}/cancel": {"post": {**_operation(
            "Stop the turn running in a conversation, on whichever gateway runs it",
            schemas.Cancelled, errors=("401", "404", "503")),
            "parameters": [conversation]}},
        "/conversations": {"get": _operation("The key's conversations",
                                             schemas.ConversationList,
                                             errors=("401", "429", "503"))},
        "/conversations/{conversation_id}": {
            "get": {**_operation("A conversation's remembered turns",
                                 schemas.ConversationTurns, errors=("401", "404", "503")),
                    "parameters": [conversation]},
            "delete": {**_operation("Forget a conversation", schemas.Forgotten,
                                    errors=("401", "404", "503")),
                       "parameters": [conversation]}},
    }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _event_schema(name: str, model: type[BaseModel]) -> dict[str, Any]:
    """An event as NDJSON sends it (SSE sends the same data under ``event: <name>``)."""
    return {"title": f"{name} event", "allOf": [_ref(model), {
        "type": "object", "properties": {"event": {"const": name}}}]}


def _operation(summary: str, answer: type[BaseModel] | None,
               errors: tuple[str, ...] = ("401", "403", "429"),
               stream: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if answer is not None:
        content["application/json"] = {"schema": _ref(answer)}
    content.update(stream or {})
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    for status in errors:
        responses[status] = {"description": _ERRORS[status], "content": {
            "application/json": {"schema": _ref(schemas.ErrorBody)}}}
    return {"summary": summary, "responses": responses}
