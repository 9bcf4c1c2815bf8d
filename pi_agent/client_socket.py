"""The client's connection, where the WSGI server shows its socket (gunicorn does, in
``gunicorn.socket``): closing it from outside the request."""
from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def client_closer(environ: dict[str, Any],
                  how: int = socket.SHUT_RDWR) -> Callable[[], None] | None:
    """Return a way to close the client's connection from outside the request, or None
    where the WSGI server does not show its socket (then a write blocked on a client that
    reads nothing lasts until the server's own send timeout, if it has one).

    A write to a client that stopped reading blocks its request, and with it the turn's
    slot, for as long as the client likes; shutting the socket makes that write fail at
    once, and the WSGI server then closes the body, which gives the slot back.

    ``how`` SHUT_WR ends the connection once what was written has gone, and leaves the
    server to read what the client still sends (closing a socket with unread bytes would
    reset the connection, and the client might lose the answer).
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None

    def hang_up() -> None:
        try:
            sock.shutdown(how)
        except OSError:
            pass  # closed already

    return hang_up
