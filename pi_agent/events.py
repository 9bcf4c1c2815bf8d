"""Event streams: ``start``, ``queued``, ``token``, then exactly one ``done`` or ``error``,
as Server-Sent Events or as NDJSON, with heartbeats while nothing else is sent."""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from .admission import Admission, Ticket
from .config import Settings
from .errors import PiAgentError, ProviderError, ProviderTimeout, ServerShuttingDown, TurnCancelled
from .generation import Generation
from .keys import LOCAL_ID
from .lifecycle import Shutdown
from .providers.base import Abort, ChatCall, ChatChunk, Provider
from .streaming import Watchdog, WriteWatch

logger = logging.getLogger(__name__)

# How often a waiting stream looks for a cancel request or a client that left (at least
# twice per heartbeat interval); heartbeats are rarer.
POLL_SECONDS = 0.5


class StreamEncoder(Protocol):
    """Writes a stream's events in one API's format; ``b""`` for an event it does not show."""

    content_type: str

    def start(self, conversation_id: str, agent: str, model: str) -> bytes: ...

    def queued(self, position: int) -> bytes: ...

    def ping(self) -> bytes: ...

    def chunk(self, chunk: ChatChunk) -> bytes: ...

    def done(self, chunk: ChatChunk, conversation_id: str, timings: dict[str, int]) -> bytes: ...

    def error(self, exc: PiAgentError) -> bytes: ...


class EventFormat:
    """The project's own events: SSE (``event:`` and ``data:`` lines) or NDJSON lines."""

    def __init__(self, content_type: str, sse: bool) -> None:
        self.content_type = content_type
        self.sse = sse

    def start(self, conversation_id: str, agent: str, model: str) -> bytes:
        return self.event("start", {"conversation_id": conversation_id, "agent": agent,
                                    "model": model})

    def queued(self, position: int) -> bytes:
        return self.event("queued", {"position": position})

    def chunk(self, chunk: ChatChunk) -> bytes:
        # Thinking chunks carry no content: they are not part of the answer.
        return self.event("token", {"content": chunk.content}) if chunk.content else b""

    def done(self, chunk: ChatChunk, conversation_id: str, timings: dict[str, int]) -> bytes:
        usage = {"prompt_tokens": chunk.prompt_tokens,
                 "completion_tokens": chunk.completion_tokens,
                 "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}
        return self.chunk(chunk) + self.event("done", {
            "conversation_id": conversation_id, "done_reason": chunk.done_reason,
            "usage": usage, "timings": timings})

    def error(self, exc: PiAgentError) -> bytes:
        return self.event("error", {"code": exc.error_code, "message": exc.description})

    def event(self, name: str, data: dict[str, Any]) -> bytes:
        if self.sse:
            body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
            return f"event: {name}\ndata: {body}\n\n".encode()
        line = json.dumps({"event": name, **data}, separators=(",", ":"), ensure_ascii=False)
        return (line + "\n").encode()

    def ping(self) -> bytes:
        return b": ping\n\n" if self.sse else b'{"event":"ping"}\n'


SSE = EventFormat("text/event-stream; charset=utf-8", sse=True)
NDJSON = EventFormat("application/x-ndjson", sse=False)


class Cancel:
    """A request to stop a turn, from another connection (``POST /chat/<id>/cancel``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requested = False
        self._abort: Abort | None = None

    def attach(self, abort: Abort) -> None:
        """Stop the upstream call behind ``abort`` when (or if already) cancelled."""
        with self._lock:
            self._abort = abort
            run = self.requested
        if run:
            abort.request("cancelled")

    def request(self) -> None:
        with self._lock:
            self.requested = True
            abort = self._abort
        if abort is not None:
            abort.request("cancelled")


class RunningTurns:
    """The turns under way, by conversation id (admission allows one each), and the key
    that each belongs to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: dict[str, Cancel] = {}
        self._owners: dict[str, str] = {}

    def add(self, conversation_id: str, owner: str = LOCAL_ID) -> Cancel:
        cancel = Cancel()
        with self._lock:
            self._turns[conversation_id] = cancel
            self._owners[conversation_id] = owner
        return cancel

    def owner(self, conversation_id: str) -> str | None:
        with self._lock:
            return self._owners.get(conversation_id)

    def remove(self, conversation_id: str, cancel: Cancel) -> None:
        with self._lock:
            if self._turns.get(conversation_id) is cancel:
                del self._turns[conversation_id]
                del self._owners[conversation_id]

    def cancel(self, conversation_id: str) -> bool:
        """Ask the running turn of the conversation to stop; False if there is none."""
        with self._lock:
            cancel = self._turns.get(conversation_id)
        if cancel is None:
            return False
        cancel.request()
        return True


@dataclass(frozen=True)
class Timeouts:
    heartbeat: float
    first_token: float
    idle: float
    total: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Timeouts:
        return cls(settings.heartbeat_seconds, settings.first_token_timeout,
                   settings.idle_timeout, settings.total_timeout)


@dataclass
class EventStream:
    """Everything a stream needs, gathered before it starts."""

    fmt: StreamEncoder
    conversation_id: str
    agent: str
    model: str
    provider: Provider
    admission: Admission
    ticket: Ticket
    cancel: Cancel  # registered in RunningTurns by the view
    make_call: Callable[[], ChatCall]  # reads the history once the turn holds a slot
    record: Callable[[str, bool, str], None]
    timeouts: Timeouts
    # Whether the client closed its connection; asked at every poll, so that a client
    # that leaves is noticed before the next heartbeat would fail to reach it.
    client_gone: Callable[[], bool]
    shutdown: Shutdown
    # Counts the turn's completion tokens against its key's daily limit.
    count_tokens: Callable[[int], None] = lambda tokens: None
    # Why the stream ended in an error event, once it has.
    failure: PiAgentError | None = None
    # Where the WSGI server shows its socket: how a write that a client holds up is ended.
    watchdog: Watchdog | None = None
    hang_up: Callable[[], None] | None = None
    _writes: WriteWatch | None = None

    def relay(self) -> Generator[bytes, None, None]:
        """Yield the events; close the upstream and give the slot back however it ends.

        The idle and total deadlines hold also while a write is blocked on a client that
        reads nothing: the watchdog then closes the client's connection.
        """
        if self.watchdog is None or self.hang_up is None:
            return self._relay()
        return self._relay_watched(self.watchdog, self.hang_up)

    def _relay_watched(self, watchdog: Watchdog,
                       hang_up: Callable[[], None]) -> Generator[bytes, None, None]:
        writes = self._writes = WriteWatch(watchdog, hang_up, self.timeouts.idle)
        events = self._relay()
        writes.start()
        try:
            for data in events:
                writes.writing_since = time.monotonic()
                yield data
                writes.writing_since = None
        finally:
            writes.stop()
            events.close()

    def _relay(self) -> Generator[bytes, None, None]:
        fmt, timeouts = self.fmt, self.timeouts
        poll = min(POLL_SECONDS, timeouts.heartbeat / 2)
        started = time.monotonic()
        cancel = self.cancel
        generation: Generation | None = None
        pieces: list[str] = []
        chunks = 0  # chunks relayed, about one token each, for a turn that never finishes
        outcome = "disconnected"
        try:
            yield fmt.start(self.conversation_id, self.agent, self.model)
            last_write = time.monotonic()
            position = self.admission.position(self.ticket)
            while position and not cancel.requested:
                yield fmt.queued(position)
                last_write = time.monotonic()
                while not cancel.requested:
                    new = self.admission.wait_for_change(self.ticket, position, poll)
                    if new != position:
                        position = new
                        break
                    if self.client_gone():
                        return
                    if self.shutdown.begun:
                        # A turn that has not started will not get to run before the end.
                        yield self._fail(ServerShuttingDown())
                        return
                    if time.monotonic() - last_write >= timeouts.heartbeat:
                        yield fmt.ping()
                        last_write = time.monotonic()
            if cancel.requested:
                outcome = "cancelled"
                yield self._fail(TurnCancelled())
                return
            if self.shutdown.begun:
                yield self._fail(ServerShuttingDown())
                return
            queue_ms = _ms(time.monotonic() - started)

            generation = Generation(self.provider, self.make_call())
            cancel.attach(generation.abort)
            generation.start()
            began = time.monotonic()
            deadline = began + timeouts.first_token
            end = began + timeouts.total
            if self._writes is not None:
                self._writes.end_at = end
            first_token_ms: int | None = None
            last_look = began  # the client socket's last look, when nothing was written
            while True:
                now = time.monotonic()
                wait = min(last_write + timeouts.heartbeat, deadline, end, now + poll)
                item = generation.next(wait - now)
                now = time.monotonic()
                # Thinking chunks write nothing either: look at the client at every poll
                # while the stream is silent, whatever arrives from upstream.
                if now - max(last_write, last_look) >= poll:
                    last_look = now
                    if self.client_gone():
                        return
                if self.shutdown.due():
                    logger.warning("stream cut short: the server is shutting down")
                    yield self._fail(ServerShuttingDown())
                    return
                if cancel.requested:
                    outcome = "cancelled"
                    yield self._fail(TurnCancelled())
                    return
                if item is None:
                    if now >= deadline or now >= end:
                        outcome = "failed"
                        logger.warning("upstream timed out (%s)",
                                       "first token" if first_token_ms is None else "idle/total")
                        yield self._fail(ProviderTimeout())
                        return
                    if now - last_write >= timeouts.heartbeat:
                        yield fmt.ping()
                        last_write = now
                    continue
                if isinstance(item, ProviderError):
                    outcome = "failed"
                    logger.warning("event stream ended by %s", type(item).__name__)
                    yield self._fail(item)
                    return
                if first_token_ms is None:
                    first_token_ms = _ms(now - began)
                deadline = now + timeouts.idle
                chunks += 1
                if item.content:
                    pieces.append(item.content)
                if not item.done:
                    data = fmt.chunk(item)
                    if data:
                        yield data
                        last_write = time.monotonic()
                    continue
                outcome = "done"
                self.record("".join(pieces), False, item.done_reason)
                self.count_tokens(item.completion_tokens)
                # The last chunk may carry text too: the encoder writes it with the end.
                yield fmt.done(item, self.conversation_id, {
                    "queue_ms": queue_ms, "first_token_ms": first_token_ms,
                    "total_ms": _ms(time.monotonic() - started)})
                return
        finally:
            # Close the upstream first, then give the slot back.
            if generation is not None:
                generation.stop(graceful=outcome == "done")
            if outcome in ("disconnected", "cancelled"):
                self.record("".join(pieces), True, "")
            if outcome != "done":
                # A turn cut short was generated all the same: it counts as what it relayed.
                self.count_tokens(chunks)
            self.admission.leave(self.ticket)

    def _fail(self, exc: PiAgentError) -> bytes:
        self.failure = exc
        return self.fmt.error(exc)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
