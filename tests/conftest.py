from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from pi_agent import create_app
from pi_agent.state import EXTENSION_KEY, AppState

from .fake_ollama import FakeOllama
from .redis_server import RedisServer


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """Run every test without the PI_AGENT_* variables of the shell that started pytest."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("PI_AGENT_")}
    for key in saved:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("PI_AGENT_")]:
        del os.environ[key]
    os.environ.update(saved)


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> bool:
    """Ask ``condition`` until it holds, for at most ``seconds``; return whether it did."""
    deadline = time.monotonic() + seconds
    while not (met := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return met


@contextmanager
def running_fake() -> Iterator[FakeOllama]:
    """A started fake Ollama, stopped afterwards; its handlers must not have failed."""
    fake = FakeOllama().start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.handler_errors == []


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    with running_fake() as fake:
        yield fake


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; each user keeps to a prefix of its own."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOllama]:
    """One fake Ollama for a module's gunicorn server; ``fake`` resets it for each test."""
    with running_fake() as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeOllama) -> FakeOllama:
    upstream.reset()
    return upstream


def unused_port() -> int:
    """Return a loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def app_config(fake_ollama: FakeOllama) -> dict[str, Any]:
    """The settings of the ``app`` fixture; a test may change them before using ``app``."""
    return {
        "TESTING": True,
        "OLLAMA_URL": fake_ollama.url,
        "CONNECT_TIMEOUT": 2,
        "READ_TIMEOUT": 5,
    }


@pytest.fixture
def make_app(app_config: dict[str, Any]) -> Iterator[Callable[..., Flask]]:
    """Build apps from ``app_config`` plus overrides; each is closed after the test."""
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        app = create_app({**app_config, **overrides})
        apps.append(app)
        return app

    yield make
    for app in apps:
        state(app).provider.close()
        state(app).store.close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def state(app: Flask) -> AppState:
    result: AppState = app.extensions[EXTENSION_KEY]
    return result
