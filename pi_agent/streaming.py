"""The body of a streamed response, whose cleanup runs however the stream ends."""
from __future__ import annotations

from collections.abc import Callable, Iterator


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
