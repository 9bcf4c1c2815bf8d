"""What a turn tells its client, as one sequence of typed events, and the encoders that
write it in each front's format.

A turn yields ``Started``, then ``Queued`` while it waits for a slot, ``Sourced`` for an
agent with knowledge, then the reply's chunks (``ChatChunk``, as the provider gives them:
text, thinking or tool calls), then exactly one ``Done`` or ``Failed``; ``Heartbeat``
whenever nothing else was said for a while; a router's turn says where it went with
``Routed`` once it has a slot; an agent with tools says ``ToolCalled`` and ``ToolAnswered``
for each call it runs between its model calls (steps.py). An encoder shows nothing of an
event it has no method for, so a new kind of event changes no other front: only the native
event stream shows routes, sources and tool calls. ``Stepped`` and ``Held`` are for the
relay's clock alone (a model call began; the model wrote text that is held back) and no
encoder shows them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import PiAgentError
from ..providers.base import ChatChunk
from .knowledge import Source


@dataclass(frozen=True, slots=True)
class Started:
    """The turn is accepted: its conversation, agent and model."""

    conversation_id: str
    agent: str
    model: str


@dataclass(frozen=True, slots=True)
class Queued:
    """The turn waits for a generation slot, at ``position`` (from 1)."""

    position: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing else happened for a heartbeat interval: the client learns the turn is alive."""


@dataclass(frozen=True, slots=True)
class Routed:
    """Where a router sent the message: ``route`` None on fallback, ``agent`` None for a
    fixed reply; ``by`` is "keyword", "classifier" or "fallback". Sent after ``Started``."""

    route: str | None
    agent: str | None
    by: str


@dataclass(frozen=True, slots=True)
class Sourced:
    """The passages of the agent's documents given to the model, numbered as cited; sent
    once, before the first token, for an agent with knowledge (empty: none matched)."""

    sources: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class ToolCalled:
    """The model asked for a tool, and the gateway runs it now. ``id`` is unique in the turn."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolAnswered:
    """A tool call's result as the client sees it: ``content`` is at most ``SHOWN_CHARS`` of
    what the model was given (``error: <reason>`` when ``ok`` is false); ``ms`` its time."""

    id: str
    name: str
    arguments: dict[str, Any]
    ok: bool
    content: str
    ms: int


@dataclass(frozen=True, slots=True)
class Stepped:
    """A tool loop's next model call (``step`` from 2) began: its first-token wait starts."""

    step: int


@dataclass(frozen=True, slots=True)
class Held:
    """The model wrote text that is held back (it may be a tool call written as JSON): the
    model is not idle, though nothing is written."""


@dataclass(frozen=True, slots=True)
class Done:
    """The reply ended. ``chunk`` is its last chunk (it may carry text too), with the
    counts of every model call of the turn; ``timings`` are milliseconds: queue_ms,
    first_token_ms, total_ms. ``steps`` counts the model calls made for the answer (0 for
    a fixed reply); ``tool_calls`` are the tool calls run for it; ``history`` the remembered
    turns that went into the call and those its budget left out; ``upstream`` the model
    server that answered."""

    chunk: ChatChunk
    conversation_id: str
    timings: dict[str, int]
    steps: int = 1
    tool_calls: tuple[ToolAnswered, ...] = ()
    history: tuple[int, int] = (0, 0)
    upstream: str = ""  # the upstream that served it (host:port)


@dataclass(frozen=True, slots=True)
class Failed:
    """The turn ended without its reply; ``error`` says why."""

    error: PiAgentError


# A chunk of the reply is the provider's ChatChunk itself: none is copied per token.
Event = (Started | Queued | Heartbeat | Routed | Sourced | ChatChunk | ToolCalled
         | ToolAnswered | Stepped | Held | Done | Failed)

HEARTBEAT = Heartbeat()
HELD = Held()
# What a client is shown of a tool's result, at most; the model gets up to 2,000 characters.
SHOWN_CHARS = 500


class Encoder:
    """Writes a turn's events as one API's bytes: ``encode`` calls the method for the
    event's kind; a kind the encoder has no method for writes ``b""``."""

    content_type = "application/octet-stream"
    _methods: ClassVar[dict[type, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = {Started: "start", Queued: "queued", Heartbeat: "ping", Routed: "route",
                 Sourced: "sources", ChatChunk: "chunk", ToolCalled: "tool_call",
                 ToolAnswered: "tool_result", Done: "done", Failed: "error"}
        cls._methods = {kind: getattr(cls, name) for kind, name in names.items()
                        if hasattr(cls, name)}

    def encode(self, event: Event) -> bytes:
        method = self._methods.get(type(event))
        return method(self, event) if method is not None else b""

    def chunk_writer(self) -> Callable[[ChatChunk], bytes]:
        """The encoder's own method for the reply's chunks, for the per-token path: one
        call per token, without the lookup ``encode`` makes."""
        method = self._methods.get(ChatChunk)
        if method is None:
            return _nothing
        writer: Callable[[ChatChunk], bytes] = method.__get__(self)
        return writer


def _nothing(chunk: ChatChunk) -> bytes:
    return b""
