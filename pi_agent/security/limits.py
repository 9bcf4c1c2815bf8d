"""Per-key limits: requests per minute (a token bucket) and completion tokens per UTC day.

Counted in this process, or, with a store that several gateways share (Redis), in that
store: one atomic step per request there, and this process's own counts while it is down.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol, runtime_checkable

from ..errors import RateLimited, StoreUnavailable
from .keys import ApiKey

logger = logging.getLogger(__name__)

# How long a gateway counts on its own before it asks a shared store that failed again.
SHARED_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class Standing:
    """What a key has left, for the X-RateLimit-* headers."""

    limit: int
    remaining: int
    reset_seconds: int  # until the bucket is full again (requests) or the day ends (tokens)


class TokenLedger(Protocol):
    """Where the tokens a key spent each day are kept (a store of memory.py): read once
    per key and day, so that a restart does not give every key a new day's quota."""

    def tokens_used(self, key_id: str, day: str) -> int: ...


@dataclass(frozen=True)
class Counted:
    """A request counted where several gateways see it (``SharedCounts.count_request``)."""

    refused: str  # "": admitted; "requests" or "tokens": the limit that is used up
    bucket: float | None  # the requests left in the key's bucket (None: no rpm limit)
    used: int  # the key's completion tokens of the day


@runtime_checkable
class SharedCounts(Protocol):
    """Request buckets and daily tokens kept for several gateways (a Redis store)."""

    def count_request(self, key_id: str, rpm: int | None, tokens_per_day: int | None,
                      day: str, spends_tokens: bool, peek: bool = False) -> Counted:
        """Count one request (``peek``: look only), on the store's own clock."""


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class Limits:
    """The limits of every key. A key's bucket holds ``rpm`` requests and refills at
    ``rpm`` a minute, so a burst of ``rpm`` is allowed, then one every 60/rpm s. Buckets live
    in this process; a key's tokens of the day are read from ``ledger`` once and counted
    here after that (the turn that spent them writes them to the store)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 today: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 ledger: TokenLedger | None = None,
                 shared: SharedCounts | None = None) -> None:
        self._clock = clock
        self._today = today
        self._ledger = ledger
        self._shared = shared
        self._on_my_own = False  # the shared counts failed: this process counts (logged once)
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._tokens: dict[str, tuple[str, int]] = {}  # key id -> (UTC date, tokens used)

    def admit(
        self, key: ApiKey, spends_tokens: bool = True
    ) -> tuple[Standing | None, Standing | None]:
        """Count one request against the key; return its request and token standings.

        A request that ``spends_tokens`` is refused once the day's tokens are used up;
        others (reading a list, deleting a conversation) only count as requests.

        :raise RateLimited: 429 with Retry-After when a limit is used up.
        """
        if self._shared is not None and (key.rpm is not None or key.tokens_per_day is not None):
            counted = self._count_shared(key, spends_tokens, peek=False)
            if counted is not None:
                return self._standings(key, counted)
        with self._lock:
            tokens = self._token_standing(key)
            if spends_tokens and tokens is not None and tokens.remaining <= 0:
                raise RateLimited(max(1, tokens.reset_seconds),
                                  "this API key used its completion tokens for today")
            requests = None
            if key.rpm is not None:
                bucket = self._refill(key)
                if bucket.tokens < 1:
                    wait = math.ceil((1 - bucket.tokens) * 60 / key.rpm)
                    raise RateLimited(max(1, wait),
                                      f"this API key may send {key.rpm} requests a minute")
                bucket.tokens -= 1
                requests = self._request_standing(key, bucket)
            return requests, tokens

    def standing(self, key: ApiKey) -> tuple[Standing | None, Standing | None]:
        """The standings without counting a request (for a response refused with 429)."""
        if self._shared is not None:
            counted = self._count_shared(key, False, peek=True)
            if counted is not None:
                return self._standings(key, counted, refuse=False)
        with self._lock:
            requests = None
            if key.rpm is not None:
                requests = self._request_standing(key, self._refill(key))
            return requests, self._token_standing(key)

    def _count_shared(self, key: ApiKey, spends_tokens: bool, peek: bool) -> Counted | None:
        """The request counted in the shared store; None when it is down: then this process
        counts on its own (said once), from the tokens it last read there, and asks the
        store again after ``SHARED_RETRY_SECONDS`` (not at every request: each would wait
        for the store's timeout first)."""
        assert self._shared is not None
        if self._on_my_own and self._clock() < self._retry_at:
            return None
        day = self._today().date().isoformat()
        try:
            counted = self._shared.count_request(key.id, key.rpm, key.tokens_per_day, day,
                                                 spends_tokens, peek)
        except StoreUnavailable:
            self._retry_at = self._clock() + SHARED_RETRY_SECONDS
            if not self._on_my_own:
                self._on_my_own = True
                logger.warning("the shared limits cannot be read: each gateway counts its "
                               "own requests and tokens until they can")
            return None
        with self._lock:
            self._tokens[key.id] = (day, counted.used)  # the reading to go on from, if need be
        if self._on_my_own:
            self._on_my_own = False
            logger.warning("the shared limits are back")
        return counted

    def _standings(self, key: ApiKey, counted: Counted,
                   refuse: bool = True) -> tuple[Standing | None, Standing | None]:
        tokens = None
        if key.tokens_per_day is not None:
            tokens = Standing(key.tokens_per_day, max(0, key.tokens_per_day - counted.used),
                              self._to_midnight())
        if refuse and counted.refused == "tokens":
            raise RateLimited(max(1, tokens.reset_seconds if tokens else 1),
                              "this API key used its completion tokens for today")
        requests = None
        if key.rpm is not None and counted.bucket is not None:
            if refuse and counted.refused == "requests":
                wait = math.ceil((1 - counted.bucket) * 60 / key.rpm)
                raise RateLimited(max(1, wait),
                                  f"this API key may send {key.rpm} requests a minute")
            requests = Standing(key.rpm, math.floor(counted.bucket),
                                math.ceil((key.rpm - counted.bucket) * 60 / key.rpm))
        return requests, tokens

    def _to_midnight(self) -> int:
        now = self._today()
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(),
                                    tzinfo=timezone.utc)
        return math.ceil((midnight - now).total_seconds())

    def meter(self, key: ApiKey) -> Callable[[int], str | None]:
        """What a turn calls with its completion tokens once it knows them."""
        return functools.partial(self.add_tokens, key)

    def add_tokens(self, key: ApiKey, count: int) -> str | None:
        """Count a turn's completion tokens against the key's day, also of a key without a
        daily quota (one may be given to it during the day); return the day (UTC,
        YYYY-MM-DD), or None when there was nothing to count."""
        if count <= 0:
            return None
        with self._lock:
            # With a shared store the turn's own write counts them there; here they go on
            # from its last reading, for when it is down.
            day = self._today().date().isoformat()
            self._tokens[key.id] = (day, self._used(key, day) + count)
            return day

    def _used(self, key: ApiKey, day: str) -> int:
        used_day, used = self._tokens.get(key.id, ("", 0))
        if used_day == day:
            return used
        if self._shared is not None:
            used = 0  # never read there today (read by count_request, which failed)
        elif self._ledger is not None:
            used = self._ledger.tokens_used(key.id, day)
        else:
            used = 0
        self._tokens[key.id] = (day, used)
        return used

    def _refill(self, key: ApiKey) -> _Bucket:
        assert key.rpm is not None
        now = self._clock()
        bucket = self._buckets.get(key.id)
        if bucket is None:
            bucket = self._buckets[key.id] = _Bucket(float(key.rpm), now)
        bucket.tokens = min(float(key.rpm), bucket.tokens + (now - bucket.stamp) * key.rpm / 60)
        bucket.stamp = now
        return bucket

    def _request_standing(self, key: ApiKey, bucket: _Bucket) -> Standing:
        assert key.rpm is not None
        missing = key.rpm - bucket.tokens
        return Standing(key.rpm, math.floor(bucket.tokens), math.ceil(missing * 60 / key.rpm))

    def _token_standing(self, key: ApiKey) -> Standing | None:
        if key.tokens_per_day is None:
            return None
        now = self._today()
        used = self._used(key, now.date().isoformat())
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(),
                                    tzinfo=timezone.utc)
        return Standing(key.tokens_per_day, max(0, key.tokens_per_day - used),
                        math.ceil((midnight - now).total_seconds()))
