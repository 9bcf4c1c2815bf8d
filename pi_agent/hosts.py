"""The WSGI host the app runs on: how many threads it needs, and a look at it, once per
process, at its first request.

A host can be set up in a way that quietly breaks what the server promises: several processes
split the conversation memory, a waitress that reads nothing while a request runs never sees
its client leave, too few threads leave /health waiting behind queued turns. The environ of a
request is the only place a WSGI app learns about its host, so the first request of each
process looks, logs one warning for each such problem, and then takes the look out of the
call chain: the requests after it cost nothing more. docs/deployment.md has the recipes.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .config import Settings

# For type hints only: gunicorn's master imports this module and must not load Flask.
if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask

logger = logging.getLogger(__name__)

# Threads beyond one per slot and one per queue place, for what must still be answered while
# all of those are taken: /health, /ready, a cancel, the 429 for one request too many.
SPARE_THREADS = 4


def threads_needed(settings: Settings) -> int:
    """Return the request threads a thread-per-request host needs (waitress, gunicorn's
    gthread worker, mod_wsgi daemon processes): a turn holds its thread while it runs and
    while it waits in the queue; each upstream has its own slots."""
    slots = settings.max_concurrent * len(settings.ollama_urls)
    return slots + settings.max_queue + SPARE_THREADS


# Descriptors kept aside from connections: the listener, logs, the key file, the pipes and
# sockets gunicorn and gevent hold, a probe's duplicate of a client socket.
DESCRIPTOR_RESERVE = 64


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (what a process may
    do for itself; children inherit it); return the soft limit before and after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is still bounded by the kernel's nr_open; 2**20 is its default.
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (ValueError, OSError):
            pass  # a container may refuse: keep the soft limit and fit to it
    return soft, soft


def connections_allowed(descriptor_limit: int, wanted: int) -> int:
    """The most connections a worker may take without running out of descriptors: each may
    need two (its client socket, and the connection to Ollama while a turn runs), and the
    reserve stays free. Beyond it a connection waits in the listen queue, which is better
    than accepting it and failing every turn that needs a descriptor."""
    return max(1, min(wanted, (descriptor_limit - DESCRIPTOR_RESERVE) // 2))


def host_warnings(environ: dict[str, Any], settings: Settings) -> list[str]:
    """Return what is wrong with the host that sent ``environ``, one sentence each."""
    warnings = []
    if environ.get("wsgi.multiprocess") and settings.enable_memory and settings.store != "redis":
        warnings.append(
            "this WSGI server runs the app in several processes (wsgi.multiprocess), and "
            "each keeps its own conversation memory: the turns of one conversation are split "
            "between them, and generation slots and cancels count per process too. Run one "
            "process, set PI_AGENT_STORE=redis, which they share, or set "
            "PI_AGENT_ENABLE_MEMORY=false (see docs/deployment.md)")
    warnings += _waitress_warnings(environ, settings)
    return warnings


def _waitress_warnings(environ: dict[str, Any], settings: Settings) -> list[str]:
    # waitress hands its settings to nobody; its check is a method of the connection, which
    # holds them. Anything unexpected there (another version, another server) says nothing.
    check = environ.get("waitress.client_disconnected")
    adjustments = getattr(getattr(check, "__self__", None), "adj", None)
    lookahead = getattr(adjustments, "channel_request_lookahead", None)
    threads = getattr(adjustments, "threads", None)
    warnings = []
    if isinstance(lookahead, int) and lookahead < 1:
        warnings.append(
            "waitress runs with channel_request_lookahead=0: a client that leaves before its "
            "reply is not noticed, and its turn runs on in Ollama. Start waitress with "
            "--channel-request-lookahead=1 (see docs/deployment.md)")
    needed = threads_needed(settings)
    if isinstance(threads, int) and threads < needed:
        warnings.append(
            f"waitress runs {threads} threads, but PI_AGENT_MAX_CONCURRENT="
            f"{settings.max_concurrent} (for each upstream) and PI_AGENT_MAX_QUEUE="
            f"{settings.max_queue} need "
            f"{needed}: with every thread in a turn, /health and cancels wait. Start waitress "
            f"with --threads={needed}, or lower PI_AGENT_MAX_QUEUE")
    return warnings


class FirstRequestCheck:
    """A WSGI middleware for ``app.wsgi_app`` whose first request logs ``host_warnings``,
    after which it puts the app's own ``wsgi_app`` back in its place."""

    def __init__(self, app: Flask, settings: Settings) -> None:
        self._app = app
        self._settings = settings
        self._wsgi_app: WSGIApplication = app.wsgi_app
        self._lock = threading.Lock()
        self._done = False

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        if not self._done:
            with self._lock:
                if not self._done:  # two first requests at once: only one looks
                    self._look(environ)
        return self._wsgi_app(environ, start_response)

    def _look(self, environ: WSGIEnvironment) -> None:
        self._done = True
        # A middleware added around this one since keeps it, and with it one test of a
        # flag per request; otherwise nothing of it is left.
        if self._app.wsgi_app is self:
            self._app.wsgi_app = self._wsgi_app  # type: ignore[method-assign, assignment]
        for warning in host_warnings(environ, self._settings):
            logger.warning("%s", warning)


def watch_host(app: Flask, settings: Settings) -> None:
    """Have the first request of this process look at the WSGI host (``host_warnings``)."""
    app.wsgi_app = FirstRequestCheck(app, settings)  # type: ignore[method-assign]
