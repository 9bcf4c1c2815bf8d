"""What ``create_app`` builds once and every request uses, kept on the app."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import current_app

from .admission import Admission
from .config import Settings
from .keys import KeyRing
from .limits import Limits
from .lifecycle import Shutdown
from .streaming import Watchdog
from .memory import MemoryStore
from .providers.base import Provider

if TYPE_CHECKING:
    from .agents import Agent
    from .events import RunningTurns
    from .health import ReadinessCheck

EXTENSION_KEY = "pi_agent"


@dataclass(frozen=True)
class AppState:
    """The settings, the model provider, the memory (None when disabled), the agents, the
    readiness check, the admission control, the turns under way, the API keys and their
    limits."""

    settings: Settings
    provider: Provider
    memory: MemoryStore | None
    agents: Mapping[str, Agent]
    readiness: ReadinessCheck
    admission: Admission
    running: RunningTurns
    shutdown: Shutdown
    watchdog: Watchdog
    keys: KeyRing | None  # None: no key file, local mode
    limits: Limits


def current_state() -> AppState:
    """Return the state of the app that handles the current request."""
    state: AppState = current_app.extensions[EXTENSION_KEY]
    return state
