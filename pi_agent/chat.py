"""``POST /chat``: one turn of a conversation, answered whole or streamed as plain text."""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator

from flask import Blueprint, Response, g, jsonify

from .agents import Agent, find_agent
from .config import Settings
from .errors import ProviderError
from .memory import MemoryStore, Turn
from .providers.base import ChatCall, ChatStream
from .schemas import ChatReply, ChatRequest, Usage
from .state import current_state
from .validation import parse_body

logger = logging.getLogger(__name__)

bp = Blueprint("chat", __name__)

# A reply cut at num_predict must never pass for a complete one, also in plain text.
TRUNCATED_LINE = b"\n[truncated] the reply reached the num_predict limit\n"

# Stores a finished or partial answer; built before the stream starts, so it holds plain values.
Recorder = Callable[[str, bool, str], None]


@bp.after_request
def _add_conversation_header(response: Response) -> Response:
    conversation_id = g.get("conversation_id")
    if conversation_id:
        response.headers["X-Conversation-Id"] = conversation_id
    return response


@bp.post("/chat")
def chat() -> Response:
    """Answer one message; ``"stream": true`` streams the reply as UTF-8 text.

    Everything that can fail with a status (validation, the agent, the upstream's first
    answer) happens before the stream starts.
    """
    body = parse_body(ChatRequest)
    agent = find_agent(body.agent)
    state = current_state()
    conversation_id = body.conversation_id or str(uuid.uuid4())
    g.conversation_id = conversation_id
    history = state.memory.get_history(conversation_id) if state.memory is not None else []
    call = build_call(agent, state.settings, history, body.message)
    record = _recorder(state.memory, conversation_id, body.message)

    if body.stream:
        stream = state.provider.stream_chat(call)
        return Response(
            relay_text(stream, record),
            content_type="text/plain; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    result = state.provider.chat(call)
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
    for turn in history:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    messages.append({"role": "user", "content": message})
    return ChatCall(
        model=agent.resolve_model(settings),
        messages=messages,
        options=agent.resolve_options(settings),
        keep_alive=settings.keep_alive,
    )


def relay_text(stream: ChatStream, record: Recorder) -> Iterator[bytes]:
    """Yield each token as UTF-8 as it arrives; close the upstream however the stream ends.

    A failure after the first byte cannot change the status any more, so it ends the text
    with one ``[error] <message>`` line. A client that goes away shows up here as
    ``GeneratorExit``: the upstream is closed at once, and the answer so far is remembered
    as partial.
    """
    pieces: list[str] = []
    done_reason = ""
    failed = False
    try:
        for chunk in stream:
            # Thinking chunks carry empty content, so they are never written as answer text.
            if chunk.content:
                pieces.append(chunk.content)
                yield chunk.content.encode()
            if chunk.done:
                done_reason = chunk.done_reason
        if done_reason == "length":
            yield TRUNCATED_LINE
    except ProviderError as exc:
        failed = True
        logger.warning("stream to the client ended by %s", type(exc).__name__)
        yield f"\n[error] {exc.description}\n".encode()
    finally:
        stream.close()
        if done_reason:
            record("".join(pieces), False, done_reason)
        elif not failed:
            record("".join(pieces), True, "")


def _recorder(memory: MemoryStore | None, conversation_id: str, message: str) -> Recorder:
    def record(answer: str, partial: bool, done_reason: str) -> None:
        # Only an answer the model gave is remembered: an empty one, or a failed turn, is not.
        if memory is not None and answer:
            memory.append_turn(
                conversation_id,
                Turn(user=message, assistant=answer, partial=partial, done_reason=done_reason),
            )

    return record
