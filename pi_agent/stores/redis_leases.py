"""The generation slots and the queue's places that several gateways share, as leases in
Redis (a part of ``RedisStore``): see core/admission.py for what they are for, and
redis.lua (lease_take, lease_renew, lease_give) for the rules.

Each lease is a member of a sorted set by its end on Redis's clock, named by a counter that
only grows (the fence); the store's tending loop renews the ones this process holds, and
gives back, within a second, those it could not give back when their turn ended.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from ..errors import StoreUnavailable

logger = logging.getLogger(__name__)

# After a command failed, those in the next second fail at once instead of each waiting for
# the timeouts (a circuit breaker): a frozen Redis costs one request half a second, not
# every request. The first command after it tries Redis again.
BREAKER_SECONDS = 1.0
# A waiting turn's place in the shared queue is renewed this often, so that the places of a
# gateway that died stop keeping free slots for turns that will never come within seconds.
PLACE_SECONDS = 6.0


class Leases:
    """Slots and queue places in Redis, for ``RedisStore``, which runs the scripts."""

    claim_seconds: float
    _holder: str  # host:pid, in a lease, for a person reading Redis
    _leases: dict[str, str]  # the leases this process holds: lease -> its set
    _to_give: list[tuple[str, str]]  # (set, lease) to end, once Redis answers

    def _run(self, mode: str, *args: Any, breaker: bool = True) -> Any:
        raise NotImplementedError  # RedisStore's

    def take_slot(self, upstream: str, limit: int, place: str = "") -> str:
        """A lease on one of ``upstream``'s ``limit`` generation slots, shared by every
        gateway; "" when they hold all of them, or when turns that came before this one wait
        for it in any gateway. ``place``: the lease of the turn's place in the queue, given
        up in the same step when the slot is taken ("" for a turn that has none: it comes
        after every one waiting; "first" for a turn that moves on from an upstream that
        failed it). Renewed until ``give_slot``.

        :raise StoreUnavailable: Redis cannot be asked.
        """
        name = self._slot_name(upstream)
        order = "0" if place == "first" else place.split(" ", 1)[0] if place else "new"
        lease = self._take_lease("slots:" + name, limit, self.claim_seconds, order=order,
                                 upstream=name, place=place if order.isdigit() else "")
        if lease and place:
            self._leases.pop(place, None)
        return lease

    def give_slot(self, upstream: str, lease: str) -> None:
        self._give_lease("slots:" + self._slot_name(upstream), lease)

    def join_queue(self, limit: int, upstreams: Sequence[str]) -> str:
        """A lease on one of the ``limit`` places of the queue that every gateway shares,
        for a turn that may go to ``upstreams``; "" when it is full. Renewed until
        ``leave_queue``.

        :raise StoreUnavailable: Redis cannot be asked.
        """
        wants = ",".join(self._slot_name(upstream) for upstream in upstreams)
        return self._take_lease("queue", limit, PLACE_SECONDS, wants=wants)

    def leave_queue(self, place: str) -> None:
        self._give_lease("queue", place)

    def _slot_name(self, upstream: str) -> str:
        """An upstream as every gateway names it: a loopback one is this host's own Ollama,
        not the one that another gateway reaches at the same address (so each host needs a
        name of its own)."""
        host = (urlsplit("//" + upstream).hostname or "").lower()
        if host == "localhost" or host == "::1" or host.startswith("127."):
            return f"{socket.gethostname()}/{upstream}"
        return upstream

    def _take_lease(self, kind: str, limit: int, seconds: float, order: str = "",
                    upstream: str = "", wants: str = "", place: str = "") -> str:
        if self._holder.rsplit(":", 1)[1] != str(os.getpid()):
            self._holder = f"{socket.gethostname()}:{os.getpid()}"  # after a fork
        holder = f"{self._holder} {wants}" if kind == "queue" else self._holder
        lease = str(self._run("lease_take", kind, limit, round(seconds * 1000), holder, order,
                              upstream, place))
        if lease:
            self._leases[lease] = kind
        return lease

    def _give_lease(self, kind: str, lease: str) -> None:
        """End a lease; one that cannot be ended now is tried again by the tending loop
        soon, not left to run out (a slot or a place would stand empty for others until
        then)."""
        self._leases.pop(lease, None)
        try:
            self._run("lease_give", kind, lease, breaker=False)
        except StoreUnavailable:
            self._to_give.append((kind, lease))

    def _renewal_seconds(self) -> float:
        """How often the holds are renewed: a third of the shortest lease held."""
        if any(kind == "queue" for kind in self._leases.values()):
            return min(self.claim_seconds, PLACE_SECONDS) / 3
        return self.claim_seconds / 3

    def _tending_pause(self) -> float:
        """The loop's pause: shorter while something waits to be given back or renewed."""
        if self._to_give:
            return BREAKER_SECONDS
        return min(self._renewal_seconds(), BREAKER_SECONDS * 2)

    def _give_pending(self) -> None:
        pending, self._to_give = self._to_give, []
        for index, (kind, lease) in enumerate(pending):
            try:
                self._run("lease_give", kind, lease, breaker=False)
            except StoreUnavailable:
                self._to_give += pending[index:]  # still away: the next round
                return

    def _renew_leases(self) -> None:
        leases = dict(self._leases)
        for kind, seconds in (("slots:", self.claim_seconds), ("queue", PLACE_SECONDS)):
            pairs = [part for lease, held in leases.items() if held.startswith(kind)
                     for part in (held, lease)]
            if not pairs:
                continue
            for lease in self._run("lease_renew", round(seconds * 1000), *pairs,
                                   breaker=False):
                if self._leases.pop(lease, None) is not None:
                    # Redis was away longer than the lease: another gateway may have it.
                    logger.warning("a lease on %s ran out while its turn held it",
                                   leases[lease])
