"""The client's connection, where the WSGI server shows its socket (gunicorn does, in
``gunicorn.socket``): closing it from outside the request."""
from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from flask import g

from ..core.prompt import Client


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


# What a peek at the client's socket fails with when the client has left.
_GONE = frozenset({errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ETIMEDOUT,
                   errno.EBADF})


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
        except ValueError:
            return True  # closed already (no descriptor): the request is over
        except OSError as exc:
            # Closed already; or out of descriptors (EMFILE, ENFILE), which says nothing
            # about the client: cannot tell is not "gone", or every turn would be cut.
            return exc.errno == errno.EBADF
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
        except OSError as exc:
            return exc.errno in _GONE
        finally:
            probe.close()

    return client_gone


def client_of(environ: dict[str, Any]) -> Client:
    """The request's client as a turn sees it: a check that it left, a way to hang up."""
    # tracing.py keeps the request's id in g (read here, not imported: siblings).
    return Client(client_probe(environ), client_closer(environ), str(g.get("request_id", "")))
