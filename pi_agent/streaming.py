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
    """Watch a plain-text or non-stream turn from a helper thread (a greenlet under gevent)
    and stop its upstream call, with ``abort``, when its client leaves, when the server's
    shutdown deadline comes, or when Ollama is silent for ``idle`` seconds or the turn
    passes ``total``. Such a turn writes nothing between tokens (or at all, before its
    reply), so nothing else would notice; the reason is left in ``abort.reason``.
    """

    def __init__(self, abort: Abort, client_gone: Callable[[], bool] | None,
                 shutdown: Shutdown, idle: float, total: float) -> None:
        self.abort = abort
        self._client_gone = client_gone
        self._shutdown = shutdown
        self._idle = idle
        self._end = time.monotonic() + total
        # Set by the relay at each chunk; before the first one the socket timeout (the
        # first-token timeout) bounds the wait instead.
        self.last_chunk: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="turn-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(CHECK_SECONDS):
            reason = self._reason_to_stop(time.monotonic())
            if reason:
                self.abort.request(reason)
                return

    def _reason_to_stop(self, now: float) -> str:
        if self._client_gone is not None and self._client_gone():
            return "client_gone"
        if self._shutdown.due():
            return "shutting_down"
        idle = self.last_chunk is not None and now - self.last_chunk >= self._idle
        if idle or now >= self._end:
            return "timeout"
        return ""
