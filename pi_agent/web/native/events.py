"""The project's own encoders of a turn's events: the event stream on the wire (``start``,
``queued``, ``token``, then exactly one ``done`` or ``error``, as Server-Sent Events or as
NDJSON lines, with heartbeats while nothing else is sent), and plain text."""
from __future__ import annotations

import json
from typing import Any

from ...core.events import (
    Done,
    Encoder,
    Failed,
    Heartbeat,
    Queued,
    Routed,
    Sourced,
    Started,
    ToolAnswered,
    ToolCalled,
)
from ...core.knowledge import Source
from ...providers.base import ChatChunk

# A reply cut at num_predict must never pass for a complete one, also in plain text.
TRUNCATED_LINE = b"\n[truncated] the reply reached the num_predict limit\n"


class EventFormat(Encoder):
    """The project's own events: SSE (``event:`` and ``data:`` lines) or NDJSON lines."""

    def __init__(self, content_type: str, sse: bool) -> None:
        self.content_type = content_type
        self.sse = sse

    def start(self, event: Started) -> bytes:
        return self.event("start", {"conversation_id": event.conversation_id,
                                    "agent": event.agent, "model": event.model})

    def queued(self, event: Queued) -> bytes:
        return self.event("queued", {"position": event.position})

    def route(self, event: Routed) -> bytes:
        return self.event("route", {"route": event.route, "agent": event.agent,
                                    "by": event.by})

    def sources(self, event: Sourced) -> bytes:
        return self.event("sources", {"sources": [source_info(s) for s in event.sources]})

    def tool_call(self, event: ToolCalled) -> bytes:
        return self.event("tool_call", {"id": event.id, "name": event.name,
                                        "arguments": event.arguments})

    def tool_result(self, event: ToolAnswered) -> bytes:
        return self.event("tool_result", {"id": event.id, "name": event.name, "ok": event.ok,
                                          "content": event.content, "ms": event.ms})

    def chunk(self, chunk: ChatChunk) -> bytes:
        # Thinking chunks carry no content: they are not part of the answer.
        return self.event("token", {"content": chunk.content}) if chunk.content else b""

    def done(self, event: Done) -> bytes:
        chunk = event.chunk
        usage = {"prompt_tokens": chunk.prompt_tokens,
                 "completion_tokens": chunk.completion_tokens,
                 "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}
        return self.chunk(chunk) + self.event("done", {
            "conversation_id": event.conversation_id, "done_reason": chunk.done_reason,
            "usage": usage, "timings": event.timings, "steps": event.steps,
            "tool_calls": [tool_call_info(call) for call in event.tool_calls],
            "history": {"turns": event.history[0], "dropped": event.history[1]},
            "upstream": event.upstream})

    def error(self, event: Failed) -> bytes:
        return self.event("error", {"code": event.error.error_code,
                                    "message": event.error.description})

    def ping(self, event: Heartbeat) -> bytes:
        return b": ping\n\n" if self.sse else b'{"event":"ping"}\n'

    def event(self, name: str, data: dict[str, Any]) -> bytes:
        if self.sse:
            body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
            return f"event: {name}\ndata: {body}\n\n".encode()
        line = json.dumps({"event": name, **data}, separators=(",", ":"), ensure_ascii=False)
        return (line + "\n").encode()


class PlainText(Encoder):
    """The reply as UTF-8 text, token by token. A failure after the first byte cannot
    change the status any more, so it ends the text with one ``[error] <message>`` line; a
    reply cut at num_predict ends with a ``[truncated]`` line."""

    content_type = "text/plain; charset=utf-8"

    def chunk(self, chunk: ChatChunk) -> bytes:
        # Thinking chunks carry empty content, so they are never written as answer text.
        return chunk.content.encode()

    def done(self, event: Done) -> bytes:
        text = event.chunk.content.encode()
        return text + TRUNCATED_LINE if event.chunk.done_reason == "length" else text

    def error(self, event: Failed) -> bytes:
        return f"\n[error] {event.error.description}\n".encode()


SSE = EventFormat("text/event-stream; charset=utf-8", sse=True)
NDJSON = EventFormat("application/x-ndjson", sse=False)
TEXT = PlainText()


def source_info(source: Source) -> dict[str, Any]:
    """A source as the ``sources`` event and the JSON reply show it."""
    return {"id": source.id, "title": source.title, "path": source.path,
            "snippet": source.snippet, "score": source.score}


def tool_call_info(call: ToolAnswered) -> dict[str, Any]:
    """A tool call run for the answer, as the ``done`` event and the JSON reply list it."""
    return {"id": call.id, "name": call.name, "arguments": call.arguments, "ok": call.ok,
            "content": call.content, "ms": call.ms}
