"""Streamed responses: a body whose cleanup runs however the stream ends, and a check
that the client is still there."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .lifecycle import Shutdown
from .providers.base import Abort

logger = logging.getLogger(__name__)

# How often a turn that writes nothing for a while is checked on.
CHECK_SECONDS = 0.5


class StreamBody:
    """The body of a streamed reply. The WSGI server iterates it and then calls ``close``,
    also when it never asked for a byte (the client left first), so the cleanup that must
    always happen (close the upstream, give the slot back) runs in ``close``."""

    def __init__(self, chunks: Iterator[bytes], cleanup: Callable[[], None]) -> None:
        self._chunks = chunks
        self._cleanup = cleanup

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._cleanup()


def never() -> bool:
    return False


def client_probe(environ: dict[str, Any]) -> Callable[[], bool] | None:
    """Return a check that the client closed its connection, without writing to it.

    gunicorn puts the client socket in the environ, and waitress a check of its own (which
    sees a client leave only with waitress's ``channel_request_lookahead`` above 0; see
    docs/deployment.md). Other WSGI servers (mod_wsgi) offer neither: then there is no
    check (None) and a disconnect is noticed at the next write.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        waitress_check = environ.get("waitress.client_disconnected")
        return waitress_check if callable(waitress_check) else None

    def client_gone() -> bool:
        # Peek through a duplicate of the socket, without ever waiting: the WSGI server's
        # greenlet may be reading the same socket (the next request on a kept-alive
        # connection), and gevent lets only one greenlet wait on a socket object.
        try:
            probe = socket.socket(fileno=os.dup(sock.fileno()))
        except (OSError, ValueError):
            return True  # closed already (ValueError: no descriptor): the request is over
        try:
            if not os.get_blocking(probe.fileno()):
                # Under gevent (whose sockets are non-blocking underneath) this makes the peek
                # fail at once instead of waiting; a blocking socket, shared with the server's
                # own, is left as it is, and MSG_DONTWAIT alone keeps the peek from waiting.
                probe.settimeout(0.0)
            # Readable with nothing to read is the end of the connection.
            return bool(probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"")
        except BlockingIOError:
            return False  # nothing to read: the client is still there
        except OSError:
            return True
        finally:
            probe.close()

    return client_gone


class TurnWatch:
    """What the watchdog checks about one plain-text or non-stream turn: stop its upstream
    call, with ``abort``, when its client leaves, when the server's shutdown deadline comes,
    or when Ollama is silent for ``idle`` seconds or the turn passes ``total``. Such a turn
    writes nothing between tokens (or at all, before its reply), so nothing else would
    notice; the reason is left in ``abort.reason``.
    """

    def __init__(self, watchdog: Watchdog, abort: Abort, client_gone: Callable[[], bool] | None,
                 shutdown: Shutdown, idle: float, total: float) -> None:
        self._watchdog = watchdog
        self.abort = abort
        self._client_gone = client_gone
        self._shutdown = shutdown
        self._idle = idle
        self._end = time.monotonic() + total
        # Set by the relay at each chunk; before the first one the socket timeout (the
        # first-token timeout) bounds the wait instead.
        self.last_chunk: float | None = None
        # Set by the relay when it wrote to the client: a write that fails notices a client
        # that left, so the socket needs no look while writes are frequent.
        self.last_write = 0.0
        # True while the relay waits for a write to the client to finish.
        self.writing = False

    def start(self) -> None:
        self._watchdog.add(self)

    def stop(self) -> None:
        self._watchdog.remove(self)

    def reason_to_stop(self, now: float) -> str:
        writing = now - self.last_write < CHECK_SECONDS / 2
        if not writing and self._client_gone is not None and self._client_gone():
            return "client_gone"
        if self._shutdown.due():
            return "shutting_down"
        idle = (self.last_chunk is not None and not self.writing
                and now - self.last_chunk >= self._idle)
        if idle or now >= self._end:
            return "timeout"
        return ""


class Watchdog:
    """One helper thread (a greenlet under gevent) that checks every watched turn each
    ``CHECK_SECONDS``: one wake-up for all of them, not one per turn. It runs while there
    are turns to watch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: set[TurnWatch] = set()
        self._running = False

    def add(self, turn: TurnWatch) -> None:
        with self._lock:
            self._turns.add(turn)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="watchdog", daemon=True).start()

    def remove(self, turn: TurnWatch) -> None:
        with self._lock:
            self._turns.discard(turn)

    def _run(self) -> None:
        while True:
            time.sleep(CHECK_SECONDS)
            with self._lock:
                if not self._turns:
                    self._running = False
                    return
                turns = list(self._turns)
            now = time.monotonic()
            for turn in turns:
                try:
                    reason = turn.reason_to_stop(now)
                    with self._lock:
                        # A turn that ended while this round ran is left alone.
                        if not reason or turn not in self._turns:
                            continue
                        self._turns.discard(turn)
                    turn.abort.request(reason)
                except Exception:
                    # One turn's failure must not end the watch over all the others.
                    logger.exception("watchdog: checking a turn failed")
