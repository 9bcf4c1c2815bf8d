"""A router agent: where each message goes. Keywords first (a case-insensitive substring of
the message; the first route in file order that matches wins), then one short classifier
call to the model, whose answer is held to the route names by a JSON schema; an invalid or
failed classification goes to the fallback agent. A route with a ``reply`` answers with
that text, word by word, without a model call."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..errors import AgentNotFound, ProviderError
from ..providers.base import Abort, ChatCall, ChatChunk
from .agents import Agent, Route
from .events import Event, Routed, Sourced
from .knowledge import Library, Source
from .prompt import Prompt, prompt_for

CLASSIFIER_TOKENS = 16


@dataclass(frozen=True)
class Decision:
    """The route taken: ``route`` None on fallback; ``agent`` None for a fixed reply;
    ``by`` is "keyword", "classifier" or "fallback"."""

    route: str | None
    agent: str | None
    by: str
    reply: str | None = None


def by_keyword(router: Agent, message: str) -> Decision | None:
    lowered = message.lower()
    for route in router.routes:
        if any(keyword.lower() in lowered for keyword in route.keywords if keyword):
            return _decision(route, "keyword")
    return None


def fallback(router: Agent) -> Decision:
    return Decision(None, router.fallback, "fallback")


def classifier_call(router: Agent, settings: Settings, message: str) -> ChatCall:
    """One short call whose answer can only be ``{"route": "<a route's name>"}``."""
    lines = [f"- {route.name}" + (f": for example {'; '.join(route.examples)}"
                                  if route.examples else "") for route in router.routes]
    system = ("Classify the user's message into exactly one route. Answer with JSON "
              '{"route": "<name>"}. The routes:\n' + "\n".join(lines))
    options = {"temperature": 0, "num_ctx": settings.num_ctx, "num_predict": CLASSIFIER_TOKENS}
    schema: dict[str, Any] = {
        "type": "object", "required": ["route"],
        "properties": {"route": {"type": "string",
                                 "enum": [route.name for route in router.routes]}}}
    return ChatCall(model=router.resolve_model(settings),
                    messages=[{"role": "system", "content": system},
                              {"role": "user", "content": message}],
                    options=options, keep_alive=settings.keep_alive, format=schema,
                    think=router.think if router.think is not None else False)


def read_classification(router: Agent, answer: str) -> Decision:
    """The classifier's answer as a decision; anything but a known route is the fallback."""
    try:
        name = json.loads(answer).get("route")
    except (ValueError, AttributeError):
        return fallback(router)
    route = next((r for r in router.routes if r.name == name), None)
    return _decision(route, "classifier") if route is not None else fallback(router)


def _decision(route: Route, by: str) -> Decision:
    return Decision(route.name, route.agent, by, route.reply)


class FixedReply:
    """A route's fixed reply, streamed word by word as a model's reply would be; it makes
    no call and counts no tokens. Stands in for the provider where a reply is streamed."""

    name = "fixed"

    def __init__(self, text: str) -> None:
        self.text = text

    def stream_chat(self, call: ChatCall | None = None, abort: Abort | None = None) -> Reply:
        return Reply(self.text)


class Reply:
    """The chunks of a fixed reply: each word with the space before it, then the end."""

    def __init__(self, text: str) -> None:
        self._words = re.findall(r"\s*\S+", text)

    def __iter__(self) -> Iterator[ChatChunk]:
        for word in self._words:
            yield ChatChunk(content=word)
        yield ChatChunk(done=True, done_reason="stop")

    def close(self) -> None:
        pass


class Routing:
    """Where one turn of a router goes: the router, the message, and what a route leads to
    (the agents of the same book, their knowledge)."""

    def __init__(self, router: Agent, message: str, settings: Settings) -> None:
        self.router = router
        self.message = message
        self._settings = settings

    @property
    def model(self) -> str:
        return self.router.resolve_model(self._settings)

    def by_keyword(self) -> Decision | None:
        return by_keyword(self.router, self.message)

    def classifier_call(self) -> ChatCall:
        return classifier_call(self.router, self._settings, self.message)

    def read(self, answer: str) -> Decision:
        return read_classification(self.router, answer)

    def fallback(self) -> Decision:
        return fallback(self.router)

    def decide(self, classify: Callable[[ChatCall], str], abort: Abort) -> Decision:
        """The keywords' decision, else the answer of ``classify`` (which makes the
        classifier call), else, if that call failed, the fallback.

        :raise ProviderError: the call was stopped from outside (``abort``).
        """
        decision = self.by_keyword()
        if decision is not None:
            return decision
        try:
            return self.read(classify(self.classifier_call()))
        except ProviderError:
            if abort.requested:
                raise
            return self.fallback()


@dataclass(frozen=True)
class Plan:
    """How a routed turn answers: its prompt, a fixed reply (else the model), the sources
    of the route's agent, and the events that tell the client so."""

    prompt: Prompt
    fixed: FixedReply | None
    sources: tuple[Source, ...] | None
    events: list[Event]


def plan_route(decision: Decision, routing: Routing, agents: Mapping[str, Agent],
               library: Library, settings: Settings) -> Plan:
    """Answer as ``decision`` says: with a route's agent (its prompt, its sources) or a
    fixed reply.

    :raise AgentNotFound: 404, the route's agent is gone from the agents file.
    """
    events: list[Event] = [Routed(decision.route, decision.agent, decision.by)]
    if decision.reply is not None:
        never_sent = ChatCall(routing.model, [], {}, settings.keep_alive)
        return Plan(Prompt(never_sent), FixedReply(decision.reply), None, events)
    target = agents.get(decision.agent or "")
    if target is None:  # the agents file changed since the router was read
        raise AgentNotFound(decision.agent or "")
    prompt, sources = prompt_for(target, settings, routing.message, library)
    if sources is not None:
        events.append(Sourced(sources))
    return Plan(prompt, None, sources, events)
