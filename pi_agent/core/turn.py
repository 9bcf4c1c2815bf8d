"""One request's life, owned by one object: its place in admission control, its cancel
registration, its watch (client gone, cancel, shutdown, idle and total time), its upstream
call, the recording of its answer into memory and its token count (through keeping.py), and
exactly one release.

Every front gets a ``Turn`` from ``Turns.open`` (create_app builds one ``Turns``) and picks
how it is answered:

- ``stream(encoder)``: an event stream (SSE, NDJSON, OpenAI chunks), which writes queue
  places and heartbeats while it waits (see relay.py);
- ``start()`` then ``relay(encoder)``: a plain-text stream, which writes nothing while it
  waits, so the watchdog watches it; everything that fails before the first byte still
  has its HTTP status (see text.py);
- ``collect()``: the whole reply at once (a JSON reply), read as a stream so that the
  same timeouts, cancel and watch stop it (see whole.py);
- ``begin()`` then ``forward(...)``: Ollama's own bytes, relayed by the ``/api`` front.

A turn is released once (``release`` does its work the first time only): by its stream when
the stream ends, by the response body's close for a stream that never started, or by the
view at once when it answers without a stream or fails before its response.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, TypeVar

from ..config import Settings
from ..errors import (
    ClientGone,
    PiAgentError,
    ProviderError,
    ServerShuttingDown,
    TurnCancelled,
)
from ..memory import Store
from ..memory import Turn as Remembered
from ..metrics import Metrics
from ..providers.base import Abort, ChatCall, ChatChunk, ChatStream, Forwarded
from ..providers.pool import UpstreamPool
from ..security.keys import ApiKey
from ..security.limits import Limits
from .admission import Admission
from .agents import Agent
from .context import turn_tokens
from .failover import Failover
from .keeping import Keeping
from .turn_log import TurnLog
from .events import Encoder, Event, ToolAnswered
from .generation import Streamer
from .knowledge import Library, Source
from .lifecycle import Shutdown
from .prompt import Client, Prompt
from .relay import EventRelay, Timeouts
from .router import Decision, FixedReply, Routing, plan_route
from .running import RunningTurns
from .steps import ToolLoop
from .text import relay_text
from .whole import answer_only, gather
from .watch import STOPPED, TurnWatch, Watchdog, never

logger = logging.getLogger(__name__)

# How often a request waiting for a generation slot checks for its client.
CLIENT_CHECK_SECONDS = 0.5

T = TypeVar("T")


class Turns:
    """What every turn shares, built once by create_app."""

    def __init__(self, settings: Settings, pool: UpstreamPool, admission: Admission,
                 running: RunningTurns, watchdog: Watchdog, shutdown: Shutdown,
                 store: Store, limits: Limits,
                 agents: Mapping[str, Agent], library: Library, metrics: Metrics) -> None:
        self.settings = settings
        self.agents = agents  # where a router's routes lead
        self.library = library
        self.timeouts = Timeouts.from_settings(settings)
        self.pool = pool
        self.admission = admission
        self.running = running
        self.watchdog = watchdog
        self.shutdown = shutdown
        self.store = store  # each turn's tokens; its memory too unless that is off
        self.memory = store if settings.enable_memory else None
        self.limits = limits
        self.metrics = metrics  # each turn's figures, at its end

    def open(self, conversation_id: str, key: ApiKey, client: Client,
             prompt: Prompt | None = None, remember: str | None = None,
             agent: str = "", sources: tuple[Source, ...] | None = None,
             router: Agent | None = None, fresh: bool = False, model: str = "",
             embedding: bool = False) -> Turn:
        """Take a place for one turn: a slot, or a place in the queue.

        ``remember`` is the user's message that the answer is remembered with, in the
        conversation's memory; None for a turn that neither reads nor keeps any.
        ``sources`` are the passages found for an agent with knowledge (None: it has none).
        A ``router`` turn has no prompt yet: it gets one from the route it takes. A
        ``fresh`` conversation (its id made for this request) is answered without memory
        while the store is down. ``model`` names the model of a turn without a prompt (a
        relayed one), for the upstream it goes to. An ``embedding`` holds a slot as a turn
        does, and is logged, but not counted among the turns in the metrics.

        :raise ConversationBusy: 409 if the conversation has a turn queued or running,
            here or in another gateway that shares the store.
        :raise QueueFull: 429 if every slot is taken and the queue is full.
        :raise StoreUnavailable: 503 if the store that holds the conversation is down.
        """
        routing = Routing(router, remember or "", self.settings) if router else None
        return Turn(self, conversation_id, key, client, prompt, remember, agent, sources,
                    routing, fresh, model, embedding)


class Turn:
    """One turn, from its place in the queue to its release; see the module's docstring."""

    def __init__(self, turns: Turns, conversation_id: str, key: ApiKey, client: Client,
                 prompt: Prompt | None, remember: str | None, agent: str,
                 sources: tuple[Source, ...] | None = None,
                 routing: Routing | None = None, fresh: bool = False,
                 model: str = "", embedding: bool = False) -> None:
        self._turns = turns
        self._embedding = embedding
        self.conversation_id = conversation_id
        self.agent = agent
        self.sources = sources
        self.routing = routing
        self.route: Decision | None = None
        self._fixed: FixedReply | None = None
        self.client = client
        self._prompt = prompt
        self._model = model
        # Its line in the log when it ends (turn_log.py).
        self.log = TurnLog(client.request_id, key.id)
        self._remember = remember or ""
        self._loop: ToolLoop | None = None  # an agent with tools: the gateway runs them
        self.ticket = turns.admission.enter(
            conversation_id, lambda free: turns.pool.rank(self.model, conversation_id, free))
        # The calls to the model, to the upstream whose slot the ticket holds; a remembered
        # conversation's next turn goes where this one went.
        remembered = remember is not None and turns.memory is not None
        self._calls = Failover(turns.pool, turns.admission, self.ticket,
                               conversation_id if remembered else "", lambda: self.model,
                               turns.metrics)
        try:
            self._keeping = Keeping(turns.store,
                                    turns.memory if remember is not None else None,
                                    conversation_id, key.id, turns.limits.meter(key), fresh)
        except BaseException:
            turns.admission.leave(self.ticket)
            raise
        # Registered now, not when a stream starts: a cancel may come before that.
        self._cancel = turns.running.add(conversation_id, key.id)
        self.abort = Abort()
        self._cancel.attach(self.abort)
        self.watch: TurnWatch | None = None
        # The remembered turns that went into the call, and those left out of it.
        self.history = (0, 0)
        self._stream: ChatStream | None = None  # the reply that relay() writes
        # The open upstream call, closed by release at the latest.
        self._upstream: ChatStream | Forwarded | None = None
        self._released = False

    @property
    def model(self) -> str:
        if self._prompt is not None:
            return self._prompt.call.model
        return self.routing.model if self.routing is not None else self._model

    @property
    def provider(self) -> Failover:
        return self._calls

    @property
    def upstream(self) -> str:
        """The upstream (host:port) whose slot the turn holds: the one that served it."""
        return self.ticket.upstream

    @property
    def tries(self) -> int:
        return self._calls.tries

    def streamer(self) -> Streamer:
        """What streams the reply: the model, a route's fixed reply, or the tool loop of an
        agent with tools (one per turn, made here)."""
        if self._fixed is not None:
            return self._fixed
        toolbox = self._prompt.toolbox if self._prompt is not None else None
        if toolbox is None:
            return self._calls
        self._loop = ToolLoop(self._calls, toolbox, self._spend)
        return self._loop

    def count_tokens(self, tokens: int) -> None:
        """Count completion tokens against the key's daily quota; a tool loop counts those
        of each of its model calls itself. They are written to the store with the answer
        (``record``), or when the turn ends (``release``)."""
        if self._loop is None:
            self._spend(tokens)

    def _spend(self, tokens: int) -> None:
        self.log.completion_tokens += tokens
        self._keeping.spend(tokens)

    @property
    def steps(self) -> int:
        """The model calls made for the answer: 0 for a fixed reply."""
        if self._loop is not None:
            return self._loop.steps
        return 0 if self._fixed is not None else 1

    @property
    def tool_calls(self) -> tuple[ToolAnswered, ...]:
        return tuple(self._loop.calls) if self._loop is not None else ()

    def take_route(self, decision: Decision) -> list[Event]:
        """Answer as ``decision`` says: with a route's agent (its prompt, its sources) or a
        fixed reply; the events that tell the client so.
        """
        assert self.routing is not None
        self.route = decision
        turns = self._turns
        plan = plan_route(decision, self.routing, turns.agents, turns.library, turns.settings)
        self._prompt, self._fixed, self.sources = plan.prompt, plan.fixed, plan.sources
        return plan.events

    def _route_direct(self, watch: TurnWatch) -> None:
        """Route a turn that writes nothing while it waits; its classifier call is gathered."""
        assert self.routing is not None
        provider = self._calls
        self.take_route(self.routing.decide(
            lambda call: self._gather(provider, call, watch, noted=False).content, self.abort))

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
        the turn holds its slot, so that it has the previous turn's answer. The turns that
        do not fit its budget are left out in one block, and forgotten with the answer
        (``record``): the next call's prompt then begins with this one's (context.py)."""
        assert self._prompt is not None, "a turn that relays Ollama's bytes has no prompt"
        memory = self._keeping.memory
        if memory is None or self._fixed is not None:  # a fixed reply reads no history
            return self._prompt.call
        fitted = self._prompt.with_history(memory.history(self.conversation_id),
                                           memory.keep_on_drop)
        self.history = (fitted.turns, fitted.dropped)
        return fitted.call

    def record(self, answer: str, partial: bool, done_reason: str,
               answer_tokens: int = 0, prompt_tokens: int = 0) -> None:
        """Remember the answer with the user's message, and what the turn takes in a prompt
        (``answer_tokens``: the model's count of the answer, when known), in one write with
        the tokens counted so far (so count them first). Only an answer the model gave to a
        user's message is remembered: an empty one, or a /v1 request without a user
        message, is not. The turns its call left out go in the same write; a turn without
        an answer drops nothing: they are sent again.

        A store that fails is logged and told no further: the client has the answer.
        """
        if self._loop is not None:
            answer = self._loop.answer  # not the text shown before a tool call
            answer_tokens = 0  # the loop's count is of every call
        self.log.answer = answer
        if not partial:
            self.log.done(prompt_tokens)
        if self._keeping.memory is None or not answer or not self._remember:
            return
        self._keeping.remember(Remembered(
            user=self._remember, assistant=answer, partial=partial, done_reason=done_reason,
            tokens=turn_tokens(self._remember, answer, answer_tokens)), self.history[1])

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
                self.abort.request("client_gone")  # (for the turn's log line)
                raise ClientGone()
        if turns.shutdown.begun:
            self.abort.request("shutting_down")
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
        provider = self._calls
        upstream = self.run(lambda abort: provider.forward(method, path, data, wait=wait,
                                                           abort=abort))
        self._upstream = upstream
        return upstream

    def start(self) -> None:
        """Wait for a slot and open the upstream stream, for ``relay``: what fails before
        the first byte still fails here, with its status.

        :raise ProviderError: the call failed, or was stopped (a subclass that says why).
        """
        with self.log.noting_failure():
            watch = self.begin()
            if self.routing is not None:
                self._route_direct(watch)
            call, streamer = self.build_call(), self.streamer()
            self._stream = answer_only(
                self.run(lambda abort: streamer.stream_chat(call, abort)), watch)
            self._upstream = self._stream

    def relay(self, encoder: Encoder) -> Iterator[bytes]:
        """The plain-text stream of ``start``'s reply, as ``encoder`` writes it (text.py)."""
        assert self._stream is not None and self.watch is not None, "start() first"
        return relay_text(self, self._stream, self.watch, encoder)

    def collect(self) -> ChatChunk:
        """Stream the reply and gather it whole (whole.py), for a client that asked for it
        at once. The answer is remembered and its tokens counted, also those of a reply
        cut short.

        :raise ProviderError: the call failed, or was stopped (a subclass that says why).
        """
        with self.log.noting_failure():
            watch = self.begin()
            if self.routing is not None:
                self._route_direct(watch)
            result = self._gather(self.streamer(), self.build_call(), watch)
        if self._loop is not None:
            result.content = self._loop.answer  # not the text shown before a tool call
        self.record(result.content, False, result.done_reason, result.completion_tokens,
                    result.prompt_tokens)
        return result

    def _gather(self, streamer: Streamer, call: ChatCall, watch: TurnWatch,
                noted: bool = True) -> ChatChunk:
        """One call's reply, gathered whole (whole.py); its tokens counted, also of a reply
        cut short; its first token noted unless it is a router's classifier call.

        :raise ProviderError: the call failed, or was stopped (a subclass that says why).
        """
        try:
            return gather(lambda: answer_only(streamer.stream_chat(call, self.abort), watch),
                          watch, self.count_tokens, self.log.saw_first_token if noted else None)
        except ProviderError as exc:
            raise self._why(exc, noted) from None

    def _why(self, exc: ProviderError, noted: bool = True) -> PiAgentError:
        """Why a provider call failed: for a call stopped from outside, the reason (noted
        for the log line, unless it is a router's classifier call, which has a fallback)."""
        why: PiAgentError = exc
        if self.abort.requested:
            why = STOPPED.get(self.abort.reason, TurnCancelled)()
        if noted:
            self.log.failed(why)
        return why

    def release(self) -> None:
        """Close the upstream call, stop watching and give the slot back, in that order."""
        if self._released:
            return
        self._released = True
        if self._upstream is not None:
            self._upstream.close()
        if self.watch is not None:
            self.watch.stop()
        try:
            self._keeping.finish()  # the tokens not written yet, the claim let go
        finally:
            self.abort.set_handler(None)  # the connection may go back to the pool
            self._turns.admission.leave(self.ticket)
            self._turns.running.remove(self.conversation_id, self._cancel)
            self._write_log()

    def _write_log(self) -> None:
        """The turn's one line: how it ended, its times and tokens; and its metrics, but
        for an embedding, which is no turn to count (turn_log.py)."""
        outcome = self.log.outcome(self.abort.reason if self.abort.requested else "")
        route = self.route.route or self.route.agent if self.route is not None else None
        ticket = self.ticket
        self.log.write(outcome, ticket.entered_at, ticket.admitted_at, {
            "agent": self.agent or None, "route": route, "model": self.model or None,
            "upstream": ticket.upstream if ticket.admitted else None,
            "tool_calls": [call.name for call in self.tool_calls]},
            self._remember if self._turns.settings.log_prompts else None)
        if self._embedding:
            return
        loop = self._loop  # a tool the model made up is counted as "unknown"
        self.log.count(self._turns.metrics, outcome, ticket.admitted_at, self.agent, self.model,
                       [(call.name if loop.knows(call.name) else "unknown", call.ok)
                        for call in loop.calls] if loop is not None else [],
                       (route or "", self.route.by) if self.route is not None else None)
