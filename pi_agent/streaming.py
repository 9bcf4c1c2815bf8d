"""Streamed responses: a body whose cleanup runs however the stream ends, and a check
that the client is still there."""
from __future__ import annotations

import errno
import logging
import math
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
# What a peek at the client's socket fails with when the client has left.
_GONE = frozenset({errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ETIMEDOUT,
                   errno.EBADF})


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


class TurnWatch:
    """What the watchdog checks about one plain-text or non-stream turn: stop its upstream
    call, with ``abort``, when its client leaves, when the server's shutdown deadline comes,
    or when Ollama is silent for ``idle`` seconds or the turn passes ``total``. Such a turn
    writes nothing between tokens (or at all, before its reply), so nothing else would
    notice; the reason is left in ``abort.reason``.
    """

    def __init__(self, watchdog: Watchdog, abort: Abort, client_gone: Callable[[], bool] | None,
                 shutdown: Shutdown, idle: float, total: float,
                 hang_up: Callable[[], None] | None = None) -> None:
        self._watchdog = watchdog
        self.abort = abort
        self._client_gone = client_gone
        self._hang_up = hang_up
        self._shutdown = shutdown
        self._idle = idle
        self._end = time.monotonic() + total
        # Set by the relay at each chunk; before the first one the socket timeout (the
        # first-token timeout) bounds the wait instead.
        self.last_chunk: float | None = None
        # Set by the relay when it wrote to the client: a write that fails notices a client
        # that left, so the socket needs no look while writes are frequent.
        self.last_write = 0.0
        # True while the relay waits for a write to the client to finish (which started
        # at last_write).
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
        if self.writing:
            # A client that reads nothing holds the write up: as long as Ollama may idle,
            # and no longer than the whole turn may last.
            idle = now - self.last_write >= self._idle
        else:
            idle = self.last_chunk is not None and now - self.last_chunk >= self._idle
        if idle or now >= self._end:
            return "timeout"
        return ""

    def end(self, reason: str) -> None:
        """Stop the upstream call; a relay stuck in a write to its client is freed by
        closing that client's connection, since it would not look at the abort."""
        self.abort.request(reason)
        if self.writing and self._hang_up is not None:
            logger.warning("closed a client that read nothing for too long (%s)", reason)
            self._hang_up()


class WriteWatch:
    """What the watchdog checks about an event stream, which looks after its own deadlines
    between writes but cannot while a write to a client that reads nothing is blocked:
    such a write ends, with the client's connection, once it has been blocked for ``idle``
    seconds or when the turn passes its ``end``."""

    def __init__(self, watchdog: Watchdog, hang_up: Callable[[], None], idle: float) -> None:
        self._watchdog = watchdog
        self._hang_up = hang_up
        self._idle = idle
        self.end_at = math.inf  # set once the turn has its slot and its total time runs
        # When the write under way began; None between writes.
        self.writing_since: float | None = None

    def start(self) -> None:
        self._watchdog.add(self)

    def stop(self) -> None:
        self._watchdog.remove(self)

    def reason_to_stop(self, now: float) -> str:
        since = self.writing_since
        if since is not None and (now - since >= self._idle or now >= self.end_at):
            return "timeout"
        return ""

    def end(self, reason: str) -> None:
        if self.writing_since is not None:
            logger.warning("closed a client that read nothing for too long (%s)", reason)
            self._hang_up()


class Watchdog:
    """One helper thread (a greenlet under gevent) that checks every watched turn each
    ``CHECK_SECONDS``: one wake-up for all of them, not one per turn. It runs while there
    are turns to watch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: set[TurnWatch | WriteWatch] = set()
        self._running = False

    def add(self, turn: TurnWatch | WriteWatch) -> None:
        with self._lock:
            self._turns.add(turn)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="watchdog", daemon=True).start()

    def remove(self, turn: TurnWatch | WriteWatch) -> None:
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
                    turn.end(reason)
                except Exception:
                    # One turn's failure must not end the watch over all the others.
                    logger.exception("watchdog: checking a turn failed")
