"""What the gateway asks of a model provider, and what a provider hands back."""
from __future__ import annotations

from collections.abc import Iterator
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


class ChatStream(Protocol):
    """The chunks of a streamed reply; ``close`` releases the upstream connection.

    Iterating raises ``ProviderError`` subclasses only, never a transport error.
    """

    def __iter__(self) -> Iterator[ChatChunk]: ...

    def close(self) -> None: ...


class Provider(Protocol):
    """A model server. Every failure is raised as a ``ProviderError`` subclass."""

    name: str

    def chat(self, call: ChatCall) -> ChatChunk: ...

    def stream_chat(self, call: ChatCall) -> ChatStream: ...

    def list_models(self) -> list[str]: ...

    def close(self) -> None: ...
