"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``POST /v1/embeddings``,
``GET /v1/models[/<id>]``.

Requests are mapped onto Ollama's ``/api/chat`` and answered in OpenAI's wire format
(shared/protocols/openai-chat.md), through the same admission control, cancellation,
timeouts and watchdog as ``/chat``. ``model`` names an Ollama model, or an agent preset as
``agent:<name>``. Without an ``X-Conversation-Id`` header the endpoint is stateless, as
OpenAI's is; with one, the conversation's remembered turns go before the messages and the
new turn is remembered. Embeddings go to Ollama's ``/api/embed`` (see openai_embeddings.py),
in a generation slot too.
"""
from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Generator
from typing import Any

from flask import Blueprint, Response, g, request

from .auth import (
    allow_agent,
    allow_model,
    current_key,
    may_use_agent,
    may_use_model,
    require_conversation,
)
from .config import Settings
from .conversation import Recorder, recorder
from .embeddings import fetch_embeddings
from .errors import (
    ClientGone,
    InvalidRequest,
    ModelNotFound,
    PiAgentError,
    ProviderError,
    UnknownModel,
    UpstreamError,
    ValidationFailed,
)
from .events import EventStream, Timeouts
from .health import full_model_name
from .openai_chunks import (
    SYSTEM_FINGERPRINT,
    OpenAIChunks,
    arguments_of,
    completion_id,
    finish_reason,
    usage_of,
)
from .openai_embeddings import embedding_list, ollama_request
from .openai_mapping import AGENT_PREFIX, build_call, last_user_text
from .openai_schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    EmbeddingRequest,
    ModelList,
    ModelObject,
    ResponseFunction,
    ResponseToolCall,
)
from .providers.base import ChatCall
from .schemas import CONVERSATION_ID, FieldProblem
from .state import AppState, current_state
from .client_socket import client_closer
from .streaming import StreamBody, client_probe, never
from .turns import WatchedTurn
from .validation import parse_body

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
    settings = state.settings
    _check_bounds(body, settings)
    _allow(body.model, state)
    conversation_id = _conversation_id()
    call = build_call(body, state, conversation_id)
    key = current_key()
    # Stateless without the header, as OpenAI's API is.
    record = recorder(state.memory if conversation_id else None, conversation_id or "",
                      last_user_text(body.messages), key.id)

    count = state.limits.meter(key)

    # Admission keeps one turn per conversation; a stateless request is its own.
    turn_id = conversation_id or "openai-" + uuid.uuid4().hex
    probe = client_probe(request.environ)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _stream(state, call, body.model, turn_id, record, count, probe, include_usage)

    turn = WatchedTurn(state, turn_id, probe, key.id)
    try:
        turn.begin()
        result = turn.collect(state.provider, call, count)
    except ProviderError as exc:
        raise _for_client(exc, body.model) from None
    finally:
        turn.release()
    record(result.content, False, result.done_reason)
    message: dict[str, Any] = {"role": "assistant", "content": result.content, "refusal": None}
    if result.tool_calls:
        message["content"] = result.content or None
        message["tool_calls"] = [
            ResponseToolCall(id=c.id, type="function",
                             function=ResponseFunction(name=c.name, arguments=arguments_of(c)))
            for c in result.tool_calls
        ]
    if result.thinking:
        message["reasoning"] = result.thinking
    completion = ChatCompletion(
        id=completion_id(), object="chat.completion", created=int(time.time()),
        model=body.model, system_fingerprint=SYSTEM_FINGERPRINT,
        choices=[Choice(index=0, message=AssistantMessage(**message), logprobs=None,
                        finish_reason=finish_reason(result.done_reason, bool(result.tool_calls)))],
        usage=usage_of(result),
    )
    return _json(completion.model_dump_json(exclude_unset=True))


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
        answer = fetch_embeddings(state, "/api/embed", ollama_request(body, state.settings),
                                  client_probe(request.environ), current_key().id)
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


def _stream(state: AppState, call: ChatCall, model: str, turn_id: str, record: Recorder,
            count: Callable[[int], None], probe: Callable[[], bool] | None,
            include_usage: bool) -> Response:
    """Answer with chat.completion.chunk events.

    The response starts with the model's first output, or with a keep-alive comment once
    the heartbeat interval has passed without one: a failure before that (unknown model,
    busy queue, cancel) still gets its HTTP status and an error body, which OpenAI's SDKs
    turn into the right exception; after it, the failure is one ``error`` event.
    """
    settings = state.settings
    encoder = OpenAIChunks(model, include_usage)
    ticket = state.admission.enter(turn_id)
    cancel = state.running.add(turn_id, current_key().id)
    events: Generator[bytes, None, None] | None = None

    def finish() -> None:
        try:
            if events is not None:
                events.close()  # closes the upstream, then gives the slot back...
        finally:
            state.admission.leave(ticket)  # ...which a relay that never started did not do
            state.running.remove(turn_id, cancel)

    try:
        stream = EventStream(
            fmt=encoder, conversation_id=turn_id, agent="", model=call.model,
            provider=state.provider, admission=state.admission, ticket=ticket, cancel=cancel,
            make_call=lambda: call, record=record, client_gone=probe or never,
            shutdown=state.shutdown, count_tokens=count,
            timeouts=Timeouts.from_settings(settings),
            watchdog=state.watchdog, hang_up=client_closer(request.environ),
        )
        events = relay = stream.relay()
        head = next((data for data in relay if data), b"")
    except BaseException:
        finish()
        raise
    if stream.failure is not None or not head:
        finish()
        if stream.failure is None:
            raise ClientGone()
        raise _for_client(stream.failure, model)
    return Response(
        StreamBody(itertools.chain((head,), relay), cleanup=finish),
        content_type=encoder.content_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        direct_passthrough=True,
    )


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
    key = current_key()
    models = [ModelObject(id=m.name, object="model", created=m.modified_at, owned_by="library")
              for m in state.provider.list_models() if may_use_model(key, m.name)]
    models += [ModelObject(id=AGENT_PREFIX + name, object="model", created=STARTED,
                           owned_by="pi-agent") for name, agent in state.agents.items()
               if may_use_agent(key, name)
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
