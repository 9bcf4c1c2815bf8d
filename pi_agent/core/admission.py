"""Admission control: how many generations run upstream at once, and who waits for a slot.

A Raspberry Pi runs one generation at a time (Ollama's default ``OLLAMA_NUM_PARALLEL`` is 1),
so each upstream has ``max_concurrent`` slots, and requests beyond them wait here, first come
first served, in one queue of at most ``max_queue``; beyond that they are refused at once
rather than left to pile up. A conversation has at most one turn queued or running, since
two would interleave its history.

With several upstreams a ticket's ``rank`` says which of those with a free slot may take it,
best first (providers/pool.py); a ticket that none of the free ones may take lets those
behind it pass. With a store that several gateways share (Redis), a slot and a place in the
queue are also leases there (``SharedSlots``), so that one upstream's limit and the queue's
bound hold for all of them; while the store is down, each gateway counts its own (said
once, and by ``on_my_own``).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol, runtime_checkable

from ..errors import ConversationBusy, QueueFull, StoreUnavailable
from ..metrics import Metrics

logger = logging.getLogger(__name__)

# Until a generation has finished, assume one takes this long (for Retry-After).
INITIAL_GENERATION_SECONDS = 10.0
MAX_RETRY_AFTER = 600
# How often the waiting tickets look again for a slot that no leave here announces: one
# freed in another gateway, or an upstream back from its cooldown.
RETRY_SECONDS = 0.25
# How long a gateway counts its own slots before it asks a shared store that failed again.
SHARED_RETRY_SECONDS = 5.0

Rank = Callable[[Mapping[str, int]], list[str]]


@runtime_checkable
class SharedSlots(Protocol):
    """Generation slots kept for several gateways (a Redis store): leases that the store
    renews while they are held, so that those of a gateway that died run out."""

    def take_slot(self, upstream: str, limit: int, place: str = "") -> str:
        """A lease on one of ``upstream``'s ``limit`` slots; "" when all are taken, or the
        free ones are for turns that came before this one (``place``: the lease of its
        place in the queue; "" when it has none, "first" for a turn that moves on).

        :raise StoreUnavailable: the store cannot be asked.
        """

    def give_slot(self, upstream: str, lease: str) -> None:
        """End a lease; one that ran out already is left alone."""

    def join_queue(self, limit: int, upstreams: Sequence[str]) -> str:
        """A lease on one of the queue's ``limit`` places, for a turn that may go to
        ``upstreams``; "" when all are taken.

        :raise StoreUnavailable: the store cannot be asked.
        """

    def leave_queue(self, place: str) -> None:
        """End a place's lease; one that ran out already is left alone."""


def _any_free(free: Mapping[str, int]) -> list[str]:
    return [name for name, slots in free.items() if slots > 0]


class Ticket:
    """A request's place: waiting in the queue, then holding a slot, until it leaves."""

    __slots__ = ("conversation_id", "admitted", "left", "admitted_at", "entered_at", "rank",
                 "upstream", "lease", "place")

    def __init__(self, conversation_id: str, now: float, rank: Rank) -> None:
        self.conversation_id = conversation_id
        self.rank = rank
        self.upstream = ""  # the upstream whose slot it holds, once admitted
        self.lease = ""  # its slot's lease in the shared store, if any
        self.place = ""  # its place's lease there while it waits, if any
        self.admitted = False
        self.left = False
        self.entered_at = now
        self.admitted_at = 0.0


class Admission:
    """Hand out ``max_concurrent`` slots of each of ``upstreams``, with at most ``max_queue``
    requests waiting."""

    def __init__(
        self, max_concurrent: int, max_queue: int, clock: Callable[[], float] = time.monotonic,
        upstreams: Sequence[str] = ("",), shared: SharedSlots | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics``: told the turns running and waiting here each time they change."""
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._clock = clock
        # A threading.Condition is cooperative under gunicorn's gevent worker.
        self._changed = threading.Condition()
        self._free = {name: max_concurrent for name in upstreams}
        self._waiting: deque[Ticket] = deque()
        self._conversations: set[str] = set()
        self._average_seconds = INITIAL_GENERATION_SECONDS
        self._shared = shared
        # Slots can free up unannounced: in another gateway, or by an upstream's cooldown.
        self._look_again = shared is not None or len(upstreams) > 1
        self._looked = 0.0
        self.on_my_own = False  # the shared slots failed: this gateway counts its own
        self._ask_again_at = 0.0
        self._metrics = metrics

    def enter(self, conversation_id: str, rank: Rank = _any_free) -> Ticket:
        """Take a slot, or a place in the queue; ``rank`` picks the upstream.

        :raise ConversationBusy: 409 if the conversation has a turn queued or running.
        :raise QueueFull: 429 if every slot is taken and the queue is full.
        """
        with self._changed:
            if conversation_id in self._conversations:
                raise ConversationBusy()
            ticket = Ticket(conversation_id, self._clock(), rank)
            if self._waiting:
                self._admit_waiting()  # those before it first, then what they leave
            if self._try_admit(ticket):
                pass
            elif len(self._waiting) < self.max_queue and self._join_queue(ticket):
                self._waiting.append(ticket)
            else:
                raise QueueFull(self._retry_after())
            self._conversations.add(conversation_id)
            self._count()
            return ticket

    def wait(self, ticket: Ticket, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``ticket`` to hold a slot; return whether it does."""
        with self._changed:
            if self._changed.wait_for(lambda: ticket.admitted, timeout):
                return True
            self._look_for_slots()
            return ticket.admitted

    def wait_for_change(self, ticket: Ticket, position: int, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the ticket's place to change from ``position``;
        return the place then (0: it holds a slot)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._position(ticket) != position, timeout):
                self._look_for_slots()
            return self._position(ticket)

    def position(self, ticket: Ticket) -> int:
        """Return the ticket's place in the queue, from 1; 0 once it holds a slot."""
        with self._changed:
            return self._position(ticket)

    def _position(self, ticket: Ticket) -> int:
        if ticket.admitted or ticket.left:
            return 0
        return self._waiting.index(ticket) + 1

    def move(self, ticket: Ticket, tried: Collection[str]) -> bool:
        """Move a ticket that holds a slot to the best other upstream with a free slot,
        none of ``tried``; return False, leaving it where it is, when there is none."""
        with self._changed:
            if ticket.left or not ticket.admitted:
                return False
            free = {name: n for name, n in self._free.items() if n > 0 and name not in tried}
            for name in ticket.rank(free):
                if name in tried or self._free.get(name, 0) <= 0:
                    continue
                lease = self._lease(name, "first")  # it came before those waiting now
                if lease is None:
                    continue
                self._give_back(ticket)
                self._free[name] -= 1
                ticket.upstream, ticket.lease = name, lease
                self._admit_waiting()
                self._changed.notify_all()
                return True
            return False

    def leave(self, ticket: Ticket) -> None:
        """Give the slot or the place in the queue back; calling it again does nothing."""
        with self._changed:
            if ticket.left:
                return
            ticket.left = True
            self._conversations.discard(ticket.conversation_id)
            if ticket.admitted:
                self._give_back(ticket)
                held = self._clock() - ticket.admitted_at
                self._average_seconds = 0.8 * self._average_seconds + 0.2 * held
                self._admit_waiting()
            else:
                self._waiting.remove(ticket)
                self._leave_queue(ticket)
            self._count()
            self._changed.notify_all()

    @property
    def running(self) -> int:
        with self._changed:
            return self._running()

    def _running(self) -> int:
        return self.max_concurrent * len(self._free) - sum(self._free.values())

    def _count(self) -> None:
        # On each change rather than read when scraped: with several workers, each keeps
        # its own count in the shared files, and a scrape reaches one of them.
        if self._metrics is not None:
            self._metrics.turns_now(self._running(), len(self._waiting))

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def _try_admit(self, ticket: Ticket, refused: dict[str, float] | None = None) -> bool:
        """Give the ticket a slot of the best upstream it may use that has one (a waiting
        ticket's place in the shared queue goes with it). ``refused`` gathers, over one
        pass of the waiting tickets, the upstreams whose slots the shared store keeps for
        others, with the place (its number) that was refused: a refusal holds for every
        place after it, and for a ticket without one, which comes after all."""
        refused = {} if refused is None else refused
        mine = _place_number(ticket.place)
        for name in ticket.rank({name: n for name, n in self._free.items() if n > 0}):
            if self._free.get(name, 0) <= 0 or mine > refused.get(name, math.inf):
                continue
            lease = self._lease(name, ticket.place)
            if lease is None:
                if ticket.place:  # taken, or kept for turns before it, elsewhere
                    refused[name] = min(mine, refused.get(name, mine))
                continue
            self._free[name] -= 1
            ticket.upstream, ticket.lease = name, lease
            ticket.admitted = True
            ticket.admitted_at = self._clock()
            if lease:
                ticket.place = ""  # given up in the store with the slot's taking
            else:
                self._leave_queue(ticket)
            return True
        return False

    def _admit_waiting(self) -> None:
        """Admit the waiting tickets that a free slot can take, in their order."""
        admitted = False
        refused: dict[str, float] = {}
        for ticket in list(self._waiting):
            if not any(slots > 0 for slots in self._free.values()):
                break
            if self._try_admit(ticket, refused):
                self._waiting.remove(ticket)
                admitted = True
        if admitted:
            self._count()
            self._changed.notify_all()

    def _look_for_slots(self) -> None:
        """Look again for slots freed where no leave here tells (at most every
        ``RETRY_SECONDS``, however many wait)."""
        now = self._clock()
        if self._look_again and self._waiting and now - self._looked >= RETRY_SECONDS:
            self._looked = now
            self._place_waiting()
            self._admit_waiting()

    def _place_waiting(self) -> None:
        """Give the waiting tickets that came while the shared store was away a place
        there once it answers again, in their order: without one, every ticket with a
        place would come before them in every gateway."""
        if self._shared is None:
            return
        for ticket in self._waiting:
            if ticket.place:
                continue
            if not self._join_queue(ticket) or not ticket.place:
                return  # full, or away again

    def _lease(self, upstream: str, place: str) -> str | None:
        """The shared store's lease on a slot of ``upstream`` ("" without one, or while it is
        down), or None when the other gateways hold all of them or keep the free ones for
        turns that came before (``place``: see ``SharedSlots.take_slot``)."""
        return self._ask_shared(
            lambda shared: shared.take_slot(upstream, self.max_concurrent, place))

    def _join_queue(self, ticket: Ticket) -> bool:
        """Take one of the queue's places in the shared store too (none while it is away);
        False when the other gateways hold all of them."""
        wants = ticket.rank({name: 1 for name in self._free})  # the upstreams it may use
        place = self._ask_shared(lambda shared: shared.join_queue(self.max_queue, wants))
        if place is None:
            return False
        ticket.place = place
        return True

    def _leave_queue(self, ticket: Ticket) -> None:
        if ticket.place and self._shared is not None:
            try:
                self._shared.leave_queue(ticket.place)
            except StoreUnavailable:
                pass  # the lease runs out by itself
        ticket.place = ""

    def _ask_shared(self, take: Callable[[SharedSlots], str]) -> str | None:
        """A lease from the shared store ("" without one, or while it is down), or None
        when the other gateways hold every one there is."""
        if self._shared is None or (self.on_my_own and self._clock() < self._ask_again_at):
            return ""
        try:
            lease = take(self._shared)
        except StoreUnavailable:
            self._ask_again_at = self._clock() + SHARED_RETRY_SECONDS
            if not self.on_my_own:
                self.on_my_own = True
                logger.warning("the shared generation slots and queue cannot be read: each "
                               "gateway counts its own until they can")
            return ""
        if self.on_my_own:
            self.on_my_own = False
            logger.warning("the shared generation slots and queue are back")
        return lease or None

    def _give_back(self, ticket: Ticket) -> None:
        self._free[ticket.upstream] += 1
        if ticket.lease and self._shared is not None:
            try:
                self._shared.give_slot(ticket.upstream, ticket.lease)
            except StoreUnavailable:
                pass  # the lease runs out by itself
        ticket.lease = ""

    def _retry_after(self) -> int:
        # A place in the queue frees up when a running generation ends: about one
        # generation's time, as measured so far.
        return max(1, min(MAX_RETRY_AFTER, math.ceil(self._average_seconds)))


def _place_number(place: str) -> float:
    """The order of a place in the shared queue (its lease's counter); a ticket without
    one comes after all."""
    number = place.split(" ", 1)[0]
    return int(number) if number.isdigit() else math.inf
