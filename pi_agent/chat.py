"""``POST /chat``: one turn of a conversation, answered whole or streamed as plain text."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator

from flask import Blueprint, Response, g, jsonify, request

from .agents import Agent, find_agent
from .config import Settings
from .auth import allow_agent, allow_model, require_conversation, current_key
from .errors import ConversationNotFound, ProviderError, TurnNotRunning, ValidationFailed
from .events import NDJSON, SSE, EventFormat, EventStream, Timeouts
from .conversation import Recorder, recorder, remembered_messages
from .memory import Turn
from .providers.base import ChatCall, ChatStream
from .schemas import CONVERSATION_ID, Cancelled, ChatReply, ChatRequest, FieldProblem, Usage
from .state import current_state
from .client_socket import client_closer
from .streaming import StreamBody, TurnWatch, client_probe, never
from .turns import WatchedTurn
from .validation import parse_body

logger = logging.getLogger(__name__)

bp = Blueprint("chat", __name__)

# A reply cut at num_predict must never pass for a complete one, also in plain text.
TRUNCATED_LINE = b"\n[truncated] the reply reached the num_predict limit\n"

# Why a turn was stopped from outside (see TurnWatch), as a plain-text reply says it.
_STOPPED_LINES = {
    "cancelled": b"\n[error] the turn was cancelled\n",
    "shutting_down": b"\n[error] the server is shutting down\n",
    "timeout": b"\n[error] the model server did not answer in time\n",
}


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

    :raise 404: no turn of that conversation is queued or running.
    """
    if not CONVERSATION_ID.fullmatch(conversation_id):
        raise TurnNotRunning()
    try:
        require_conversation(conversation_id, manage=True)
    except ConversationNotFound:
        raise TurnNotRunning() from None  # another key's turn is not there for this one
    if not current_state().running.cancel(conversation_id):
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
    key = current_key()
    fmt = _event_format(events_only or body.stream, default_sse=events_only)
    probe = client_probe(request.environ)
    client_gone = probe or never
    record = recorder(state.memory, conversation_id, body.message, key.id)

    count = state.limits.meter(key)

    if fmt is not None:
        admission = state.admission
        ticket = admission.enter(conversation_id)

        def make_call() -> ChatCall:
            history = state.memory.get_history(conversation_id) if state.memory else []
            return build_call(agent, settings, history, body.message)

        # Registered now, not when the body starts: a cancel may come before that.
        cancel = state.running.add(conversation_id, key.id)
        stream = EventStream(
            fmt=fmt, conversation_id=conversation_id, agent=agent.name,
            model=agent.resolve_model(settings), provider=state.provider,
            admission=admission, ticket=ticket, cancel=cancel,
            make_call=make_call, record=record, client_gone=client_gone,
            shutdown=state.shutdown, count_tokens=count,
            timeouts=Timeouts.from_settings(settings),
            watchdog=state.watchdog, hang_up=client_closer(request.environ),
        )

        def give_back() -> None:
            admission.leave(ticket)
            state.running.remove(conversation_id, cancel)

        return Response(
            StreamBody(stream.relay(), cleanup=give_back),
            content_type=fmt.content_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            direct_passthrough=True,
        )

    # A plain-text or non-stream turn: registered for cancel, and watched, since it writes
    # nothing to its client until its reply (or its next token) comes.
    turn = WatchedTurn(state, conversation_id, probe, key.id, client_closer(request.environ))
    streaming = False
    try:
        watch = turn.begin()
        history = state.memory.get_history(conversation_id) if state.memory is not None else []
        call = build_call(agent, settings, history, body.message)
        if not body.stream:
            result = turn.collect(state.provider, call, count)
        else:
            text_stream = turn.run(lambda abort: state.provider.stream_chat(call, abort))
            streaming = True

            def finish() -> None:
                text_stream.close()
                turn.release()

            return Response(
                StreamBody(relay_text(text_stream, record, count, finish, watch), finish),
                content_type="text/plain; charset=utf-8",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                # The relay yields bytes already: hand it to the WSGI server as it is,
                # without werkzeug's two wrappers around every token.
                direct_passthrough=True,
            )
    finally:
        # A stream gives its slot back when its body is closed, after the upstream is.
        if not streaming:
            turn.release()
    record(result.content, False, result.done_reason)
    reply = ChatReply(
        reply=result.content,
        conversation_id=conversation_id,
        agent=agent.name,
        model=call.model,
        provider=state.provider.name,
        done_reason=result.done_reason,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
    )
    return jsonify(reply.model_dump())


def build_call(agent: Agent, settings: Settings, history: list[Turn], message: str) -> ChatCall:
    """Build the upstream request: system prompt, remembered turns, then the new message."""
    messages = [{"role": "system", "content": agent.system_prompt}]
    messages += remembered_messages(history)
    messages.append({"role": "user", "content": message})
    return ChatCall(
        model=agent.resolve_model(settings),
        messages=messages,
        options=agent.resolve_options(settings),
        keep_alive=settings.keep_alive,
    )


def relay_text(
    stream: ChatStream, record: Recorder, count: Callable[[int], None],
    finish: Callable[[], None], watch: TurnWatch,
) -> Iterator[bytes]:
    """Yield each token as UTF-8 as it arrives; close the upstream however the stream ends.

    A failure after the first byte cannot change the status any more, so it ends the text
    with one ``[error] <message>`` line. A client that goes away shows up here as
    ``GeneratorExit`` at the next write, or, between tokens, as the call that ``watch``
    stopped: the upstream is closed at once and the answer so far is remembered as partial.
    ``finish`` closes the upstream and gives the generation slot back, in that order.
    """
    pieces: list[str] = []
    chunks = 0
    done_reason = ""
    failed = False
    try:
        for chunk in stream:
            chunks += 1
            watch.last_chunk = now = time.monotonic()
            # Thinking chunks carry empty content, so they are never written as answer text.
            if chunk.content:
                pieces.append(chunk.content)
                watch.last_write = now
                # A client that reads slowly holds the write up; that is not Ollama idling.
                watch.writing = True
                yield chunk.content.encode()
                watch.writing = False
            if chunk.done:
                done_reason = chunk.done_reason
                count(chunk.completion_tokens)
        if done_reason == "length":
            yield TRUNCATED_LINE
    except ProviderError as exc:
        reason = watch.abort.reason if watch.abort.requested else ""
        if reason == "client_gone":
            logger.info("client went away between tokens")
            return
        if reason in _STOPPED_LINES:
            yield _STOPPED_LINES[reason]
            # Cancelled or cut by a shutdown, the answer so far was seen and is remembered
            # as partial, as on a disconnect; a timeout is a failed turn.
            failed = reason == "timeout"
            return
        failed = True
        logger.warning("stream to the client ended by %s", type(exc).__name__)
        yield f"\n[error] {exc.description}\n".encode()
    finally:
        # Remembered before the slot is given back, so that the conversation's next turn
        # finds this one in its history.
        if done_reason:
            record("".join(pieces), False, done_reason)
        else:
            if not failed:
                record("".join(pieces), True, "")
            count(chunks)  # cut short, it counts as what it relayed
        finish()


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
