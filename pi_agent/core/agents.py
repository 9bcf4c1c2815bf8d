"""Agent presets: a system prompt, a model and Ollama options laid over the configured
ones."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings


@dataclass(frozen=True)
class Agent:
    """A preset for a conversation. ``model`` None means the configured default model;
    ``options`` are Ollama options laid over the configured ones."""

    name: str
    description: str
    system_prompt: str
    model: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def resolve_model(self, settings: Settings) -> str:
        return self.model or settings.model

    def resolve_options(self, settings: Settings) -> dict[str, Any]:
        """Return the Ollama options for a call: configuration, then the preset's own, with
        ``num_predict`` never above the configured cap."""
        options = base_options(settings)
        options.update(self.options)
        options["num_predict"] = min(options["num_predict"], settings.num_predict)
        return options


def base_options(settings: Settings) -> dict[str, Any]:
    """The configured Ollama options, which every call starts from."""
    return {
        "temperature": settings.temperature,
        "num_ctx": settings.num_ctx,
        "num_predict": settings.num_predict,
    }


# num_ctx stays the configured one in every preset: a different value reloads the model,
# which takes minutes on a Pi.
AGENTS: tuple[Agent, ...] = (
    Agent(
        name="general",
        description="A helpful general assistant that answers clearly and briefly.",
        system_prompt=(
            "You are a helpful assistant running on a small home computer. Answer clearly and "
            "briefly, in the language of the question. If you are not sure of something, say "
            "so instead of guessing. Use plain text unless you are asked for code or a list."
        ),
    ),
    Agent(
        name="coder",
        description="A terse programming assistant: code first, short explanations.",
        system_prompt=(
            "You are a terse programming assistant. Answer with working code first and keep "
            "explanations to a few sentences. Point out bugs and risks you notice."
        ),
        options={"temperature": 0.2},
    ),
)


def index_agents(agents: tuple[Agent, ...] = AGENTS) -> dict[str, Agent]:
    """Return the presets by name, in the order they are listed."""
    return {agent.name: agent for agent in agents}
