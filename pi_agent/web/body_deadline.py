"""How long a client may take to send a request body.

gunicorn reads a body only when the app asks for it, and waits for every byte for as long
as the client likes: a few clients that send ``Content-Length: 100`` and then 10 bytes would
hold every connection the worker has. So the body is read against a deadline:
PI_AGENT_BODY_TIMEOUT, plus one second for every PI_AGENT_BODY_MIN_RATE bytes it declares
(nginx's ``client_body_timeout`` is 60 s between two reads; this is for the whole body).

Under gevent the deadline is a ``gevent.Timeout``, which interrupts the read wherever it
waits. A worker with threads (gunicorn's sync and gthread) gets a timeout on each read of
its socket instead, which bounds a silent client but not one that trickles. waitress reads
the whole body before it calls the app, against its own ``channel_timeout``.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import RequestTimeout


def allowance(timeout: float, min_rate: int, length: int) -> float:
    """Seconds a body of ``length`` bytes may take to arrive."""
    return timeout + length / min_rate


@contextmanager
def body_deadline(environ: dict[str, Any], seconds: float) -> Iterator[None]:
    """Read the request's body within ``seconds``.

    :raise RequestTimeout: 408, the body did not arrive in time (under gevent).
    :raise TimeoutError: a read of the socket waited ``seconds`` (other gunicorn workers).
    """
    gevent = sys.modules.get("gevent")
    if gevent is not None and _gevent_sockets():
        timeout = gevent.Timeout(seconds, RequestTimeout())
        timeout.start()
        try:
            yield
        finally:
            timeout.close()
        return
    sock = environ.get("gunicorn.socket")
    if sock is None:
        yield
        return
    before = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        yield
    finally:
        sock.settimeout(before)


def _gevent_sockets() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))
