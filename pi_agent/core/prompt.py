"""What a turn is asked and whom it answers: the call to the model with the place for the
conversation's history (``Prompt``), and the client as the web layer sees it (``Client``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..config import Settings
from ..memory import Turn as Remembered
from ..providers.base import ChatCall
from .agents import Agent
from .context import history_budget, history_start, turn_tokens
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
    request_id: str = ""  # X-Request-ID, for the turn's log line


@dataclass(frozen=True)
class Fitted:
    """A call with the history that fits its budget: ``turns`` remembered turns went in,
    the ``dropped`` oldest ones were left out (and are to be forgotten)."""

    call: ChatCall
    turns: int
    dropped: int


@dataclass(frozen=True)
class Prompt:
    """The call to the model as the request asks for it. The conversation's remembered
    turns go in at ``history_at`` once the turn holds its slot, as many as fit beside the
    call's own messages and its reply (context.py). With a ``toolbox``, the gateway runs
    the agent's tools between model calls."""

    call: ChatCall
    history_at: int = 0
    toolbox: Toolbox | None = None  # an agent's tools, run by the gateway (steps.py)

    def with_history(self, history: list[Remembered], keep: int) -> Fitted:
        """The call with the newest remembered turns that fit; over the budget, the oldest
        go in one block, all but the newest ``keep`` (fewer if those do not fit)."""
        if not history:
            return Fitted(self.call, 0, 0)
        call = self.call
        tools = self.toolbox.definitions() if self.toolbox is not None else call.tools
        budget = history_budget(call.messages, call.options["num_ctx"],
                                call.options["num_predict"], tools)
        costs = [turn.tokens or turn_tokens(turn.user, turn.assistant) for turn in history]
        start = history_start(costs, budget, keep)
        messages = remembered_messages(history[start:])
        at = self.history_at
        return Fitted(replace(call, messages=[*call.messages[:at], *messages,
                                              *call.messages[at:]]),
                      len(history) - start, start)


def prompt_for(agent: Agent, settings: Settings, message: str,
               library: Library) -> tuple[Prompt, tuple[Source, ...] | None]:
    """A chat agent's prompt for ``message``, with the sources its knowledge gives (None for
    an agent without knowledge) and its tools; the history goes in after its system prompt.
    """
    sources = library.search(agent, message) if agent.knowledge is not None else None
    return Prompt(build_call(agent, settings, message, sources), history_at=1,
                  toolbox=agent.toolbox()), sources
