"""A turn answered by a view that writes nothing while it waits: a non-stream reply, a
plain-text stream, a relayed Ollama request. It takes its place in admission control, can be
cancelled, and is watched (client gone, cancel, shutdown, idle and total time) while the
model works, since no write would notice any of that.

Event streams wait differently (they write heartbeats while they wait): see events.py.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from .errors import (
    ClientGone,
    PiAgentError,
    ProviderError,
    ProviderTimeout,
    ServerShuttingDown,
    TurnCancelled,
    UpstreamProtocolError,
)
from .providers.base import Abort, ChatCall, ChatChunk, ChatStream, Provider, ToolCall
from .state import AppState
from .streaming import TurnWatch, never

# How often a request waiting for a generation slot checks for its client.
CLIENT_CHECK_SECONDS = 0.5

# Why a turn was stopped from outside (see TurnWatch), as the client is told.
STOPPED: dict[str, type[PiAgentError]] = {
    "cancelled": TurnCancelled,
    "client_gone": ClientGone,
    "shutting_down": ServerShuttingDown,
    "timeout": ProviderTimeout,
}

T = TypeVar("T")


class WatchedTurn:
    """One turn's slot, its cancel registration and its watch, released once by ``release``.

    :raise ConversationBusy: 409 if the conversation has a turn queued or running.
    :raise QueueFull: 429 if every slot is taken and the queue is full.
    """

    def __init__(
        self, state: AppState, conversation_id: str, probe: Callable[[], bool] | None,
        owner: str, hang_up: Callable[[], None] | None = None,
    ) -> None:
        self._state = state
        self.conversation_id = conversation_id
        self._probe = probe
        self._hang_up = hang_up  # for a relay whose writes a client may hold up
        self.ticket = state.admission.enter(conversation_id)
        self._cancel = state.running.add(conversation_id, owner)
        self.abort = Abort()
        self._cancel.attach(self.abort)
        self.watch: TurnWatch | None = None
        self._released = False

    def begin(self) -> TurnWatch:
        """Wait for a generation slot, then start watching the turn.

        :raise TurnCancelled, ClientGone, ServerShuttingDown: the turn must not run.
        """
        state = self._state
        client_gone = self._probe or never
        while not state.admission.wait(self.ticket, CLIENT_CHECK_SECONDS):
            if self.abort.requested:
                raise TurnCancelled()
            if client_gone():
                raise ClientGone()
        if state.shutdown.begun:
            raise ServerShuttingDown()  # a turn that waited must not start now
        settings = state.settings
        self.watch = TurnWatch(state.watchdog, self.abort, self._probe, state.shutdown,
                               settings.idle_timeout, settings.total_timeout, self._hang_up)
        self.watch.start()
        return self.watch

    def run(self, call: Callable[[Abort], T]) -> T:
        """Make a provider call; a call stopped from outside fails with the reason why."""
        try:
            return call(self.abort)
        except ProviderError:
            if self.abort.requested:
                raise STOPPED.get(self.abort.reason, TurnCancelled)() from None
            raise

    def collect(self, provider: Provider, call: ChatCall,
                count: Callable[[int], None]) -> ChatChunk:
        """Stream a reply from the provider and gather it whole, for a client that asked
        for it at once: so the first-token, idle and total timeouts, cancel and a client
        that leaves stop it as they stop a stream, which a whole reply, sent by Ollama only
        at its end, would not allow. The completion tokens are counted with ``count``, also
        those of a reply cut short.

        :raise ProviderError: the call failed, or was stopped (a subclass that says why).
        """
        assert self.watch is not None, "begin() first"
        watch = self.watch
        texts: list[str] = []
        thinking: list[str] = []
        tool_calls: list[ToolCall] = []
        last: ChatChunk | None = None
        chunks = 0
        stream: ChatStream | None = None
        try:
            stream = provider.stream_chat(call, self.abort)
            for chunk in stream:
                chunks += 1
                watch.last_chunk = time.monotonic()
                texts.append(chunk.content)
                thinking.append(chunk.thinking)
                tool_calls += chunk.tool_calls or ()
                last = chunk
            if last is None or not last.done:
                raise UpstreamProtocolError()  # a stream ends with its done chunk
        except ProviderError:
            count(chunks)  # cut short, it counts as what it received
            if self.abort.requested:
                raise STOPPED.get(self.abort.reason, TurnCancelled)() from None
            raise
        finally:
            if stream is not None:
                stream.close()
        count(last.completion_tokens)
        return ChatChunk("".join(texts), "".join(thinking), True, last.done_reason,
                         last.prompt_tokens, last.completion_tokens, tool_calls or None)

    def release(self) -> None:
        """Stop watching and give the slot back; the upstream must be closed already."""
        if self._released:
            return
        self._released = True
        if self.watch is not None:
            self.watch.stop()
        self.abort.set_handler(None)  # the connection may go back to the pool
        self._state.admission.leave(self.ticket)
        self._state.running.remove(self.conversation_id, self._cancel)
