"""Model providers, by the name that ``PI_AGENT_PROVIDER`` uses."""
from __future__ import annotations

from collections.abc import Callable

from ..config import Settings
from .base import ChatCall, ChatChunk, ChatStream, Provider
from .ollama import OllamaProvider
from .pool import UpstreamPool

# Each is a pool of one or more servers of its kind (see pool.py).
PROVIDERS: dict[str, Callable[[Settings], UpstreamPool]] = {
    "ollama": UpstreamPool.from_settings,
}

__all__ = ["PROVIDERS", "ChatCall", "ChatChunk", "ChatStream", "OllamaProvider", "Provider",
           "UpstreamPool"]
