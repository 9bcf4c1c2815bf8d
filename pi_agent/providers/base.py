"""What the gateway asks of a model provider, and what a provider hands back."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True, slots=True)
class ChatCall:
    """One chat request to a model: the full message list and the generation options.

    ``messages`` are in Ollama's form (string content, ``images``, ``tool_calls`` with
    arguments as objects); ``tools``, ``format`` and ``think`` are sent only when set.
    """

    model: str
    messages: list[dict[str, Any]]
    options: dict[str, Any]
    keep_alive: int | str
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model asked for, with its arguments decoded."""

    id: str
    name: str
    arguments: dict[str, Any]


# Not frozen: one is made per token, and a frozen dataclass is slower to build.
@dataclass(slots=True)
class ChatChunk:
    """A piece of a reply; the last one has ``done`` set, a ``done_reason`` and the counts.
    A whole reply gathered from a stream is one chunk with ``done`` set."""

    content: str = ""
    thinking: str = ""
    done: bool = False
    done_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Ollama sends each call whole, in one chunk.
    tool_calls: list[ToolCall] | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """An installed model: its full name and when it was last changed (Unix seconds)."""

    name: str
    modified_at: int = 0


class Forwarded(Protocol):
    """A model server's own answer, status and body as they came, for the APIs that relay
    it unchanged. Iterating yields the body's pieces as they arrive (one NDJSON line per
    piece for a stream) and raises ``ProviderError`` subclasses only."""

    status: int
    content_type: str

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class Abort:
    """Lets one thread stop a provider call that another thread is making.

    The provider sets a handler (e.g. "shut the socket") while the call is under way;
    ``request`` runs it, at once or as soon as one is set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handler: Callable[[], None] | None = None
        self.requested = False
        self.reason = ""  # why, as the first request said: "cancelled", "client_gone", ...

    def set_handler(self, handler: Callable[[], None] | None) -> None:
        with self._lock:
            self._handler = handler
            run = handler if self.requested else None
        if run is not None:
            run()

    def request(self, reason: str = "stopped") -> None:
        with self._lock:
            if not self.requested:
                self.reason = reason
            self.requested = True
            handler = self._handler
        if handler is not None:
            handler()


class ChatStream(Protocol):
    """The chunks of a streamed reply; ``close`` releases the upstream connection.

    Iterating raises ``ProviderError`` subclasses only, never a transport error.
    """

    def __iter__(self) -> Iterator[ChatChunk]: ...

    def close(self) -> None: ...


class Provider(Protocol):
    """A model server. Every failure is raised as a ``ProviderError`` subclass."""

    name: str

    def stream_chat(self, call: ChatCall, abort: Abort | None = None) -> ChatStream: ...

    def list_models(self) -> list[ModelInfo]: ...

    def forward(
        self, method: str, path: str, body: bytes | None = None, *,
        wait: Literal["quick", "stream", "whole"] = "quick", abort: Abort | None = None,
    ) -> Forwarded:
        """Send a request of the model server's own API and hand back its answer as it is."""
        ...

    def close(self) -> None: ...
