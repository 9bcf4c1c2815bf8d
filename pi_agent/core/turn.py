"""One request's life, owned by one object: its place in admission control, its cancel
registration, its watch (client gone, cancel, shutdown, idle and total time), its upstream
call, the recording of its answer into memory, its token count, and exactly one release.

Every front gets a ``Turn`` from ``Turns.open`` (create_app builds one ``Turns``) and picks
how it is answered:

- ``stream(encoder)``: an event stream (SSE, NDJSON, OpenAI chunks), which writes queue
  places and heartbeats while it waits (see relay.py);
- ``start()`` then ``relay(encoder)``: a plain-text stream, which writes nothing while it
  waits, so the watchdog watches it; everything that fails before the first byte still
  has its HTTP status;
- ``collect()``: the whole reply at once (a JSON reply), read as a stream so that the
  same timeouts, cancel and watch stop it;
- ``begin()`` then ``forward(...)``: Ollama's own bytes, relayed by the ``/api`` front.

A turn is released once (``release`` does its work the first time only): by its stream when
the stream ends, by the response body's close for a stream that never started, or by the
view at once when it answers without a stream or fails before its response.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, TypeVar

from ..config import Settings
from ..errors import (
    ClientGone,
    PiAgentError,
    ProviderError,
    ProviderTimeout,
    ServerShuttingDown,
    TurnCancelled,
    UpstreamProtocolError,
)
from ..memory import MemoryStore
from ..memory import Turn as Remembered
from ..providers.base import Abort, ChatCall, ChatChunk, ChatStream, Forwarded, Provider
from ..security.keys import ApiKey
from ..security.limits import Limits
from .admission import Admission
from .agents import Agent
from .events import Done, Encoder, Event, Failed
from .generation import Gathered
from .knowledge import Library, Source
from .lifecycle import Shutdown
from .prompt import Client, Prompt
from .relay import EventRelay, Timeouts
from .router import Decision, FixedReply, Routing, plan_route
from .running import RunningTurns
from .watch import TurnWatch, Watchdog, never

logger = logging.getLogger(__name__)

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


class Turns:
    """What every turn shares, built once by create_app."""

    def __init__(self, settings: Settings, provider: Provider, admission: Admission,
                 running: RunningTurns, watchdog: Watchdog, shutdown: Shutdown,
                 memory: MemoryStore | None, limits: Limits,
                 agents: Mapping[str, Agent], library: Library) -> None:
        self.settings = settings
        self.agents = agents  # where a router's routes lead
        self.library = library
        self.timeouts = Timeouts.from_settings(settings)
        self.provider = provider
        self.admission = admission
        self.running = running
        self.watchdog = watchdog
        self.shutdown = shutdown
        self.memory = memory
        self.limits = limits

    def open(self, conversation_id: str, key: ApiKey, client: Client,
             prompt: Prompt | None = None, remember: str | None = None,
             agent: str = "", sources: tuple[Source, ...] | None = None,
             router: Agent | None = None) -> Turn:
        """Take a place for one turn: a slot, or a place in the queue.

        ``remember`` is the user's message that the answer is remembered with, in the
        conversation's memory; None for a turn that neither reads nor keeps any.
        ``sources`` are the passages found for an agent with knowledge (None: it has none).
        A ``router`` turn has no prompt yet: it gets one from the route it takes.

        :raise ConversationBusy: 409 if the conversation has a turn queued or running.
        :raise QueueFull: 429 if every slot is taken and the queue is full.
        """
        routing = Routing(router, remember or "", self.settings) if router else None
        return Turn(self, conversation_id, key, client, prompt, remember, agent, sources,
                    routing)


class Turn:
    """One turn, from its place in the queue to its release; see the module's docstring."""

    def __init__(self, turns: Turns, conversation_id: str, key: ApiKey, client: Client,
                 prompt: Prompt | None, remember: str | None, agent: str,
                 sources: tuple[Source, ...] | None = None,
                 routing: Routing | None = None) -> None:
        self._turns = turns
        self.conversation_id = conversation_id
        self.agent = agent
        self.sources = sources
        self.routing = routing
        self.route: Decision | None = None
        self._fixed: FixedReply | None = None
        self.client = client
        self._prompt = prompt
        self._remember = remember or ""
        self._memory = turns.memory if remember is not None else None
        self._owner = key.id
        self.count_tokens = turns.limits.meter(key)
        self.ticket = turns.admission.enter(conversation_id)
        # Registered now, not when a stream starts: a cancel may come before that.
        self._cancel = turns.running.add(conversation_id, key.id)
        self.abort = Abort()
        self._cancel.attach(self.abort)
        self.watch: TurnWatch | None = None
        self._stream: ChatStream | None = None  # the reply that relay() writes
        # The open upstream call, closed by release at the latest.
        self._upstream: ChatStream | Forwarded | None = None
        self._released = False

    @property
    def model(self) -> str:
        if self._prompt is not None:
            return self._prompt.call.model
        return self.routing.model if self.routing is not None else ""

    @property
    def provider(self) -> Provider:
        return self._turns.provider

    def streamer(self) -> Provider | FixedReply:
        """What streams the reply: the model, or a route's fixed reply."""
        return self._fixed if self._fixed is not None else self._turns.provider

    def take_route(self, decision: Decision) -> list[Event]:
        """Answer as ``decision`` says: with a route's agent (its prompt, its sources) or a
        fixed reply; the events that tell the client so.

        :raise AgentNotRunnable: 501, the route's agent uses what is not run yet.
        """
        assert self.routing is not None
        self.route = decision
        turns = self._turns
        plan = plan_route(decision, self.routing, turns.agents, turns.library, turns.settings)
        self._prompt, self._fixed, self.sources = plan.prompt, plan.fixed, plan.sources
        return plan.events

    def _route_direct(self, watch: TurnWatch) -> None:
        """Route a turn that writes nothing while it waits: the keywords, else the
        classifier's answer, else (a classification that failed) the fallback."""
        assert self.routing is not None
        decision = self.routing.by_keyword()
        if decision is None:
            try:
                answer = self._gather(self._turns.provider, self.routing.classifier_call(),
                                      watch)
                decision = self.routing.read(answer.content)
            except ProviderError:
                if self.abort.requested:
                    raise
                decision = self.routing.fallback()
        self.take_route(decision)

    @property
    def cancelled(self) -> bool:
        return self._cancel.requested

    @property
    def client_gone(self) -> Callable[[], bool]:
        return self.client.gone or never

    @property
    def hang_up(self) -> Callable[[], None] | None:
        return self.client.hang_up

    def build_call(self) -> ChatCall:
        """The call to the model, with the conversation's history as it is now: read once
        the turn holds its slot, so that it has the previous turn's answer."""
        assert self._prompt is not None, "a turn that relays Ollama's bytes has no prompt"
        if self._memory is None:
            return self._prompt.call
        return self._prompt.with_history(self._memory.get_history(self.conversation_id))

    def record(self, answer: str, partial: bool, done_reason: str) -> None:
        """Remember the answer with the user's message. Only an answer the model gave to a
        user's message is remembered: an empty one, or a /v1 request without a user message,
        is not."""
        if self._memory is not None and answer and self._remember:
            self._memory.append_turn(
                self.conversation_id,
                Remembered(user=self._remember, assistant=answer, partial=partial,
                           done_reason=done_reason),
                self._owner,
            )

    def stream(self, encoder: Encoder) -> EventRelay:
        """The turn as an event stream, written by ``encoder``; see relay.py."""
        turns = self._turns
        return EventRelay(self, encoder, turns.timeouts, turns.admission, turns.watchdog,
                          turns.shutdown)

    def begin(self) -> TurnWatch:
        """Wait for a generation slot, then start watching the turn.

        :raise TurnCancelled, ClientGone, ServerShuttingDown: the turn must not run.
        """
        turns = self._turns
        client_gone = self.client.gone or never
        while not turns.admission.wait(self.ticket, CLIENT_CHECK_SECONDS):
            if self.abort.requested:
                raise TurnCancelled()
            if client_gone():
                raise ClientGone()
        if turns.shutdown.begun:
            raise ServerShuttingDown()  # a turn that waited must not start now
        settings = turns.settings
        self.watch = TurnWatch(turns.watchdog, self.abort, self.client.gone, turns.shutdown,
                               settings.idle_timeout, settings.total_timeout,
                               self.client.hang_up)
        self.watch.start()
        return self.watch

    def run(self, call: Callable[[Abort], T]) -> T:
        """Make a provider call; a call stopped from outside fails with the reason why."""
        try:
            return call(self.abort)
        except ProviderError as exc:
            raise self._why(exc) from None

    def forward(self, method: str, path: str, data: bytes,
                wait: Literal["stream", "whole"]) -> Forwarded:
        """Send a request to the model server as it is, once ``begin`` has a slot."""
        provider = self._turns.provider
        upstream = self.run(lambda abort: provider.forward(method, path, data, wait=wait,
                                                           abort=abort))
        self._upstream = upstream
        return upstream

    def start(self) -> None:
        """Wait for a slot and open the upstream stream, for ``relay``: what fails before
        the first byte still fails here, with its status.

        :raise ProviderError: the call failed, or was stopped (a subclass that says why).
        """
        watch = self.begin()
        if self.routing is not None:
            self._route_direct(watch)
        call, streamer = self.build_call(), self.streamer()
        self._stream = self.run(lambda abort: streamer.stream_chat(call, abort))
        self._upstream = self._stream

    def relay(self, encoder: Encoder) -> Iterator[bytes]:
        """Yield the reply's chunks as ``encoder`` writes them, as they arrive; a failure
        after the first byte is the encoder's ``Failed`` event. A client that goes away shows
        up here as ``GeneratorExit`` at the next write, or, between tokens, as the call that
        the watch stopped: the answer so far is remembered as partial."""
        assert self._stream is not None and self.watch is not None, "start() first"
        watch, stream = self.watch, self._stream
        encode, write_chunk = encoder.encode, encoder.chunk_writer()
        pieces: list[str] = []
        chunks = 0
        last: ChatChunk | None = None
        failed = False
        try:
            for chunk in stream:
                chunks += 1
                watch.last_chunk = now = time.monotonic()
                last = chunk
                if chunk.content:
                    pieces.append(chunk.content)
                data = encode(Done(chunk, self.conversation_id, {})) if chunk.done \
                    else write_chunk(chunk)
                if data:
                    watch.last_write = now
                    # A client that reads slowly holds the write up; that is not Ollama idling.
                    watch.writing = True
                    yield data
                    watch.writing = False
        except ProviderError as exc:
            failure = self._failure(exc)
            failed = failure is not None and not isinstance(
                failure, (TurnCancelled, ServerShuttingDown))
            if failure is not None:
                yield encode(Failed(failure))
        finally:
            self._close_relay(pieces, chunks, last, failed)
            self.release()  # now, not when the WSGI server closes the body

    def _failure(self, exc: ProviderError) -> PiAgentError | None:
        """Why a relay ended early, as its client is told; None when the client left."""
        reason = self.abort.reason if self.abort.requested else ""
        if reason == "client_gone":
            logger.info("client went away between tokens")
            return None
        if reason in STOPPED:
            # Cancelled or cut by a shutdown, the answer so far was seen and is remembered
            # as partial, as on a disconnect; a timeout is a failed turn.
            return STOPPED[reason]()
        logger.warning("stream to the client ended by %s", type(exc).__name__)
        return exc

    def _close_relay(self, pieces: list[str], chunks: int, last: ChatChunk | None,
                     failed: bool) -> None:
        # Remembered before the slot is given back (release, which also closes the stream),
        # so that the conversation's next turn finds this one in its history.
        if last is not None and last.done and last.done_reason:
            self.record("".join(pieces), False, last.done_reason)
            self.count_tokens(last.completion_tokens)
            return
        if not failed:
            self.record("".join(pieces), True, "")
        self.count_tokens(chunks)  # cut short, it counts as what it relayed

    def collect(self) -> ChatChunk:
        """Stream the reply and gather it whole, for a client that asked for it at once: so
        the first-token, idle and total timeouts, cancel and a client that leaves stop it
        as they stop a stream, which a whole reply, sent by Ollama only at its end, would
        not allow. The answer is remembered and its tokens counted, also those of a reply
        cut short.

        :raise ProviderError: the call failed, or was stopped (a subclass that says why).
        """
        watch = self.begin()
        if self.routing is not None:
            self._route_direct(watch)
        result = self._gather(self.streamer(), self.build_call(), watch)
        self.record(result.content, False, result.done_reason)
        return result

    def _gather(self, streamer: Provider | FixedReply, call: ChatCall,
                watch: TurnWatch) -> ChatChunk:
        """One call's reply, gathered whole; its tokens counted, also of a reply cut short.

        :raise ProviderError: the call failed, or was stopped (a subclass that says why).
        """
        gathered = Gathered()
        stream: ChatStream | None = None
        try:
            stream = streamer.stream_chat(call, self.abort)
            for chunk in stream:
                watch.last_chunk = time.monotonic()
                gathered.add(chunk)
            if gathered.last is None or not gathered.last.done:
                raise UpstreamProtocolError()  # a stream ends with its done chunk
        except ProviderError as exc:
            self.count_tokens(gathered.chunks)  # cut short, it counts as what it received
            raise self._why(exc) from None
        finally:
            if stream is not None:
                stream.close()
        result = gathered.whole()
        self.count_tokens(result.completion_tokens)
        return result

    def _why(self, exc: ProviderError) -> PiAgentError:
        """Why a provider call failed: for a call stopped from outside, the reason."""
        if self.abort.requested:
            return STOPPED.get(self.abort.reason, TurnCancelled)()
        return exc

    def release(self) -> None:
        """Close the upstream call, stop watching and give the slot back, in that order."""
        if self._released:
            return
        self._released = True
        if self._upstream is not None:
            self._upstream.close()
        if self.watch is not None:
            self.watch.stop()
        self.abort.set_handler(None)  # the connection may go back to the pool
        self._turns.admission.leave(self.ticket)
        self._turns.running.remove(self.conversation_id, self._cancel)
