"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``POST /v1/embeddings``,
``GET /v1/models[/<id>]``.

Requests are mapped onto Ollama's ``/api/chat`` and answered in OpenAI's wire format
(shared/protocols/openai-chat.md), through the same admission control, cancellation,
timeouts and watchdog as ``/chat``. ``model`` names an Ollama model, or an agent preset as
``agent:<name>``. Without an ``X-Conversation-Id`` header the endpoint is stateless, as
OpenAI's is; with one, the conversation's remembered turns go before the messages and the
new turn is remembered. Embeddings go to Ollama's ``/api/embed`` (see embeddings.py),
in a generation slot too.
"""
from __future__ import annotations

import time
import uuid

from flask import Blueprint, Response, g, request

from ...config import Settings
from ...core.conversation import CONVERSATION_ID
from ...providers.ollama_replies import full_model_name
from ...core.turn import Turn
from ...errors import (
    ClientGone,
    FieldProblem,
    InvalidRequest,
    ModelNotFound,
    PiAgentError,
    ProviderError,
    UnknownModel,
    UpstreamError,
    ValidationFailed,
)
from ...state import AppState, current_state
from ..auth import (
    allow_agent,
    allow_model,
    current_key,
    may_use_agent,
    may_use_model,
    require_conversation,
)
from ..bodies import stream_response
from ..client_socket import client_of
from ..embeddings import fetch_embeddings
from ..validation import parse_body
from .chunks import (
    OpenAIChunks,
    completion,
)
from .embeddings import embedding_list, ollama_request
from .mapping import AGENT_PREFIX, build_prompt, last_user_text
from .schemas import (
    ChatCompletionRequest,
    EmbeddingRequest,
    ModelList,
    ModelObject,
)

bp = Blueprint("openai", __name__, url_prefix="/v1")

# Agents exist from the start of the process; OpenAI's model objects need a date.
STARTED = int(time.time())


@bp.post("/chat/completions")
def chat_completions() -> Response:
    body = parse_body(ChatCompletionRequest)
    if body.n not in (None, 1):
        raise InvalidRequest("n must be 1: Ollama makes one choice per request", param="n")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true",
                             param="stream_options")
    state = current_state()
    _check_bounds(body, state.settings)
    _allow(body.model, state)
    conversation_id = _conversation_id()
    prompt = build_prompt(body, state.settings, state.agents, state.knowledge)
    # Stateless without the header, as OpenAI's API is; admission keeps one turn per
    # conversation, and a stateless request is its own.
    turn = state.turns.open(
        conversation_id or "openai-" + uuid.uuid4().hex, current_key(),
        client_of(request.environ), prompt,
        remember=last_user_text(body.messages) if conversation_id else None,
        agent=body.model[len(AGENT_PREFIX):] if body.model.startswith(AGENT_PREFIX) else "")
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _stream(turn, OpenAIChunks(body.model, include_usage), body.model)
    try:
        result = turn.collect()
    except ProviderError as exc:
        raise _for_client(exc, body.model) from None
    finally:
        turn.release()
    return _json(completion(result, body.model).model_dump_json(exclude_unset=True))


@bp.post("/embeddings")
def embeddings() -> Response:
    """Embed text with an Ollama model. Agents make no embeddings: ``agent:<name>`` is an
    unknown model here."""
    body = parse_body(EmbeddingRequest)
    if body.model.startswith(AGENT_PREFIX):
        raise UnknownModel(body.model)
    allow_model(body.model)
    state = current_state()
    try:
        answer = fetch_embeddings(state.turns, "/api/embed",
                                  ollama_request(body, state.settings), body.model,
                                  current_key(), client_of(request.environ))
        result = embedding_list(body, answer.status, answer.body)
    except ProviderError as exc:
        raise _for_client(exc, body.model) from None
    return _json(result.model_dump_json())


@bp.get("/models")
def list_models() -> Response:
    """The installed models and the agents that the request's key may use."""
    return _json(ModelList(object="list", data=_models(current_state())).model_dump_json())


@bp.get("/models/<path:model_id>")
def show_model(model_id: str) -> Response:
    for model in _models(current_state()):
        if model.id == model_id or full_model_name(model.id) == full_model_name(model_id):
            return _json(model.model_dump_json())
    raise UnknownModel(model_id)


def _stream(turn: Turn, encoder: OpenAIChunks, model: str) -> Response:
    """Answer with chat.completion.chunk events.

    The response starts with the model's first output, or with a keep-alive comment once
    the heartbeat interval has passed without one: a failure before that (unknown model,
    busy queue, cancel) still gets its HTTP status and an error body, which OpenAI's SDKs
    turn into the right exception; after it, the failure is one ``error`` event.
    """
    relay = turn.stream(encoder)
    events = iter(relay)
    try:
        head = next(events, b"")
    except BaseException:
        events.close()
        turn.release()
        raise
    if relay.failure is not None or not head:
        events.close()
        turn.release()
        if relay.failure is None:
            raise ClientGone()
        raise _for_client(relay.failure, model)
    return stream_response(events, turn.release, encoder.content_type, head=head)


def _for_client(exc: PiAgentError, model: str) -> PiAgentError:
    """An upstream failure in OpenAI's terms: the model the client named is unknown, or the
    model server refused what the client asked for (tools, thinking) as a bad request.

    An agent whose model is not pulled is the server's problem, not the client's: that
    stays the 502 that names the model to pull.
    """
    if isinstance(exc, ModelNotFound) and not model.startswith(AGENT_PREFIX):
        return UnknownModel(model)
    if isinstance(exc, UpstreamError) and exc.upstream_status == 400:
        return InvalidRequest(f"the model server refused the request: {exc.upstream_text[:300]}")
    return exc


def _models(state: AppState) -> list[ModelObject]:
    """The models and agents the key may call here: not routers, which only /chat runs."""
    key = current_key()
    models = [ModelObject(id=m.name, object="model", created=m.modified_at, owned_by="library")
              for m in state.provider.list_models() if may_use_model(key, m.name)]
    models += [ModelObject(id=AGENT_PREFIX + name, object="model", created=STARTED,
                           owned_by="pi-agent") for name, agent in state.agents.items()
               if agent.kind == "chat" and may_use_agent(key, name)
               and may_use_model(key, agent.resolve_model(state.settings))]
    return models


def _check_bounds(body: ChatCompletionRequest, settings: Settings) -> None:
    """:raise ValidationFailed: 400 here, for more messages or tools than the configuration
    allows. A message's length is bounded by the body size and the model's context (see
    ``build_call``), not by a count of its own."""
    problems = []
    if len(body.messages) > settings.max_messages:
        problems.append(FieldProblem(
            field="messages", problem=f"must be at most {settings.max_messages} messages"))
    if body.tools and len(body.tools) > settings.max_tools:
        problems.append(FieldProblem(
            field="tools", problem=f"must be at most {settings.max_tools} tools"))
    if problems:
        raise ValidationFailed(problems[:20])


def _allow(model: str, state: AppState) -> None:
    """:raise NotAllowed: 403 if the key may not use the model, or the agent and its model."""
    agent = state.agents.get(model[len(AGENT_PREFIX):]) if model.startswith(AGENT_PREFIX) else None
    if agent is not None:
        allow_agent(agent.name, param="model")
        allow_model(agent.resolve_model(state.settings))
    elif not model.startswith(AGENT_PREFIX):
        allow_model(model)


def _conversation_id() -> str | None:
    """The ``X-Conversation-Id`` header, which turns memory on for the request."""
    value = request.headers.get("X-Conversation-Id")
    if value is None:
        return None
    if not CONVERSATION_ID.fullmatch(value):
        raise InvalidRequest("X-Conversation-Id must be 1 to 128 letters, digits, - or _",
                             param="X-Conversation-Id")
    require_conversation(value)
    g.conversation_id = value
    return value


def _json(body: str) -> Response:
    return Response(body, content_type="application/json")
