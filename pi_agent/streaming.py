"""Streamed responses: a body whose cleanup runs however the stream ends, and a check
that the client is still there."""
from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .lifecycle import Shutdown
from .providers.base import Abort

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

    gunicorn puts the client socket in the environ; other WSGI servers may not, and then
    there is no check (None) and a disconnect is noticed at the next write.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None

    def client_gone() -> bool:
        # poll, not select: a busy server has sockets numbered past select's 1024.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        try:
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & (select.POLLHUP | select.POLLERR):
                return True
            # Readable with nothing to read is the end of the connection.
            return bool(sock.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True

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

    def start(self) -> None:
        self._watchdog.add(self)

    def stop(self) -> None:
        self._watchdog.remove(self)

    def reason_to_stop(self, now: float) -> str:
        if self._client_gone is not None and self._client_gone():
            return "client_gone"
        if self._shutdown.due():
            return "shutting_down"
        idle = self.last_chunk is not None and now - self.last_chunk >= self._idle
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
                reason = turn.reason_to_stop(now)
                if reason:
                    self.remove(turn)
                    turn.abort.request(reason)
