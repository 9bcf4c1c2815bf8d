"""The app factory: builds the settings, the state every request uses, the hooks and the
routes. Imported by ``pi_agent.create_app`` only when an app is built, so that gunicorn's
master, which imports ``pi_agent.config``, loads neither Flask nor requests (both import ssl
before gevent could patch it)."""
from __future__ import annotations

import functools
import importlib
import logging
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flask import Flask
from flask_cors import CORS

from .config import ConfigError, Settings, load_settings, metrics_folder, setting_keys
from .core.admission import Admission, SharedSlots
from .core.agent_file import AgentsFileError, load_agents
from .core.agents import AgentBook
from .core.knowledge import Library
from .core.lifecycle import Shutdown
from .core.readiness import Readiness, ReadinessCheck
from .core.running import RunningTurns
from .core.turn import Turns
from .core.watch import Watchdog
from .hosts import watch_host
from .logformat import JsonFormatter
from .memory import MemoryStore, Store
from .metrics import Metrics
from .providers import PROVIDERS
from .security.keys import KeyFileError, KeyRing, Offload
from .security.limits import Limits, SharedCounts
from .state import EXTENSION_KEY, AppState
from .stores.sqlite import SqliteStore
from .stores.sqlite_file import StoreFileError, state_file
from .stores.threads import OneThread, PlainThread
from .web import auth, errors, framing, page, tracing
from .web import metrics as web_metrics
from .web.native import agents, chat, conversations, health, openapi
from .web.native.errors import render_error
from .web.ollama import errors as ollama_errors
from .web.ollama import routes as ollama_routes
from .web.openai import errors as openai_errors
from .web.openai import routes as openai_routes

# The package's logger: every module's logs under it.
logger = logging.getLogger("pi_agent")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Create and configure an instance of the Flask application.

    Settings come from the defaults, then ``PI_AGENT_*`` environment variables, then
    ``config`` (setting names without the prefix, e.g. ``{"MODEL": "qwen3:0.6b"}``; other
    keys, such as ``TESTING``, go to Flask's own config).

    :raise ConfigError: a setting is invalid; the message names it.
    """
    settings = load_settings(config)
    app = Flask("pi_agent")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config.from_mapping(
        {key: value for key, value in (config or {}).items() if key.upper() not in setting_keys()}
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    _configure_logging(settings.log_level, settings.log_format)
    app.extensions[EXTENSION_KEY] = build_state(settings)

    errors.init_app(app, [(openai_errors.owns, openai_errors.render_error),
                          (ollama_errors.owns, ollama_errors.render_error)], render_error)
    tracing.init_app(app)
    framing.init_app(app)
    page.init_app(app)  # before auth: a browser at / is sent to the page, key or not
    auth.init_app(app)
    web_metrics.init_app(app)
    if settings.cors_origins:
        _allow_origins(app, settings.cors_origins)
    for blueprint in (health.bp, agents.bp, chat.bp, conversations.bp, openai_routes.bp,
                      ollama_routes.bp):
        app.register_blueprint(blueprint)
    openapi.init_app(app)
    watch_host(app, settings)
    return app


def build_state(settings: Settings) -> AppState:
    """What every request uses, built once: the provider, the memory, the keys, ..."""
    running = RunningTurns()
    store = _store(settings, running)
    keys = None
    if settings.keys_file and settings.auth == "on":
        try:
            keys = KeyRing(settings.keys_file, offload=_gevent_threadpool())
        except KeyFileError as exc:
            raise ConfigError(f"invalid setting PI_AGENT_KEYS_FILE: {exc}") from None
    elif settings.auth == "off":
        logger.warning("PI_AGENT_AUTH=off: every request is served without an API key")
    pool = PROVIDERS[settings.provider](settings)
    # In files that every worker reads with several workers (gunicorn.conf.py made the folder).
    metrics = Metrics(metrics_folder())
    # Each upstream's slots; with a store that several gateways share (Redis), held there.
    admission = Admission(settings.max_concurrent, settings.max_queue, upstreams=pool.names,
                          shared=store if isinstance(store, SharedSlots) else None,
                          metrics=metrics)
    watchdog, shutdown = Watchdog(), Shutdown()
    # A store that several gateways share (Redis) counts the requests and tokens too.
    limits = Limits(ledger=store, shared=store if isinstance(store, SharedCounts) else None)
    agents = _agents(settings.agents_file)
    library = Library(settings.state_dir, metrics=metrics)
    return AppState(
        settings=settings,
        provider=pool,
        store=store,
        memory=store if settings.enable_memory else None,
        agents=agents,
        readiness=Readiness(
            [(upstream.name, ReadinessCheck(upstream.provider, settings.model,
                                            upstream.provider.base_url,
                                            settings.ready_cache_seconds))
             for upstream in pool.upstreams],
            store.trouble, settings.ready_cache_seconds),
        admission=admission,
        running=running,
        shutdown=shutdown,
        watchdog=watchdog,
        keys=keys,
        limits=limits,
        turns=Turns(settings, pool, admission, running, watchdog, shutdown, store, limits,
                    agents, library, metrics),
        knowledge=library,
        metrics=metrics,
    )


def _store(settings: Settings, running: RunningTurns) -> Store:
    """The store that PI_AGENT_STORE names, with the memory's bounds; a shared one stops
    ``running`` turns that another gateway cancels.

    :raise ConfigError: the SQLite file or its folder cannot be used; one line says why.
    """
    bounds: dict[str, Any] = {
        "max_turns": settings.memory_max_turns,
        "ttl_seconds": settings.memory_ttl_minutes * 60,
        "max_conversations": settings.memory_max_conversations,
        "max_bytes": settings.memory_max_bytes,
        "max_per_key": settings.memory_max_per_key,
        "keep_on_drop": settings.memory_keep_on_drop,
    }
    if settings.store == "memory":
        return MemoryStore(**bounds)
    if settings.store == "redis":
        # Imported here: the client library costs a few MiB, for those who use it only.
        from .stores.redis import RedisStore

        return RedisStore(settings.redis_url, prefix=settings.redis_prefix,
                          on_cancel=running.cancel,
                          claim_seconds=settings.redis_lease_seconds, **bounds)
    try:
        return SqliteStore(state_file(settings.state_dir), synchronous=settings.sqlite_sync,
                           busy_seconds=settings.sqlite_busy_seconds,
                           one_thread=_one_thread_kind(), **bounds)
    except StoreFileError as exc:
        raise ConfigError(f"PI_AGENT_STORE=sqlite: {exc}") from None


def _agents(path: str) -> AgentBook:
    """The agents of the agents file (read again when it changes), or the built-in ones.

    :raise ConfigError: the file cannot be used; one line names it and the problem.
    """
    try:
        return AgentBook(functools.partial(load_agents, path), path or None)
    except AgentsFileError as exc:
        raise ConfigError(f"invalid setting PI_AGENT_AGENTS_FILE: {exc}") from None


def _allow_origins(app: Flask, allowed: tuple[str, ...]) -> None:
    """Browsers on other origins get no CORS headers unless their origin is allowed; the
    preflight is answered without a key. Keys, not cookies: credentials stay off. Without
    origins there is nothing to add, and no hook runs on every response."""
    # flask-cors reads an origin with brackets (an IPv6 address) as a regular expression.
    origins = [re.compile(re.escape(o) + r"\Z") if "[" in o else o for o in allowed]
    CORS(app, origins=origins, supports_credentials=False,
         allow_headers=["Content-Type", "Authorization", "X-API-Key", "X-Conversation-Id",
                        "X-Request-ID"],
         expose_headers=["X-Conversation-Id", "X-Request-ID", "Retry-After",
                         "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                         "X-RateLimit-Limit-Tokens", "X-RateLimit-Remaining-Tokens",
                         "X-RateLimit-Reset-Tokens"])


def _gevent_threadpool() -> Offload | None:
    """Run functions in gevent's pool of OS threads where gevent has patched the standard
    library (gunicorn's gevent worker), so that reading a large key file does not stall the
    loop; elsewhere None: read inline."""
    if not _gevent_patched():
        return None
    gevent = sys.modules["gevent"]
    # The hub of the thread that reads, looked up then: each thread has its own.
    return lambda function: gevent.get_hub().threadpool.apply(function)


T = TypeVar("T")


class _GeventThread:
    """A ``OneThread`` of gevent's own: an OS thread whose jobs a greenlet waits for without
    stalling the loop (a thread of concurrent.futures would be a greenlet once patched)."""

    def __init__(self, name: str) -> None:
        self._pool = importlib.import_module("gevent.threadpool").ThreadPool(1)

    def run(self, job: Callable[[], T]) -> T:
        result: T = self._pool.apply(job)
        return result

    def close(self) -> None:
        self._pool.kill()


def _one_thread_kind() -> Callable[[str], OneThread]:
    """What makes the SQLite store's threads: gevent's where gevent has patched the
    standard library (gunicorn's gevent worker), plain ones elsewhere."""
    return _GeventThread if _gevent_patched() else PlainThread


def _gevent_patched() -> bool:
    # Looked up, not imported: the app never loads gevent itself, and "gevent.monkey" is
    # loaded once anything was patched.
    monkey = sys.modules.get("gevent.monkey")
    return "gevent" in sys.modules and monkey is not None and monkey.is_module_patched("socket")


def _configure_logging(level: str, log_format: str = "text") -> None:
    logger.setLevel(level)
    # Under gunicorn nothing handles the root logger (unless gunicorn.conf.py set JSON
    # lines up for it); elsewhere the host's handlers are kept.
    if not logger.handlers and not logging.getLogger().handlers:
        logger.addHandler(logging.StreamHandler())
        # A host may give the root logger a handler after the app is built (waitress-serve
        # does); the lines would then be written twice.
        logger.propagate = False
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(
            "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
