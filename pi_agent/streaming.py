"""Streamed responses: a body whose cleanup runs however the stream ends, and a check
that the client is still there."""
from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from typing import Any


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
