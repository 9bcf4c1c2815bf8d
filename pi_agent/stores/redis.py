"""Memory shared by several workers and gateways: the ``Store`` of memory.py in Redis.

Bounded as ``MemoryStore`` is, with the same rules (the contract tests run against every
store). A finished turn, a forget and a sweep are each one Lua script, which Redis runs
atomically: one turn is one step for every gateway that shares the store. Reads are plain
commands in one MULTI. Idle time is counted on the clock of the gateway that writes (the
wall clock), so that every gateway forgets a conversation at the same moment.

Keys, each under the prefix (``PI_AGENT_REDIS_PREFIX``):

- ``conv:<id>``: a hash of the conversation's owner, last use and bytes;
- ``turns:<id>``: a list of its turns, oldest first, each ``<bytes>|<JSON>`` (the JSON
  escapes lone surrogates, so any message round-trips);
- ``by_use`` and ``by_idle``: sorted sets of the conversation ids by their last use (a
  counter, for least recently used) and by its time (for the TTL); ``owned:<key id>``,
  each key's by their last use;
- ``owner_count``, ``owner_bytes`` and ``bytes``: what each key keeps, and all of it;
- ``tokens:<key id>:<day>``: a key's completion tokens of a UTC day (kept 32 days);
- ``bucket:<key id>``: a key's bucket of requests per minute, refilled on Redis's clock;
- ``busy:<id>``: the claim of the turn that holds the conversation, in whichever gateway:
  a lease of ``claim_seconds``, renewed while the turn runs, so that the conversation of a
  gateway that died is free again within it;
- ``slots:<upstream>`` and ``queue``: the generation slots of an upstream (host:port) and
  the places of the queue taken in every gateway, each a sorted set of leases by their end
  (``claim_seconds`` too, renewed while the turn holds them); ``fence``, the counter that
  names each lease.

The client library is imported when this store is used only (it costs a few MiB). Every
command has a short timeout, and a failure opens a circuit breaker for a second: when Redis
is down or frozen, what needs the store answers 503 within a second instead of waiting.
A standalone Redis or Valkey (or one behind Sentinel): the scripts name their keys
themselves, which Redis Cluster does not allow; and with ``maxmemory-policy noeviction``,
so that Redis never drops one key of a conversation.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
from importlib import resources
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import LOCAL_ID
from ..errors import ConversationBusy, StoreUnavailable
from ..memory import Bounded, Spent, Turn, turn_size
from ..security.limits import Counted
from .redis_leases import BREAKER_SECONDS, Leases

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 0.25
SOCKET_TIMEOUT = 0.5
# A turn's hold on its conversation, renewed every third of it while the turn runs.
CLAIM_SECONDS = 30.0

# The rules, in Lua (redis.lua beside this file): read once, sent once, run by its hash.
SCRIPT = resources.files(__package__).joinpath("redis.lua").read_text(encoding="utf-8")


class RedisStore(Bounded, Leases):
    """A ``memory.Store`` in the Redis at ``url`` (``redis://host:port/db``,
    ``unix:///path?db=0``), under ``prefix``. Nothing connects until the first command."""

    def __init__(
        self,
        url: str,
        max_turns: int,
        ttl_seconds: float,
        max_conversations: int,
        max_bytes: int = 32 * 1024 * 1024,
        max_per_key: int = 100,
        keep_on_drop: int = 1,
        prefix: str = "pi-agent:",
        clock: Callable[[], float] = time.time,
        sweep_seconds: float = 60.0,
        claim_seconds: float = CLAIM_SECONDS,
        on_cancel: Callable[[str], object] = lambda conversation_id: None,
    ) -> None:
        """``on_cancel`` stops this process's turn of a conversation (``RunningTurns``),
        when another gateway cancels it."""
        self.url = url
        self._bound(max_turns, ttl_seconds, max_conversations, max_bytes, max_per_key,
                    keep_on_drop)
        self.sweep_seconds = sweep_seconds
        self.claim_seconds = claim_seconds
        self._claims: dict[str, str] = {}  # the conversations this process's turns hold
        # The generation slots and queue places they hold: lease -> "slots:<upstream>", "queue".
        self._leases: dict[str, str] = {}
        self._holder = f"{socket.gethostname()}:{os.getpid()}"  # in a lease, for a person
        self._on_cancel = on_cancel
        self._prefix = prefix
        self._clock = clock
        # redis-py's pool opens connections on use, and again in a process after a fork.
        # Its replies are typed as a union of every reply: Any, checked by the tests. One
        # retry, after a connection that failed (a pooled one Redis closed on a restart),
        # not after a timeout: Redis may have run that command, and a write must not run
        # twice.
        self._redis: Any = redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            decode_responses=True)
        self._script = self._redis.register_script(SCRIPT)
        self._closed = threading.Event()
        self._broken_until = 0.0  # the circuit breaker: commands fail at once until then
        self._to_give: list[tuple[str, str]] = []  # leases to end, once Redis answers
        self._tending = 0  # the process whose loop renews the claims
        self._start_lock = threading.Lock()
        self._hearing = threading.Event()  # cancels from other gateways are subscribed to
        self._hearing_due = False  # the next claim waits for that

    # -- reads

    def history(self, conversation_id: str) -> list[Turn]:
        with self._talking():
            pipe = self._redis.pipeline()
            pipe.hget(self._key("conv:", conversation_id), "last_used")
            pipe.lrange(self._key("turns:", conversation_id), 0, -1)
            last_used, items = pipe.execute()
        if last_used is None or not self._alive(last_used):
            return []
        return [_turn(item) for item in items]

    def owner(self, conversation_id: str) -> str | None:
        with self._talking():
            owner, last_used = self._redis.hmget(self._key("conv:", conversation_id),
                                                 ["owner", "last_used"])
        if owner is None or last_used is None or not self._alive(last_used):
            return None
        return str(owner)

    def conversations(self) -> list[tuple[str, str, int]]:
        with self._talking():
            ids = self._redis.zrevrange(self._key("by_use"), 0, -1)
            pipe = self._redis.pipeline()
            for cid in ids:
                pipe.hmget(self._key("conv:", cid), ["owner", "last_used"])
                pipe.llen(self._key("turns:", cid))
            found = pipe.execute()
        listed = []
        for cid, (owner, last_used), turns in zip(ids, found[::2], found[1::2]):
            if owner is not None and last_used is not None and self._alive(last_used):
                listed.append((str(cid), str(owner), int(turns)))
        return listed

    def tokens_used(self, key_id: str, day: str) -> int:
        with self._talking():
            used = self._redis.get(self._key("tokens:", f"{key_id}:{day}"))
        return int(used) if used is not None else 0

    @property
    def bytes_used(self) -> int:
        """The UTF-8 bytes of everything kept (idle conversations not counted)."""
        with self._talking():
            ids = self._redis.zrangebyscore(self._key("by_idle"),
                                            f"({self._clock() - self.ttl_seconds!r}", "+inf")
            pipe = self._redis.pipeline()
            for cid in ids:
                pipe.hget(self._key("conv:", cid), "bytes")
            sizes = pipe.execute()
        return sum(int(size) for size in sizes if size is not None)

    def __len__(self) -> int:
        return len(self.conversations())

    def __contains__(self, conversation_id: object) -> bool:
        return isinstance(conversation_id, str) and self.owner(conversation_id) is not None

    # -- writes: one script each

    def append(self, conversation_id: str, turn: Turn, owner: str = LOCAL_ID,
               drop: int = 0, spent: Spent | None = None, claim: str = "") -> None:
        """One atomic step: see ``MemoryStore.append`` for what it does; with a ``claim``,
        only while the turn still holds the conversation."""
        item = json.dumps([turn.user, turn.assistant, turn.partial, turn.done_reason,
                           turn.tokens])
        size = turn_size(turn)
        if not self._run("append", conversation_id, owner, drop, f"{size}|{item}", size,
                         len(conversation_id.encode()), claim, *_flat(spent or {})):
            logger.error("conversation %s was taken by another turn while this one ran "
                         "(its claim ran out): its answer is not remembered", conversation_id)

    def claim(self, conversation_id: str, owner: str = LOCAL_ID) -> str:
        """:raise ConversationBusy: a turn in this or another gateway holds it."""
        token = f"{uuid.uuid4().hex} {owner}"  # the owner: who may cancel it elsewhere
        self._start_tending()
        busy = self._key("busy:", conversation_id)
        with self._talking():
            taken = self._redis.set(busy, token, nx=True, px=round(self.claim_seconds * 1000))
            # A retry of a SET that ran already finds the key taken, by this claim.
            if not taken and self._redis.get(busy) != token:
                raise ConversationBusy()
        self._claims[conversation_id] = token
        if self._hearing_due:
            # Redis answers: the first claim in a process waits a moment for the
            # subscription, or a cancel sent from another gateway just after it would be
            # found only by the claim's renewal.
            self._hearing_due = False
            self._hearing.wait(SOCKET_TIMEOUT)
        return token

    def cancel_elsewhere(self, conversation_id: str, key_id: str, admin: bool) -> bool:
        """A cancel for the turn that holds the conversation, in whichever gateway: told at
        once to every gateway (Redis's publish), and left for the turn's next renewal in
        case its gateway missed the message."""
        return bool(self._run("cancel", conversation_id, key_id, int(admin),
                              round(self.claim_seconds * 1000)))

    def let_go(self, conversation_id: str, claim: str) -> None:
        """A claim that cannot be ended now (Redis down) runs out by itself."""
        if self._claims.get(conversation_id) == claim:
            del self._claims[conversation_id]
        try:
            self._run("let_go", conversation_id, claim, breaker=False)
        except StoreUnavailable:
            pass

    def spend(self, spent: Spent) -> None:
        if spent:
            self._run("spend", *_flat(spent))

    def count_request(self, key_id: str, rpm: int | None, tokens_per_day: int | None,
                      day: str, spends_tokens: bool, peek: bool = False) -> Counted:
        """One request of a key against the limits every gateway shares (``peek``: look
        only), one script: see ``security.limits.Limits``."""
        refused, left, used = self._run(
            "admit", key_id, "" if rpm is None else rpm,
            "" if tokens_per_day is None else tokens_per_day, day, int(spends_tokens),
            int(peek))
        return Counted("" if refused == "ok" else str(refused),
                       float(left) if left else None, int(used))

    def forget(self, conversation_id: str) -> bool:
        return bool(self._run("forget", conversation_id))

    def sweep(self) -> None:
        """Apply the bounds to what Redis holds, as ``SqliteStore.sweep`` does."""
        self._run("sweep")

    def trouble(self) -> str:
        try:
            with self._talking():
                self._redis.ping()
        except StoreUnavailable:
            return (f"redis at {self.url} does not answer: conversations answer 503 until it "
                    "is back; limits, generation slots and the queue are counted per gateway "
                    "meanwhile")
        return ""

    def close(self) -> None:
        self._closed.set()
        self._redis.close()

    # -- the rest

    def _run(self, mode: str, *args: Any, breaker: bool = True) -> Any:
        self._start_tending()
        bounds = (self._prefix, repr(self._clock()), self.ttl_seconds, self.max_turns,
                  self.keep_on_drop, self.max_conversations, self.max_bytes, self.max_per_key,
                  LOCAL_ID, mode)
        with self._talking(breaker):
            return self._script(args=[*bounds, *args])

    @contextmanager
    def _talking(self, breaker: bool = True) -> Iterator[None]:
        """Translate Redis's errors. ``breaker``: fail at once while the circuit breaker is
        open (False for what ends or renews a hold: a claim, a slot or a place left in
        Redis would keep them from every gateway)."""
        if breaker and time.monotonic() < self._broken_until:
            raise StoreUnavailable()
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._broken_until = time.monotonic() + BREAKER_SECONDS
            logger.error("the store at %s failed: %s", self.url, exc)
            raise StoreUnavailable() from None
        except redis.RedisError as exc:
            logger.error("the store at %s failed: %s", self.url, exc)
            raise StoreUnavailable() from None

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self._prefix}{kind}{name}"

    def _alive(self, last_used: str) -> bool:
        return float(last_used) > self._clock() - self.ttl_seconds

    def _start_tending(self) -> None:
        """Start the loop once per process (a thread does not survive a fork)."""
        if self._tending == os.getpid():
            return
        with self._start_lock:
            if self._tending == os.getpid():
                return
            self._tending = os.getpid()
            self._hearing.clear()
            self._hearing_due = True
            threading.Thread(target=self._tend, name="pi-agent-store-tend",
                             daemon=True).start()
            threading.Thread(target=self._hear_cancels, name="pi-agent-store-cancels",
                             daemon=True).start()

    def _tend(self) -> None:
        """Renew the claims of the turns under way, and sweep now and then. A greenlet under
        gevent (threading is patched), else a thread."""
        swept = renewed = time.monotonic()
        while not self._closed.wait(self._tending_pause()):
            try:
                self._give_pending()
                if time.monotonic() - renewed < self._renewal_seconds():
                    continue
                renewed = time.monotonic()
                held = dict(self._claims)  # the claims as they were sent
                if held:
                    pairs = [part for pair in held.items() for part in pair]
                    for cid in self._run("renew", round(self.claim_seconds * 1000), *pairs,
                                         breaker=False):
                        self._cancel_mine(cid, held[cid])
                self._renew_leases()
                if self.sweep_seconds > 0 and time.monotonic() - swept >= self.sweep_seconds:
                    swept = time.monotonic()
                    self.sweep()
            except StoreUnavailable:
                pass  # logged; the next round tries again
            except Exception:  # the loop must outlive a bug: claims would run out
                logger.exception("renewing the claims failed")

    def _hear_cancels(self) -> None:
        """Stop this process's turns that another gateway cancels, as the cancels come; a
        message missed while Redis was away is found by the next renewal."""
        while not self._closed.is_set():
            try:
                listening = self._redis.pubsub()
                try:
                    listening.subscribe(self._key("cancels"))
                    while not self._closed.is_set():
                        message = listening.get_message(timeout=1.0)
                        if message is None:
                            continue
                        if message["type"] == "subscribe":  # Redis confirms it
                            self._hearing.set()
                        elif message["type"] == "message":
                            cid, _, claim = str(message["data"]).partition(" ")
                            self._cancel_mine(cid, claim)
                finally:
                    listening.close()
            except redis.RedisError:
                self._closed.wait(1.0)  # Redis is away: listen again in a second
            except Exception:
                logger.exception("hearing cancels failed")
                self._closed.wait(1.0)

    def _cancel_mine(self, conversation_id: str, claim: str) -> None:
        # Only the turn the cancel was for: a later turn of the conversation keeps going.
        if claim and self._claims.get(conversation_id) == claim:
            self._on_cancel(conversation_id)


def _turn(item: str) -> Turn:
    user, assistant, partial, done_reason, tokens = json.loads(item.split("|", 1)[1])
    return Turn(user, assistant, bool(partial), done_reason, int(tokens))


def _flat(spent: Spent) -> list[Any]:
    return [part for (key_id, day), count in spent.items() if count > 0
            for part in (key_id, day, count)]
