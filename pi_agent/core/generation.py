"""One streamed generation, run upstream in a thread of its own (a greenlet under gevent).

The request's own greenlet then only waits on a queue, with a timeout: so it can write
heartbeats while the model loads, enforce the first-token, idle and total timeouts, notice
a client that left, and stop the call at any phase, also before Ollama's first byte.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Protocol

from ..errors import ProviderError, UpstreamProtocolError
from ..providers.base import Abort, ChatCall, ChatChunk, ToolCall
from .events import Event

logger = logging.getLogger(__name__)

# How long stop() waits for the upstream call to close once it has been told to.
STOP_SECONDS = 5.0
# After done:true Ollama ends its body at once; waiting this long for that keeps the
# connection reusable instead of shutting it.
END_SECONDS = 1.0

Item = ChatChunk | Event | ProviderError


class Reply(Protocol):
    """A streamed reply: the provider's chunks, or a tool loop's chunks and events."""

    def __iter__(self) -> Iterator[ChatChunk | Event]: ...

    def close(self) -> None: ...


class Streamer(Protocol):
    """What streams a reply: the provider, a router's fixed reply, or a tool loop."""

    def stream_chat(self, call: ChatCall, abort: Abort | None = None) -> Reply: ...


class Generation:
    """A streamed call to the provider, its chunks handed over through a queue."""

    def __init__(self, provider: Streamer, call: ChatCall, abort: Abort) -> None:
        self._provider = provider
        self._call = call
        self.abort = abort  # the turn's: a cancel stops the call at any phase
        self._items: queue.Queue[Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def next(self, timeout: float) -> Item | None:
        """Return the next chunk or error, or None if nothing came within ``timeout``.

        After the last chunk (or the error) it returns None at once, forever.
        """
        if not self._thread.is_alive() and self._items.empty():
            return None
        try:
            return self._items.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def stop(self, graceful: bool) -> None:
        """Make sure the upstream call is over and its connection closed or pooled.

        ``graceful`` (the reply is complete) first gives the call a moment to end on its
        own, so that its connection can be reused; otherwise, or after that, it is shut.
        """
        if graceful:
            self._thread.join(END_SECONDS)
        if self._thread.is_alive():
            self.abort.request()
            self._thread.join(STOP_SECONDS)
            if self._thread.is_alive():
                logger.warning("an upstream call did not end %.0f s after it was shut",
                               STOP_SECONDS)

    def _run(self) -> None:
        stream: Reply | None = None
        try:
            stream = self._provider.stream_chat(self._call, self.abort)
            for chunk in stream:
                self._items.put(chunk)
        except ProviderError as exc:
            if not self.abort.requested:
                self._items.put(exc)
        except Exception:
            logger.exception("unexpected error in an upstream call")
            self._items.put(UpstreamProtocolError())
        finally:
            if stream is not None:
                stream.close()
            self.abort.set_handler(None)
            self._items.put(None)


class Gathered:
    """A reply's chunks, gathered into one."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.last: ChatChunk | None = None
        self.chunks = 0

    def add(self, chunk: ChatChunk) -> None:
        self.chunks += 1
        self.texts.append(chunk.content)
        self.thinking.append(chunk.thinking)
        self.tool_calls += chunk.tool_calls or ()
        self.last = chunk

    def whole(self) -> ChatChunk:
        last = self.last
        assert last is not None
        return ChatChunk("".join(self.texts), "".join(self.thinking), True, last.done_reason,
                         last.prompt_tokens, last.completion_tokens, self.tool_calls or None)
