"""Pi Agent Server: a small agent gateway in front of Ollama."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["__version__", "create_app"]


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Create and configure the Flask app (see pi_agent/app.py).

    :raise ConfigError: a setting is invalid; the message names it.
    """
    # Imported here, not at the top: gunicorn's master imports pi_agent.config, and with it
    # this package, and must not load Flask or requests (they import ssl before gevent
    # patches it in the worker).
    from .app import create_app as build

    return build(config)
