"""The turns under way, by conversation, so that another connection can cancel one
(``POST /chat/<id>/cancel``) and a key's conversations can be told from another's."""
from __future__ import annotations

import threading

from ..config import LOCAL_ID
from ..providers.base import Abort


class Cancel:
    """A request to stop a turn, from another connection (``POST /chat/<id>/cancel``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requested = False
        self._abort: Abort | None = None

    def attach(self, abort: Abort) -> None:
        """Stop the upstream call behind ``abort`` when (or if already) cancelled."""
        with self._lock:
            self._abort = abort
            run = self.requested
        if run:
            abort.request("cancelled")

    def request(self) -> None:
        with self._lock:
            self.requested = True
            abort = self._abort
        if abort is not None:
            abort.request("cancelled")


class RunningTurns:
    """The turns under way, by conversation id (admission allows one each), and the key
    that each belongs to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: dict[str, Cancel] = {}
        self._owners: dict[str, str] = {}

    def add(self, conversation_id: str, owner: str = LOCAL_ID) -> Cancel:
        cancel = Cancel()
        with self._lock:
            self._turns[conversation_id] = cancel
            self._owners[conversation_id] = owner
        return cancel

    def owner(self, conversation_id: str) -> str | None:
        with self._lock:
            return self._owners.get(conversation_id)

    def remove(self, conversation_id: str, cancel: Cancel) -> None:
        with self._lock:
            if self._turns.get(conversation_id) is cancel:
                del self._turns[conversation_id]
                del self._owners[conversation_id]

    def cancel(self, conversation_id: str) -> bool:
        """Ask the running turn of the conversation to stop; False if there is none."""
        with self._lock:
            cancel = self._turns.get(conversation_id)
        if cancel is None:
            return False
        cancel.request()
        return True
