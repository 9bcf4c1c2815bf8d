"""What ``create_app`` builds once and every request uses, kept on the app."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flask import Flask, current_app

from .config import Settings
from .core.admission import Admission
from .core.agents import Agent
from .core.knowledge import Library
from .core.lifecycle import Shutdown
from .core.readiness import Readiness
from .core.running import RunningTurns
from .core.turn import Turns
from .core.watch import Watchdog
from .memory import Store
from .metrics import Metrics
from .providers.pool import UpstreamPool
from .security.keys import KeyRing
from .security.limits import Limits

EXTENSION_KEY = "pi_agent"


@dataclass(frozen=True)
class AppState:
    """The settings, the model provider, the store and the memory (the store, None when
    memory is off), the agents, the readiness check, the admission control, the turns under
    way, the API keys and their limits, the metrics."""

    settings: Settings
    provider: UpstreamPool  # one Ollama or several
    store: Store  # memory and each key's tokens per day
    memory: Store | None
    agents: Mapping[str, Agent]
    readiness: Readiness
    admission: Admission
    running: RunningTurns
    shutdown: Shutdown
    watchdog: Watchdog
    keys: KeyRing | None  # None: no key file, local mode
    limits: Limits
    turns: Turns  # opens each request's turn, with the parts above that a turn uses
    knowledge: Library  # the agents' document indexes
    metrics: Metrics  # for GET /metrics; the turns, admission and the library count into it


def current_state() -> AppState:
    """Return the state of the app that handles the current request."""
    state: AppState = current_app.extensions[EXTENSION_KEY]
    return state


def announce_shutdown(app: Flask, grace_seconds: float) -> None:
    """Tell ``app`` that its server stops accepting and will end what runs after
    ``grace_seconds``; gunicorn.conf.py calls this on SIGTERM."""
    state = app.extensions.get(EXTENSION_KEY)
    if state is not None:
        state.shutdown.begin(grace_seconds)
