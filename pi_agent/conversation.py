"""A conversation as the model sees it and as memory keeps it: remembered turns as chat
messages, and the recording of a turn's answer. No Flask: every front uses it."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .memory import MemoryStore, Turn

# Stores a finished or partial answer; built before the stream starts, so it holds plain values.
Recorder = Callable[[str, bool, str], None]


def remembered_messages(history: list[Turn]) -> list[dict[str, Any]]:
    """A conversation's remembered turns as chat messages, oldest first."""
    messages: list[dict[str, Any]] = []
    for turn in history:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    return messages


def recorder(
    memory: MemoryStore | None, conversation_id: str, message: str, owner: str
) -> Recorder:
    """How a turn remembers its answer to ``message``; with no memory, it does not."""
    def record(answer: str, partial: bool, done_reason: str) -> None:
        # Only an answer the model gave to a user's message is remembered: an empty one, a
        # failed turn, or a /v1 request without a user message is not.
        if memory is not None and answer and message:
            memory.append_turn(
                conversation_id,
                Turn(user=message, assistant=answer, partial=partial, done_reason=done_reason),
                owner,
            )

    return record
