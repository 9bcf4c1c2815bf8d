"""Admission control: how many generations run upstream at once, and who waits for a slot.

A Raspberry Pi runs one generation at a time (Ollama's default ``OLLAMA_NUM_PARALLEL`` is 1),
so requests beyond ``max_concurrent`` wait here, first come first served, in a queue of at most
``max_queue``; beyond that they are refused at once rather than left to pile up. A
conversation has at most one turn queued or running, since two would interleave its history.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import ConversationBusy, QueueFull

# Until a generation has finished, assume one takes this long (for Retry-After).
INITIAL_GENERATION_SECONDS = 10.0
MAX_RETRY_AFTER = 600


class Ticket:
    """A request's place: waiting in the queue, then holding a slot, until it leaves."""

    __slots__ = ("conversation_id", "admitted", "left", "admitted_at", "entered_at")

    def __init__(self, conversation_id: str, now: float) -> None:
        self.conversation_id = conversation_id
        self.admitted = False
        self.left = False
        self.entered_at = now
        self.admitted_at = 0.0


class Admission:
    """Hand out at most ``max_concurrent`` slots, with at most ``max_queue`` requests waiting."""

    def __init__(
        self, max_concurrent: int, max_queue: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._clock = clock
        # A threading.Condition is cooperative under gunicorn's gevent worker.
        self._changed = threading.Condition()
        self._running = 0
        self._waiting: deque[Ticket] = deque()
        self._conversations: set[str] = set()
        self._average_seconds = INITIAL_GENERATION_SECONDS

    def enter(self, conversation_id: str) -> Ticket:
        """Take a slot, or a place in the queue.

        :raise ConversationBusy: 409 if the conversation has a turn queued or running.
        :raise QueueFull: 429 if every slot is taken and the queue is full.
        """
        with self._changed:
            if conversation_id in self._conversations:
                raise ConversationBusy()
            ticket = Ticket(conversation_id, self._clock())
            if self._running < self.max_concurrent and not self._waiting:
                self._admit(ticket)
            elif len(self._waiting) < self.max_queue:
                self._waiting.append(ticket)
            else:
                raise QueueFull(self._retry_after())
            self._conversations.add(conversation_id)
            return ticket

    def wait(self, ticket: Ticket, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``ticket`` to hold a slot; return whether it does."""
        with self._changed:
            return self._changed.wait_for(lambda: ticket.admitted, timeout)

    def wait_for_change(self, ticket: Ticket, position: int, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the ticket's place to change from ``position``;
        return the place then (0: it holds a slot)."""
        with self._changed:
            self._changed.wait_for(lambda: self._position(ticket) != position, timeout)
            return self._position(ticket)

    def position(self, ticket: Ticket) -> int:
        """Return the ticket's place in the queue, from 1; 0 once it holds a slot."""
        with self._changed:
            return self._position(ticket)

    def _position(self, ticket: Ticket) -> int:
        if ticket.admitted or ticket.left:
            return 0
        return self._waiting.index(ticket) + 1

    def leave(self, ticket: Ticket) -> None:
        """Give the slot or the place in the queue back; calling it again does nothing."""
        with self._changed:
            if ticket.left:
                return
            ticket.left = True
            self._conversations.discard(ticket.conversation_id)
            if ticket.admitted:
                self._running -= 1
                held = self._clock() - ticket.admitted_at
                self._average_seconds = 0.8 * self._average_seconds + 0.2 * held
                while self._waiting and self._running < self.max_concurrent:
                    self._admit(self._waiting.popleft())
            else:
                self._waiting.remove(ticket)
            self._changed.notify_all()

    @property
    def running(self) -> int:
        with self._changed:
            return self._running

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def _admit(self, ticket: Ticket) -> None:
        ticket.admitted = True
        ticket.admitted_at = self._clock()
        self._running += 1

    def _retry_after(self) -> int:
        # A place in the queue frees up when a running generation ends: about one
        # generation's time, as measured so far.
        return max(1, min(MAX_RETRY_AFTER, math.ceil(self._average_seconds)))
