"""The request and response bodies of the project's own API, as pydantic models."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    field_validator,
)

from ...errors import FieldProblem

# The hard limit; PI_AGENT_MAX_MESSAGE_CHARS (4000 by default) is checked in the view.
MAX_MESSAGE_CHARS = 1_000_000


ConversationId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
]


AgentName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
]


class ChatRequest(BaseModel):
    """``POST /chat``. Unknown fields are refused so that a typo such as ``strem`` is seen."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    agent: AgentName = "general"
    stream: StrictBool = False
    conversation_id: ConversationId | None = None

    @field_validator("message")
    @classmethod
    def _encodable(cls, value: str) -> str:
        # JSON allows lone surrogates ("\ud800"), which cannot be sent on as UTF-8.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (no lone surrogates)") from None
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SourceInfo(BaseModel):
    """A passage cited as [id]: its heading (or file name), its file, its start, its BM25
    score (higher is better)."""

    id: int
    title: str
    path: str
    snippet: str
    score: float


class RouteInfo(BaseModel):
    """Where a router sent a message: ``route`` null on fallback, ``agent`` null for a
    fixed reply; ``by`` keyword, classifier or fallback."""

    route: str | None
    agent: str | None
    by: str


class ToolCallInfo(BaseModel):
    """A tool call the gateway ran for the answer: ``content`` is at most 500 characters of
    what the model was told (``error: <reason>`` when ``ok`` is false)."""

    id: str
    name: str
    arguments: dict[str, Any]
    ok: bool
    content: str
    ms: int


class HistoryInfo(BaseModel):
    """The remembered turns that went into the call, and the oldest ones its token budget
    left out (and memory forgot)."""

    turns: int
    dropped: int


class ChatReply(BaseModel):
    """The answer of a non-stream ``POST /chat``."""

    reply: str
    conversation_id: str
    agent: str
    model: str
    provider: str
    done_reason: str
    usage: Usage
    # The passages of the agent's documents given to the model (empty: none, or no knowledge).
    sources: list[SourceInfo]
    route: RouteInfo | None  # where a router sent the message; null for other agents
    tool_calls: list[ToolCallInfo]  # run by the gateway for the answer, in order
    steps: int  # the model calls made for the answer (0 for a router's fixed reply)
    history: HistoryInfo
    upstream: str  # the model server whose slot the turn held (host:port)


class Cancelled(BaseModel):
    conversation_id: str
    status: str


class ConversationInfo(BaseModel):
    conversation_id: str
    turns: int
    owner: str | None = None  # the key id, shown to admin keys only


class ConversationList(BaseModel):
    conversations: list[ConversationInfo]


class TurnInfo(BaseModel):
    user: str
    assistant: str
    partial: bool
    done_reason: str


class ConversationTurns(BaseModel):
    conversation_id: str
    turns: list[TurnInfo]


class Forgotten(BaseModel):
    conversation_id: str
    status: str


class Health(BaseModel):
    status: str
    version: str


class UpstreamState(BaseModel):
    upstream: str  # host:port
    status: str  # ready, not_ready
    reason: str | None = None


class Readiness(BaseModel):
    status: str  # ready, degraded (the shared store does not answer), not_ready
    model: str
    reason: str | None = None
    upstreams: list[UpstreamState] | None = None  # with several upstreams


class AgentList(BaseModel):
    agents: list[str]


class AgentInfo(BaseModel):
    name: str
    description: str
    kind: str  # "chat" or "router"
    model: str
    options: dict[str, Any]
    tools: list[str]  # the names the model sees
    knowledge: list[str] | None  # the paths of its documents


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: list[FieldProblem] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# The event stream's events (``/chat/stream``, ``/chat`` with ``"stream": true`` and an
# event Accept): the data of each, as events.py writes it. They describe the stream in the
# API docs (openapi.py); the encoder writes its bytes by hand, since a model per token would
# cost the relay, and tests/test_openapi.py checks each event of a real stream against its
# model here.


class StartEvent(BaseModel):
    """First: the turn is taken."""

    conversation_id: str
    agent: str
    model: str


class QueuedEvent(BaseModel):
    """The turn waits for a generation slot: its place, from 1, as it changes."""

    position: int


class RouteEvent(BaseModel):
    """Where a router sent the message."""

    route: str | None
    agent: str | None
    by: str


class SourcesEvent(BaseModel):
    """The passages of the agent's documents given to the model, as the reply cites them."""

    sources: list[SourceInfo]


class TokenEvent(BaseModel):
    """A piece of the reply."""

    content: str


class ToolCallEvent(BaseModel):
    """The model called a tool; the gateway runs it."""

    id: str
    name: str
    arguments: dict[str, Any]


class ToolResultEvent(BaseModel):
    """What the tool answered (``content`` at most 500 characters)."""

    id: str
    name: str
    ok: bool
    content: str
    ms: int


class Timings(BaseModel):
    queue_ms: int
    first_token_ms: int | None
    total_ms: int


class DoneEvent(BaseModel):
    """Last, on success."""

    conversation_id: str
    done_reason: str
    usage: Usage
    timings: Timings
    steps: int
    tool_calls: list[ToolCallInfo]
    history: HistoryInfo
    upstream: str


class ErrorEvent(BaseModel):
    """Last, when the turn ended without its reply (after the stream began)."""

    code: str
    message: str


# The events by the name they are sent under.
EVENTS: dict[str, type[BaseModel]] = {
    "start": StartEvent, "queued": QueuedEvent, "route": RouteEvent, "sources": SourcesEvent,
    "token": TokenEvent, "tool_call": ToolCallEvent, "tool_result": ToolResultEvent,
    "done": DoneEvent, "error": ErrorEvent,
}
