"""A reply gathered whole, for a client that asked for it at once (a JSON reply), beside
relay.py (an event stream) and text.py (plain text). It is read as a stream all the same, so
that the first-token, idle and total timeouts, cancel and a client that leaves stop it as
they stop a stream, which a whole reply, sent by Ollama only at its end, would not allow."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

from ..errors import ProviderError, UpstreamProtocolError
from ..providers.base import ChatChunk, ChatStream
from .generation import Gathered, Reply
from .steps import AnswerOnly, ToolLoop
from .watch import TurnWatch


def answer_only(stream: Reply, watch: TurnWatch) -> ChatStream:
    """A stream of the answer's chunks alone: a tool loop's events only keep ``watch`` from
    taking a tool's time for an idle model."""
    if isinstance(stream, ToolLoop):
        return AnswerOnly(stream, watch.seen)
    return cast(ChatStream, stream)  # the provider's, or a fixed reply's


def gather(open_stream: Callable[[], ChatStream], watch: TurnWatch,
           count: Callable[[int], None], first: Callable[[], None] | None) -> ChatChunk:
    """One call's reply (the stream ``open_stream`` opens), gathered whole and closed;
    ``count`` gets its completion tokens, or the chunks received of a reply cut short;
    ``first`` (if any) is told of the first chunk.

    :raise ProviderError: the call failed, or was stopped.
    """
    gathered = Gathered()
    stream: ChatStream | None = None
    try:
        stream = open_stream()
        for chunk in stream:
            watch.last_chunk = time.monotonic()
            if first is not None and not gathered.chunks:
                first()
            gathered.add(chunk)
        if gathered.last is None or not gathered.last.done:
            raise UpstreamProtocolError()  # a stream ends with its done chunk
    except ProviderError:
        count(gathered.chunks)  # cut short, it counts as what it received
        raise
    finally:
        if stream is not None:
            stream.close()
    result = gathered.whole()
    count(result.completion_tokens)
    return result
