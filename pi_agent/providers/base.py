"""What the gateway asks of a model provider, and what a provider hands back."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ChatCall:
    """One chat request to a model: the full message list and the generation options."""

    model: str
    messages: list[dict[str, str]]
    options: dict[str, Any]
    keep_alive: int | str


# Not frozen: one is made per token, and a frozen dataclass is slower to build.
@dataclass(slots=True)
class ChatChunk:
    """A piece of a reply; the last one has ``done`` set, a ``done_reason`` and the counts.

    A non-stream call returns a single chunk with the whole reply and ``done`` set.
    """

    content: str = ""
    thinking: str = ""
    done: bool = False
    done_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


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

    def chat(self, call: ChatCall, abort: Abort | None = None) -> ChatChunk: ...

    def stream_chat(self, call: ChatCall, abort: Abort | None = None) -> ChatStream: ...

    def list_models(self) -> list[str]: ...

    def close(self) -> None: ...
