"""Model providers, by the name that ``PI_AGENT_PROVIDER`` uses."""
from __future__ import annotations

from collections.abc import Callable

from ..config import Settings
from .base import ChatCall, ChatChunk, ChatStream, Provider
from .ollama import OllamaProvider

PROVIDERS: dict[str, Callable[[Settings], Provider]] = {
    "ollama": OllamaProvider.from_settings,
}

__all__ = ["PROVIDERS", "ChatCall", "ChatChunk", "ChatStream", "OllamaProvider", "Provider"]
