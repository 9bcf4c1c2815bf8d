"""Streamed response bodies: their cleanup runs however the stream ends."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping

from flask import Response


class StreamBody:
    """The body of a streamed reply. The WSGI server iterates it and then calls ``close``,
    also when it never asked for a byte (the client left first), so the cleanup that must
    always happen (close the upstream, give the slot back) runs in ``close``."""

    def __init__(self, chunks: Iterable[bytes], cleanup: Callable[[], None],
                 head: bytes = b"") -> None:
        self._chunks = iter(chunks)
        self._cleanup = cleanup
        self._head = head  # what was read from the chunks already, to write first

    def __iter__(self) -> Iterator[bytes]:
        if self._head:
            return itertools.chain((self._head,), self._chunks)
        return self._chunks

    def close(self) -> None:
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._cleanup()


# Not cached, and not buffered by a proxy in front (nginx reads X-Accel-Buffering).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def stream_response(chunks: Iterable[bytes], cleanup: Callable[[], None], content_type: str,
                    status: int = 200, headers: Mapping[str, str] = STREAM_HEADERS,
                    head: bytes = b"") -> Response:
    """A streamed response whose ``cleanup`` runs when the WSGI server closes it.

    The bytes go to the WSGI server as they are, without werkzeug's two wrappers around
    every token (``direct_passthrough``).
    """
    return Response(StreamBody(chunks, cleanup, head), status=status,
                    content_type=content_type, headers=dict(headers), direct_passthrough=True)
