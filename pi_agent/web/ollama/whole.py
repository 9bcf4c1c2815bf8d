"""Ollama's streamed generation gathered into the one JSON object that Ollama itself answers
to ``"stream": false``.

The gateway asks Ollama for a stream in every case, so that the first-token, idle and total
timeouts, cancel and a client that leaves stop a whole reply too. Ollama does the same
inside (``ChatHandler`` and ``GenerateHandler`` in its server/routes.go): its whole reply is
the last chunk, with the text, the thinking and the tool calls of all chunks put together.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from ...core.turn_log import TurnLog
from ...core.watch import TurnWatch
from ...errors import ProviderError, UpstreamProtocolError
from ...providers.base import Forwarded

logger = logging.getLogger(__name__)

# One NDJSON line is one token's object; a "line" this long means the body is not NDJSON.
MAX_LINE_BYTES = 1024 * 1024
# Ollama answers a failure during a whole reply with this status and {"error": ...}.
ERROR_STATUS = 500


def gather_whole(upstream: Forwarded, watch: TurnWatch, count: Callable[[int], None],
                 noted: TurnLog, generate: bool) -> tuple[int, bytes]:
    """Read a streamed ``/api/chat`` (or, with ``generate``, ``/api/generate``) answer to its
    end; return the status and body Ollama gives to ``"stream": false``. ``count`` gets the
    completion tokens, or the lines received of a reply cut short; ``noted`` (the turn's
    log line) the first line's time and the prompt's tokens.

    :raise ProviderError: the stream failed or was stopped before its end.
    """
    if upstream.status != 200:
        return upstream.status, b"".join(upstream)  # an error body, not a stream
    text: list[str] = []
    thinking: list[str] = []
    tool_calls: list[Any] = []
    lines = 0
    try:
        for line in _lines(upstream, watch):
            lines += 1
            if lines == 1:
                noted.saw_first_token()
            chunk = _object(line)
            if "error" in chunk:
                return ERROR_STATUS, _go_json({"error": chunk["error"]})
            part = chunk if generate else chunk.get("message")
            if not isinstance(part, dict):
                raise UpstreamProtocolError()
            text.append(_text(part, "response" if generate else "content"))
            thinking.append(_text(part, "thinking"))
            tool_calls += part.get("tool_calls") or ()
            if chunk.get("done") is True:
                _merge(part, "response" if generate else "content", text, thinking, tool_calls)
                eval_count = chunk.get("eval_count")
                count(eval_count if isinstance(eval_count, int) else lines)
                prompt_count = chunk.get("prompt_eval_count")
                noted.done(prompt_count if isinstance(prompt_count, int) else 0)
                return 200, _go_json(chunk)
        logger.warning("ollama stream ended before done:true")
        raise UpstreamProtocolError()
    except ProviderError:
        count(lines)  # cut short, it counts as what it received
        raise


def _lines(upstream: Forwarded, watch: TurnWatch) -> Iterator[bytes]:
    """The body's lines, whatever the pieces it came in; each piece is a sign of life."""
    pending = b""
    for piece in upstream:
        watch.last_chunk = time.monotonic()
        *complete, pending = (pending + piece).split(b"\n")
        if len(pending) > MAX_LINE_BYTES:
            raise UpstreamProtocolError()
        yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending


def _object(line: bytes) -> dict[str, Any]:
    try:
        chunk = json.loads(line)
    except (ValueError, RecursionError):
        chunk = None
    if not isinstance(chunk, dict):
        logger.warning("ollama sent a line that is not a JSON object: %.200r", line)
        raise UpstreamProtocolError()
    return chunk


def _text(part: dict[str, Any], name: str) -> str:
    value = part.get(name) or ""
    if not isinstance(value, str):
        raise UpstreamProtocolError()
    return value


def _merge(part: dict[str, Any], name: str, text: list[str], thinking: list[str],
           tool_calls: list[Any]) -> None:
    """Put every chunk's text, thinking and tool calls into the last chunk, as Ollama does;
    like Go's ``omitempty`` fields, empty thinking and tool calls stay out."""
    part[name] = "".join(text)
    if any(thinking):
        part["thinking"] = "".join(thinking)
    if tool_calls:
        part["tool_calls"] = tool_calls


def _go_json(data: dict[str, Any]) -> bytes:
    """Encode as Go's encoding/json does: compact, UTF-8, with <, > and & escaped."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()
