"""A conversation as the model sees it: the call an agent makes for a new message, and the
remembered turns as chat messages. No Flask: every front uses it."""
from __future__ import annotations

import re
from typing import Any

from ..config import Settings
from ..memory import Turn
from ..providers.base import ChatCall
from .agents import Agent
from .knowledge import Source, with_sources


def remembered_messages(history: list[Turn]) -> list[dict[str, Any]]:
    """A conversation's remembered turns as chat messages, oldest first."""
    messages: list[dict[str, Any]] = []
    for turn in history:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    return messages


# Letters, digits, "-" and "_" only: a conversation id goes into a response header and the log.
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def build_call(agent: Agent, settings: Settings, message: str,
               sources: tuple[Source, ...] | None = None) -> ChatCall:
    """Build the upstream request: the agent's system prompt (with the ``sources`` found in
    its documents, numbered), then the new message; the turn puts the remembered turns
    between the two (``Prompt(history_at=1)``).
    """
    system = agent.system_prompt if sources is None else with_sources(agent.system_prompt,
                                                                      sources)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": message}]
    return ChatCall(
        model=agent.resolve_model(settings),
        messages=messages,
        options=agent.resolve_options(settings),
        keep_alive=settings.keep_alive,
        think=agent.think,
    )
