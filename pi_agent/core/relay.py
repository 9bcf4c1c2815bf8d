"""A turn answered as an event stream: it writes ``Started``, then ``Queued`` while it waits
for a slot, the reply's chunks as the generation (in a thread of its own, see
generation.py) hands them over, then exactly one ``Done`` or ``Failed``, with heartbeats
while nothing else is written. Between writes it looks after the first-token, idle and
total timeouts, a cancel, the shutdown and a client that left; while a write is held up
by a client that reads nothing, the watchdog does (``WriteWatch``).

A router's turn, once it has its slot, first runs its classifier call the same way (its
answer is gathered, not written), then writes ``Routed`` and answers as the route says.
An agent with tools streams from its tool loop (steps.py) instead of the model: its events
are written as they come, and each model call of the loop gets its own first-token wait.

One generator yields the bytes; what to write next is worked out by plain methods, so a
token passes through one generator and one encoder call.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Settings
from ..errors import (
    PiAgentError,
    ProviderError,
    ProviderTimeout,
    ServerShuttingDown,
    TurnCancelled,
)
from ..providers.base import Abort, ChatCall, ChatChunk, Provider
from .admission import Admission, Ticket
from .events import (
    HEARTBEAT,
    Done,
    Encoder,
    Event,
    Failed,
    Held,
    Queued,
    Routed,
    Sourced,
    Started,
    Stepped,
    ToolAnswered,
    ToolCalled,
)
from .generation import Generation, Streamer
from .knowledge import Source
from .lifecycle import Shutdown
from .router import Decision, Routing
from .steps import ToolLoop
from .turn_log import TurnLog
from .watch import Watchdog, WriteWatch

logger = logging.getLogger(__name__)

# How often a waiting stream looks for a cancel request or a client that left (at least
# twice per heartbeat interval); heartbeats are rarer.
POLL_SECONDS = 0.5


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


class RelayedTurn(Protocol):
    """What the relay needs of its turn (a ``turn.Turn``)."""

    conversation_id: str
    agent: str
    sources: tuple[Source, ...] | None
    ticket: Ticket
    abort: Abort

    def count_tokens(self, tokens: int) -> None: ...

    @property
    def model(self) -> str: ...

    @property
    def cancelled(self) -> bool: ...

    @property
    def client_gone(self) -> Callable[[], bool]: ...

    @property
    def hang_up(self) -> Callable[[], None] | None: ...

    @property
    def routing(self) -> Routing | None: ...

    @property
    def steps(self) -> int: ...

    history: tuple[int, int]

    @property
    def tool_calls(self) -> tuple[ToolAnswered, ...]: ...

    @property
    def provider(self) -> Provider: ...

    @property
    def tries(self) -> int: ...

    log: TurnLog  # its log line's notes

    @property
    def upstream(self) -> str: ...

    def streamer(self) -> Streamer: ...

    def take_route(self, decision: Decision) -> list[Event]: ...

    def build_call(self) -> ChatCall: ...

    def record(self, answer: str, partial: bool, done_reason: str,
               answer_tokens: int = 0, prompt_tokens: int = 0) -> None: ...

    def release(self) -> None: ...


# The relay's phases.
_STARTING, _WAITING, _GENERATING, _ENDED = range(4)


class EventRelay:
    """A turn's event stream; iterate it for the bytes. ``failure`` is why it ended in a
    ``Failed`` event, once it has."""

    def __init__(self, turn: RelayedTurn, encoder: Encoder, timeouts: Timeouts,
                 admission: Admission, watchdog: Watchdog, shutdown: Shutdown) -> None:
        self._turn = turn
        self._encode = encoder.encode
        self._write_chunk = encoder.chunk_writer()
        self._timeouts = timeouts
        self._admission = admission
        self._watchdog = watchdog
        self._shutdown = shutdown
        # Whether the client closed its connection; asked at every poll, so that a client
        # that leaves is noticed before the next heartbeat would fail to reach it.
        self._client_gone = turn.client_gone
        self._poll = min(POLL_SECONDS, timeouts.heartbeat / 2)
        self.failure: PiAgentError | None = None
        self._phase = _STARTING
        self._generation: Generation | None = None
        self._outcome = "disconnected"  # until it is known to be otherwise
        self._pieces: list[str] = []
        self._chunks = 0  # chunks relayed, about one token each, for a turn cut short
        self._started = self._last_write = self._last_look = time.monotonic()
        self._position = 0
        self._began = self._deadline = self._end = 0.0
        self._queue_ms = 0
        self._first_token_ms: int | None = None
        self._writes: WriteWatch | None = None
        self._classifying = False  # a router's classifier call is under way
        self._classification: list[str] = []
        # What takes the generation's next item: the answer's chunk, a classifier's, or a
        # tool loop's chunk or event. Chosen per model call, so no token pays for a test;
        # kept unbound, so that the relay does not refer to itself.
        self._take: Callable[[EventRelay, Any, float], bytes | None] = EventRelay._chunk

    def __iter__(self) -> Generator[bytes, None, None]:
        """Yield the events; close the upstream however the stream ends. The idle and total
        deadlines hold also while a write is blocked on a client that reads nothing: the
        watchdog then closes the client's connection."""
        hang_up = self._turn.hang_up
        writes = None
        if hang_up is not None:
            writes = self._writes = WriteWatch(self._watchdog, hang_up, self._timeouts.idle)
            writes.start()
        try:
            while (data := self._next()) is not None:
                if not data:
                    continue
                if writes is not None:
                    writes.writing_since = time.monotonic()
                yield data
                if writes is not None:
                    writes.writing_since = None
                self._last_write = time.monotonic()
        finally:
            if writes is not None:
                writes.stop()
            self._finish()
            # The turn is over once its stream is: its slot goes to the next one now, not
            # when the WSGI server gets round to closing the body (which releases it too,
            # for a stream that never started).
            self._turn.release()

    def _next(self) -> bytes | None:
        """The next bytes to write (``b""``: nothing yet), or None once the stream ended."""
        if self._phase == _GENERATING:
            return self._generating()
        if self._phase == _WAITING:
            return self._waiting()
        if self._phase == _STARTING:
            turn = self._turn
            self._phase = _WAITING
            self._position = self._admission.position(turn.ticket)
            data = self._encode(Started(turn.conversation_id, turn.agent, turn.model))
            if turn.sources is not None:
                data += self._encode(Sourced(turn.sources))
            if self._position and not turn.cancelled:
                data += self._encode(Queued(self._position))
            return data
        return None

    def _waiting(self) -> bytes | None:
        """Wait for a slot, telling the client its place as it changes."""
        turn = self._turn
        while self._position and not turn.cancelled:
            new = self._admission.wait_for_change(turn.ticket, self._position, self._poll)
            if new != self._position:
                self._position = new
                return self._encode(Queued(new)) if new else b""
            if self._client_gone():
                self._phase = _ENDED
                return None
            if self._shutdown.begun:
                # A turn that has not started will not get to run before the end.
                return self._fail(ServerShuttingDown())
            if time.monotonic() - self._last_write >= self._timeouts.heartbeat:
                return self._encode(HEARTBEAT)
        if turn.cancelled:
            self._outcome = "cancelled"
            return self._fail(TurnCancelled())
        if self._shutdown.begun:
            return self._fail(ServerShuttingDown())
        return self._generate()

    def _generate(self) -> bytes:
        """The turn has its slot: route it if it is a router's (by keyword, else with a
        classifier call), and start the generation with the history as it is now."""
        turn = self._turn
        self._queue_ms = _ms(time.monotonic() - self._started)
        self._end = time.monotonic() + self._timeouts.total  # the whole turn's
        if self._writes is not None:
            self._writes.end_at = self._end
        if turn.routing is not None:
            decision = turn.routing.by_keyword()
            if decision is None:
                self._classifying = True
                self._start(turn.provider, turn.routing.classifier_call())
                self._take = EventRelay._classified
                return b""
            return self._routed(decision)
        try:
            call = turn.build_call()
        except PiAgentError as exc:  # the store could not give the history
            self._outcome = "failed"
            return self._fail(exc)
        self._start(turn.streamer(), call)
        return b""

    def _routed(self, decision: Decision) -> bytes:
        """Tell where the router sent the message, and start the answer there."""
        if self._generation is not None:
            self._generation.stop(graceful=True)
        self._classifying = False
        try:
            events = self._turn.take_route(decision)
            call = self._turn.build_call()
        except PiAgentError as exc:  # the route's agent cannot answer: the turn fails there
            self._outcome = "failed"
            routed = Routed(decision.route, decision.agent, decision.by)
            return self._encode(routed) + self._fail(exc)
        self._start(self._turn.streamer(), call)
        return b"".join(map(self._encode, events))

    def _start(self, streamer: Streamer, call: ChatCall) -> None:
        """One model call (a fixed reply, a tool loop), with its own first-token deadline."""
        self._take = EventRelay._stepped if isinstance(streamer, ToolLoop) else EventRelay._chunk
        self._generation = Generation(streamer, call, self._turn.abort)
        self._generation.start()
        self._phase = _GENERATING
        self._began = self._last_look = time.monotonic()
        self._deadline = self._began + self._first_token_wait()

    def _generating(self) -> bytes | None:
        """Wait for the next chunk, at most until a heartbeat is due."""
        assert self._generation is not None
        timeouts = self._timeouts
        now = time.monotonic()
        wait = min(self._last_write + timeouts.heartbeat, self._deadline, self._end,
                   now + self._poll)
        item = self._generation.next(wait - now)
        now = time.monotonic()
        stop = self._reason_to_stop(now)
        if stop is not None:
            return stop or None
        if item is None:
            if self._classifying and now >= self._deadline and now < self._end:
                logger.warning("router: no classification in time; the fallback answers")
                return self._routed(self._turn.routing.fallback())  # type: ignore[union-attr]
            if now >= self._deadline or now >= self._end:
                self._outcome = "failed"
                logger.warning("upstream timed out (%s)", "first token"
                               if self._first_token_ms is None else "idle/total")
                return self._fail(ProviderTimeout())
            if now - self._last_write >= timeouts.heartbeat:
                return self._encode(HEARTBEAT)
            return b""
        if isinstance(item, ProviderError) and self._classifying:
            logger.warning("router: the classifier call failed (%s); the fallback answers",
                           type(item).__name__)
            return self._routed(self._turn.routing.fallback())  # type: ignore[union-attr]
        if isinstance(item, ProviderError):
            self._outcome = "failed"
            logger.warning("event stream ended by %s", type(item).__name__)
            return self._fail(item)
        return self._take(self, item, now)

    def _reason_to_stop(self, now: float) -> bytes | None:
        """The stream's last bytes if it must stop now (``b""``: the client left), else
        None. Thinking chunks write nothing either: the client is looked at every poll
        while the stream is silent, whatever arrives from upstream."""
        if now - max(self._last_write, self._last_look) >= self._poll:
            self._last_look = now
            if self._client_gone():
                self._phase = _ENDED
                return b""
        if self._shutdown.due():
            logger.warning("stream cut short: the server is shutting down")
            return self._fail(ServerShuttingDown())
        if self._turn.cancelled:
            self._outcome = "cancelled"
            return self._fail(TurnCancelled())
        return None

    def _chunk(self, chunk: ChatChunk, now: float) -> bytes | None:
        if self._first_token_ms is None:
            self._first_token_ms = _ms(now - self._began)
            self._turn.log.saw_first_token()
        self._deadline = now + self._timeouts.idle
        self._chunks += 1
        if chunk.content:
            self._pieces.append(chunk.content)
        if not chunk.done:
            return self._write_chunk(chunk)
        self._outcome = "done"
        self._phase = _ENDED
        turn = self._turn
        turn.count_tokens(chunk.completion_tokens)  # first: they are written with the answer
        turn.record("".join(self._pieces), False, chunk.done_reason, chunk.completion_tokens,
                    chunk.prompt_tokens)
        # The last chunk may carry text too: the encoder writes it with the end.
        return self._encode(Done(chunk, turn.conversation_id, {
            "queue_ms": self._queue_ms, "first_token_ms": self._first_token_ms,
            "total_ms": _ms(time.monotonic() - self._started)}, turn.steps, turn.tool_calls,
            turn.history, turn.upstream))

    def _stepped(self, item: ChatChunk | Event, now: float) -> bytes | None:
        """A tool loop's chunk, or one of its events: a tool runs within its own timeout
        (and the turn's), the next model call gets a first-token wait, held text shows
        the model at work."""
        if type(item) is ChatChunk:
            return self._chunk(item, now)
        if type(item) is Held:
            self._deadline = now + self._timeouts.idle
            return b""
        if type(item) is Stepped:
            self._deadline = now + self._first_token_wait()
            return b""
        if type(item) is ToolCalled:
            self._deadline = self._end
        return self._encode(item)

    def _classified(self, chunk: ChatChunk, now: float) -> bytes:
        """Gather the classifier's answer; at its end, route by it."""
        self._deadline = now + self._timeouts.idle
        self._classification.append(chunk.content)
        if not chunk.done:
            return b""
        self._turn.count_tokens(chunk.completion_tokens)
        routing = self._turn.routing
        assert routing is not None
        return self._routed(routing.read("".join(self._classification)))

    def _first_token_wait(self) -> float:
        """A call's wait for its first token: the first-token timeout for each upstream it
        may try (each try is cut at that timeout by its socket, then moves on)."""
        return self._timeouts.first_token * self._turn.tries

    def _fail(self, exc: PiAgentError) -> bytes:
        self.failure = exc
        self._turn.log.failed(exc)
        self._phase = _ENDED
        return self._encode(Failed(exc))

    def _finish(self) -> None:
        """Close the upstream, then remember and count what a turn cut short relayed."""
        outcome = self._outcome
        if self._generation is not None:
            self._generation.stop(graceful=outcome == "done")
        if outcome != "done":
            # A turn cut short was generated all the same: it counts as what it relayed.
            self._turn.count_tokens(self._chunks)
        if outcome in ("disconnected", "cancelled"):
            shut = isinstance(self.failure, ServerShuttingDown)
            self._turn.log.cut_short("shutting_down" if shut else outcome)
            self._turn.record("".join(self._pieces), True, "")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
