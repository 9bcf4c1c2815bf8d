"""``POST /chat`` and ``POST /chat/stream``: one turn of a conversation, answered whole (JSON),
as plain text, or as an event stream; and its cancel."""
from __future__ import annotations

import uuid

from flask import Blueprint, Response, g, jsonify, request

from ...core.agents import Agent
from ...core.conversation import CONVERSATION_ID
from ...core.events import Encoder
from ...core.prompt import prompt_for
from ...core.turn import Turn
from ...errors import (
    ConversationNotFound,
    FieldProblem,
    TurnNotRunning,
    ValidationFailed,
)
from ...state import current_state
from ..auth import allow_agent, allow_model, current_key, require_conversation
from ..bodies import stream_response
from ..client_socket import client_of
from ..validation import parse_body
from .agents import find_agent
from .events import NDJSON, SSE, TEXT, EventFormat, source_info, tool_call_info
from .schemas import (
    Cancelled,
    ChatReply,
    ChatRequest,
    HistoryInfo,
    RouteInfo,
    SourceInfo,
    ToolCallInfo,
    Usage,
)

bp = Blueprint("chat", __name__)


@bp.post("/chat")
def chat() -> Response:
    """Answer one message. ``"stream": true`` streams the reply: as UTF-8 text, or as events
    when the client accepts ``text/event-stream`` (SSE) or ``application/x-ndjson``.

    Everything that can fail with a status (validation, the agent, admission and, for plain
    text, the upstream's first answer) happens before the stream starts.
    """
    return _answer(events_only=False)


@bp.post("/chat/stream")
def chat_stream() -> Response:
    """Answer one message as an event stream: SSE, or NDJSON if that is what is accepted."""
    return _answer(events_only=True)


@bp.post("/chat/<conversation_id>/cancel")
def cancel(conversation_id: str) -> Response:
    """Stop the turn running in a conversation; it ends with ``cancelled``.

    :raise 404: no turn of that conversation is queued or running, here or in another
        gateway that shares the store.
    :raise StoreUnavailable: 503 when that store cannot be asked.
    """
    if not CONVERSATION_ID.fullmatch(conversation_id):
        raise TurnNotRunning()
    try:
        require_conversation(conversation_id, manage=True)
    except ConversationNotFound:
        raise TurnNotRunning() from None  # another key's turn is not there for this one
    state, key = current_state(), current_key()
    if not state.running.cancel(conversation_id) and (
            state.memory is None
            or not state.memory.cancel_elsewhere(conversation_id, key.id, key.admin)):
        raise TurnNotRunning()
    g.conversation_id = conversation_id
    return jsonify(Cancelled(conversation_id=conversation_id, status="cancelling").model_dump())


def _answer(events_only: bool) -> Response:
    body = parse_body(ChatRequest)
    state = current_state()
    settings = state.settings
    if len(body.message) > settings.max_message_chars:
        raise ValidationFailed([FieldProblem(
            field="message", problem=f"must be at most {settings.max_message_chars} characters")])
    if body.conversation_id is not None:
        require_conversation(body.conversation_id)
    conversation_id = body.conversation_id or str(uuid.uuid4())
    g.conversation_id = conversation_id
    agent = find_agent(body.agent)
    allow_agent(agent.name)
    allow_model(agent.resolve_model(settings))
    turn = _open(agent, body.message, conversation_id, fresh=body.conversation_id is None)
    encoder = _event_format(events_only or body.stream, default_sse=events_only)
    if encoder is not None:
        return stream_response(turn.stream(encoder), turn.release, encoder.content_type)
    if body.stream:
        return _text(turn, TEXT)
    try:
        result = turn.collect()
    finally:
        turn.release()
    reply = ChatReply(
        reply=result.content,
        conversation_id=conversation_id,
        agent=agent.name,
        model=turn.model,
        provider=state.provider.name,
        done_reason=result.done_reason,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
        sources=[SourceInfo(**source_info(source)) for source in turn.sources or ()],
        route=RouteInfo(route=turn.route.route, agent=turn.route.agent, by=turn.route.by)
        if turn.route is not None else None,
        tool_calls=[ToolCallInfo(**tool_call_info(call)) for call in turn.tool_calls],
        steps=turn.steps,
        history=HistoryInfo(turns=turn.history[0], dropped=turn.history[1]),
        upstream=turn.upstream,
    )
    return jsonify(reply.model_dump())


def _open(agent: Agent, message: str, conversation_id: str, fresh: bool) -> Turn:
    """The turn of ``agent``: a chat agent's prompt (with the sources of its knowledge),
    or a router's, whose prompt comes from the route it takes once it has a slot. A
    ``fresh`` conversation (no id given) is answered while the store is down."""
    state = current_state()
    key, client = current_key(), client_of(request.environ)
    if agent.kind == "router":
        return state.turns.open(conversation_id, key, client, remember=message,
                                agent=agent.name, router=agent, fresh=fresh)
    prompt, sources = prompt_for(agent, state.settings, message, state.knowledge)
    return state.turns.open(conversation_id, key, client, prompt, remember=message,
                            agent=agent.name, sources=sources, fresh=fresh)


def _text(turn: Turn, encoder: Encoder) -> Response:
    """A plain-text stream: it writes nothing while it waits, so what fails before the
    model's first answer still has its status."""
    try:
        turn.start()
    except BaseException:
        turn.release()
        raise
    return stream_response(turn.relay(encoder), turn.release, encoder.content_type)


def _event_format(streaming: bool, default_sse: bool) -> EventFormat | None:
    """Pick the event format the client asked for with Accept; None means plain text."""
    if not streaming:
        return None
    # Media types compare without case and without parameters ("; charset=utf-8").
    quality = {value.split(";")[0].strip().lower(): q for value, q in request.accept_mimetypes}
    wants_ndjson = quality.get("application/x-ndjson", 0) > 0
    wants_sse = quality.get("text/event-stream", 0) > 0
    if wants_ndjson and wants_sse:
        return SSE if quality["text/event-stream"] >= quality["application/x-ndjson"] else NDJSON
    if wants_ndjson:
        return NDJSON
    if wants_sse or default_sse:
        return SSE
    return None
