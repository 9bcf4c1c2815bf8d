"""Ollama's JSON replies read into the gateway's types: chat chunks, tool calls, times.

Anything that is not what Ollama sends is an ``UpstreamProtocolError``; an error line is an
``UpstreamError``.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import datetime
from typing import Any

from pydantic import (
    BaseModel,
)

from ..errors import UpstreamError, UpstreamProtocolError
from .base import ChatChunk, ToolCall

logger = logging.getLogger(__name__)


def full_model_name(model: str) -> str:
    """A model name as Ollama matches it: without case, and "llama3.2" is "llama3.2:latest"."""
    name = model.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def parse_line(line: bytes) -> ChatChunk:
    try:
        data = json.loads(line.decode())
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        logger.warning("ollama sent a line that is not JSON: %.200r", line)
        raise UpstreamProtocolError() from exc
    return parse_chunk(data)


def parse_chunk(data: Any) -> ChatChunk:
    if not isinstance(data, dict):
        raise UpstreamProtocolError()
    if "error" in data:
        # Ollama reports a failure after the stream started as one {"error": ...} line.
        logger.warning("ollama reported an error: %.300s", data["error"])
        raise UpstreamError()
    message = data.get("message") or {}
    if not isinstance(message, dict):
        raise UpstreamProtocolError()
    content = message.get("content") or ""
    thinking = message.get("thinking") or ""
    if not isinstance(content, str) or not isinstance(thinking, str):
        logger.warning("ollama sent a chunk whose message is not text")
        raise UpstreamProtocolError()
    tool_calls = parse_tool_calls(message.get("tool_calls"))
    if data.get("done") is not True:
        return ChatChunk(content, thinking, tool_calls=tool_calls)
    prompt_tokens = data.get("prompt_eval_count") or 0
    completion_tokens = data.get("eval_count") or 0
    if not isinstance(prompt_tokens, int) or not isinstance(completion_tokens, int):
        raise UpstreamProtocolError()
    # Old Ollama versions leave done_reason out of the final chunk.
    done_reason = str(data.get("done_reason") or "stop")
    return ChatChunk(content, thinking, True, done_reason, prompt_tokens, completion_tokens,
                     tool_calls)


def parse_tool_calls(calls: Any) -> list[ToolCall] | None:
    if not calls:
        return None
    if not isinstance(calls, list):
        raise UpstreamProtocolError()
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            logger.warning("ollama sent a tool call without a function name")
            raise UpstreamProtocolError()
        arguments = function.get("arguments") or {}
        if not isinstance(arguments, dict):
            raise UpstreamProtocolError()
        # Ollama before 0.12 sends no id; the client needs one to answer the call.
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = "call_" + uuid.uuid4().hex[:24]
        parsed.append(ToolCall(call_id, function["name"], arguments))
    return parsed


def unix_seconds(timestamp: Any) -> int:
    """Ollama's RFC 3339 times (``2025-05-04T17:37:44.706015396-07:00``) in Unix seconds."""
    if not isinstance(timestamp, str):
        return 0
    # Go writes up to nine fractional digits; Python reads at most six.
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", timestamp)
    try:
        return int(datetime.fromisoformat(trimmed).timestamp())
    except ValueError:
        return 0


class OllamaErrorBody(BaseModel):
    """An error of the Ollama-compatible API, in Ollama's own shape."""

    error: str
