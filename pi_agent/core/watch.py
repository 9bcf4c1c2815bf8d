"""Watching turns from outside: one helper thread checks every turn under way for a client
that left, the server's shutdown, an upstream that idles and a turn that runs too long, and
stops what must stop."""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from ..errors import (
    ClientGone,
    PiAgentError,
    ProviderTimeout,
    ServerShuttingDown,
    TurnCancelled,
)
from ..providers.base import Abort
from .lifecycle import Shutdown

logger = logging.getLogger(__name__)


# How often a turn that writes nothing for a while is checked on.
CHECK_SECONDS = 0.5

# Why a turn was stopped from outside (see TurnWatch), as the client is told.
STOPPED: dict[str, type[PiAgentError]] = {
    "cancelled": TurnCancelled,
    "client_gone": ClientGone,
    "shutting_down": ServerShuttingDown,
    "timeout": ProviderTimeout,
}


def never() -> bool:
    return False


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

    def seen(self, at: float | None) -> None:
        """The upstream was last seen at work ``at``; None: no idle time counts for now
        (a tool runs, or a model call waits for its first token)."""
        self.last_chunk = at

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
