"""What a turn is asked and whom it answers: the call to the model with the place for the
conversation's history (``Prompt``), and the client as the web layer sees it (``Client``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..config import Settings
from ..memory import Turn as Remembered
from ..providers.base import ChatCall
from .agents import Agent
from .context import trim_history
from .conversation import build_call, remembered_messages
from .knowledge import Library, Source
from .tools import Toolbox


@dataclass(frozen=True)
class Client:
    """The turn's client as the web layer sees it: ``gone`` tells whether it closed its
    connection (None: cannot tell without writing), ``hang_up`` closes that connection,
    which frees a write that a client reading nothing holds up."""

    gone: Callable[[], bool] | None = None
    hang_up: Callable[[], None] | None = None


@dataclass(frozen=True)
class Prompt:
    """The call to the model as the request asks for it. The conversation's remembered
    turns go in at ``history_at`` once the turn holds its slot; ``fit_history`` drops the
    oldest of them that would not fit ``num_ctx`` beside the request's messages (``/v1``,
    whose clients send whole conversations); ``/chat`` sends what memory kept. With a
    ``toolbox``, the gateway runs the agent's tools between model calls."""

    call: ChatCall
    history_at: int = 0
    fit_history: bool = False
    toolbox: Toolbox | None = None  # an agent's tools, run by the gateway (steps.py)

    def with_history(self, history: list[Remembered]) -> ChatCall:
        if not history:
            return self.call
        messages = remembered_messages(history)
        if self.fit_history:
            messages = trim_history(messages, self.call.messages, self.call.options["num_ctx"])
        given = self.call.messages
        at = self.history_at
        return replace(self.call, messages=[*given[:at], *messages, *given[at:]])


def prompt_for(agent: Agent, settings: Settings, message: str,
               library: Library) -> tuple[Prompt, tuple[Source, ...] | None]:
    """A chat agent's prompt for ``message``, with the sources its knowledge gives (None for
    an agent without knowledge) and its tools; the history goes in after its system prompt.
    """
    sources = library.search(agent, message) if agent.knowledge is not None else None
    return Prompt(build_call(agent, settings, message, sources), history_at=1,
                  toolbox=agent.toolbox()), sources
