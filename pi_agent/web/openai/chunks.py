"""A turn's events as OpenAI writes them: ``chat.completion.chunk`` events for a stream, and
one ``chat.completion`` for a reply gathered whole."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ...core.events import Done, Encoder, Failed, Heartbeat
from ...providers.base import ChatChunk, ToolCall
from .errors import openai_error
from .schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    ResponseFunction,
    ResponseToolCall,
)

SYSTEM_FINGERPRINT = "fp_pi_agent"


class OpenAIChunks(Encoder):
    """Writes a reply as OpenAI's ``chat.completion.chunk`` events, ending with ``[DONE]``.

    One ``id`` and ``created`` for the whole stream; ``role`` only in the first delta; a
    last choice chunk with an empty delta and the finish reason; a usage chunk only when
    asked for. Queue and start events are not part of OpenAI's format: they write nothing.
    """

    content_type = "text/event-stream; charset=utf-8"

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self._started = False
        self._tool_calls = 0
        # A token's chunk is made once per token: its JSON is the model's, with the text put
        # between a prefix and a suffix cut from a chunk that pydantic wrote once.
        # The delta comes after the model's name, which may hold anything: cut at the last.
        marker = "PI-AGENT-TOKEN"
        template = self._event(Delta(content=marker))
        self._before, _, self._after = template.rpartition(json.dumps(marker).encode())

    def ping(self, event: Heartbeat) -> bytes:
        return b": keep-alive\n\n"

    def chunk(self, chunk: ChatChunk) -> bytes:
        out = b""
        if chunk.tool_calls:
            deltas = [self._tool_call(call) for call in chunk.tool_calls]
            if not self._started:
                self._started = True
                out += self._event(Delta(role="assistant", content=None, tool_calls=deltas))
            else:
                out += self._event(Delta(tool_calls=deltas))
        if (chunk.content or chunk.thinking) and not self._started:
            self._started = True
            out += self._event(Delta(role="assistant", content=""))
        if chunk.thinking:
            out += self._event(Delta(reasoning=chunk.thinking))
        if chunk.content:
            text = json.dumps(chunk.content, ensure_ascii=False).encode()
            out += self._before + text + self._after
        return out

    def done(self, event: Done) -> bytes:
        chunk = event.chunk
        out = self.chunk(chunk)
        if not self._started:  # an empty reply still has its role
            self._started = True
            out += self._event(Delta(role="assistant", content=""))
        out += self._event(Delta(), finish_reason(chunk.done_reason, self._tool_calls > 0))
        if self.include_usage:
            usage = ChatCompletionChunk(
                id=self.id, object="chat.completion.chunk", created=self.created,
                model=self.model, system_fingerprint=SYSTEM_FINGERPRINT, choices=[],
                usage=usage_of(chunk))
            out += b"data: " + usage.model_dump_json(exclude_unset=True).encode() + b"\n\n"
        return out + b"data: [DONE]\n\n"

    def error(self, event: Failed) -> bytes:
        body = openai_error(event.error).model_dump_json()
        return b"data: " + body.encode() + b"\n\n"

    def _tool_call(self, call: ToolCall) -> DeltaToolCall:
        # Ollama sends a call whole: its one delta has the id, the name and all arguments.
        index = self._tool_calls
        self._tool_calls += 1
        return DeltaToolCall(index=index, id=call.id, type="function",
                             function=DeltaFunction(name=call.name, arguments=arguments_of(call)))

    def _event(self, delta: Delta, finish_reason: str | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.id, object="chat.completion.chunk", created=self.created, model=self.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[ChunkChoice(index=0, delta=delta, logprobs=None,
                                 finish_reason=finish_reason)],
        )
        if self.include_usage:
            chunk.usage = None  # every chunk but the last says "usage": null
        return b"data: " + chunk.model_dump_json(exclude_unset=True).encode() + b"\n\n"


def finish_reason(done_reason: str, tool_calls: bool) -> str:
    if done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def usage_of(chunk: ChatChunk) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=chunk.prompt_tokens,
                           completion_tokens=chunk.completion_tokens,
                           total_tokens=chunk.prompt_tokens + chunk.completion_tokens)


def arguments_of(call: ToolCall) -> str:
    return json.dumps(call.arguments, ensure_ascii=False)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def completion(result: ChatChunk, model: str) -> ChatCompletion:
    """A reply gathered whole as one ``chat.completion``."""
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
    return ChatCompletion(
        id=completion_id(), object="chat.completion", created=int(time.time()),
        model=model, system_fingerprint=SYSTEM_FINGERPRINT,
        choices=[Choice(index=0, message=AssistantMessage(**message), logprobs=None,
                        finish_reason=finish_reason(result.done_reason, bool(result.tool_calls)))],
        usage=usage_of(result),
    )
