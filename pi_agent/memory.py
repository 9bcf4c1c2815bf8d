"""Conversation memory: the seam (``Store``) and the store that keeps it in this process.

A store keeps the recent turns of each conversation, who owns it, and each key's
completion tokens per UTC day; ``MemoryStore`` keeps them in a dict (gone with the
process), ``stores.sqlite.SqliteStore`` in a file that survives restarts. Per-request
counters (request buckets, slots, the queue) are no store's business: nothing is written
per request.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .config import LOCAL_ID

# Completion tokens spent, by (key id, UTC day as YYYY-MM-DD).
Spent = Mapping[tuple[str, str], int]


@dataclass(frozen=True, slots=True)
class Turn:
    """One exchange: what the user said and what the model answered.

    ``partial`` marks an answer cut short because the client went away mid-stream;
    ``tokens`` is what the turn takes in a prompt (0: not known, to be estimated).
    """

    user: str
    assistant: str
    partial: bool = False
    done_reason: str = "stop"
    tokens: int = 0


class _Conversation:
    __slots__ = ("turns", "last_used", "owner", "size")

    def __init__(self, now: float, owner: str, size: int) -> None:
        self.turns: deque[tuple[Turn, int]] = deque()  # each turn with its size in bytes
        self.last_used = now
        self.owner = owner  # the id of the API key that made it
        self.size = size


class Store(Protocol):
    """What the gateway keeps between turns; every method may be called from any request.

    ``append`` is one finished turn, written at once: the turns its call left out are
    dropped first (``drop``), the bounds applied, and the tokens it ``spent`` counted.
    Reads ignore conversations idle for longer than the TTL.
    """

    max_turns: int
    keep_on_drop: int

    def history(self, conversation_id: str) -> list[Turn]:
        """The remembered turns of a conversation, oldest first (empty if unknown)."""

    def append(self, conversation_id: str, turn: Turn, owner: str = LOCAL_ID,
               drop: int = 0, spent: Spent | None = None, claim: str = "") -> None:
        """Remember ``turn`` as the newest of its conversation (made for ``owner``); with
        the ``claim`` its turn holds, only while it still holds it (the tokens count
        anyway)."""

    def claim(self, conversation_id: str, owner: str = LOCAL_ID) -> str:
        """Hold a conversation for one turn of ``owner`` (a key id) in every process that
        shares the store; return
        what ``let_go`` and ``append`` need ("" for a store of one process, where
        admission control holds it).

        :raise ConversationBusy: a turn of another process holds it.
        """

    def let_go(self, conversation_id: str, claim: str) -> None:
        """End a ``claim``; one that is lost or ended already is left alone."""

    def cancel_elsewhere(self, conversation_id: str, key_id: str, admin: bool) -> bool:
        """Ask the process whose turn holds the conversation to stop it, for the key that
        owns the turn (or an admin key); False when no turn holds it for this key."""

    def trouble(self) -> str:
        """What is wrong with a store that runs apart from the server (Redis), for
        ``/ready``; "" when nothing is."""

    def spend(self, spent: Spent) -> None:
        """Count the completion tokens of a turn that remembers nothing."""

    def tokens_used(self, key_id: str, day: str) -> int:
        """The completion tokens counted for a key on a UTC day."""

    def owner(self, conversation_id: str) -> str | None:
        """The id of the key whose conversation it is; None if it is not remembered."""

    def conversations(self) -> list[tuple[str, str, int]]:
        """Every remembered conversation as (id, owner, turns), most recently used first."""

    def forget(self, conversation_id: str) -> bool:
        """Forget a conversation; return whether there was one."""

    def close(self) -> None:
        """Let go of what the store holds open (files, threads)."""

    @property
    def bytes_used(self) -> int:
        """The UTF-8 bytes of every remembered message and conversation id."""

    def __len__(self) -> int:
        """The conversations remembered."""

    def __contains__(self, conversation_id: object) -> bool:
        """Whether a conversation is remembered."""


class Bounded:
    """The bounds every store keeps to, with the same rules (``MemoryStore``'s docstring)."""

    def _bound(self, max_turns: int, ttl_seconds: float, max_conversations: int,
               max_bytes: int, max_per_key: int, keep_on_drop: int) -> None:
        self.max_turns = max_turns
        # At least the turn just remembered stays; at most all but the oldest.
        self.keep_on_drop = max(1, min(keep_on_drop, max_turns - 1))
        self.ttl_seconds = ttl_seconds
        self.max_conversations = max_conversations
        self.max_bytes = max_bytes
        self.max_per_key = max_per_key


class OneProcess:
    """The claims of a store that one process uses: its admission control holds a
    conversation, and its ``RunningTurns`` has every turn to cancel."""

    def claim(self, conversation_id: str, owner: str = LOCAL_ID) -> str:
        return ""

    def let_go(self, conversation_id: str, claim: str) -> None:
        pass

    def cancel_elsewhere(self, conversation_id: str, key_id: str, admin: bool) -> bool:
        return False

    def trouble(self) -> str:
        return ""


def turn_size(turn: Turn) -> int:
    """What a turn counts against the byte budget: the UTF-8 bytes of its messages."""
    return len(turn.user.encode("utf-8", "surrogatepass")) + \
        len(turn.assistant.encode("utf-8", "surrogatepass"))


class MemoryStore(Bounded, OneProcess):
    """Keep the recent turns of many conversations in this process, bounded five ways.

    At most ``max_turns`` turns per conversation: one more drops the oldest in one block,
    keeping the newest ``keep_on_drop`` (so that the prompts between two drops each begin
    with the one before, which Ollama has in its cache); conversations idle
    for longer than ``ttl_seconds`` are forgotten, and beyond ``max_conversations`` the least
    recently used one is evicted. What is kept is bounded in bytes too: ``max_bytes``
    counts the UTF-8 bytes of every remembered message and conversation id (an emoji counts
    4, as it would on the wire); beyond it the key that keeps the most bytes gives way
    first: its least recently used conversations go, then the oldest turns of the one it
    just used (which keeps its newest turn at least). And each key may
    keep ``max_per_key`` conversations: a key that makes one more loses its own least
    recently used one, never another key's. The local user (a server without keys) is
    the only user, bounded by ``max_conversations`` alone.

    The store is one dict guarded by one lock; under gunicorn's gevent worker the lock is
    cooperative, because the worker patches ``threading`` first. Of the token days, each
    key's latest is kept.
    """

    def __init__(
        self,
        max_turns: int,
        ttl_seconds: float,
        max_conversations: int,
        max_bytes: int = 32 * 1024 * 1024,
        max_per_key: int = 100,
        clock: Callable[[], float] = time.monotonic,
        keep_on_drop: int = 1,
    ) -> None:
        self._bound(max_turns, ttl_seconds, max_conversations, max_bytes, max_per_key,
                    keep_on_drop)
        self._clock = clock
        self._lock = threading.Lock()
        # Ordered from least to most recently used, so expiry and eviction pop from the front.
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._per_owner: Counter[str] = Counter()  # conversations of each key
        self._owner_bytes: Counter[str] = Counter()
        self._bytes = 0
        self._tokens: dict[str, tuple[str, int]] = {}  # key id -> (UTC day, tokens)

    @property
    def bytes_used(self) -> int:
        """The UTF-8 bytes of everything kept, as the budget counts them."""
        with self._lock:
            return self._bytes

    def history(self, conversation_id: str) -> list[Turn]:
        """Return the remembered turns of a conversation, oldest first (empty if unknown).

        Reading does not count as use: a turn whose upstream call fails leaves the
        conversation's idle time and eviction order as they were.
        """
        with self._lock:
            self._expire(self._clock())
            conversation = self._conversations.get(conversation_id)
            return [turn for turn, _ in conversation.turns] if conversation is not None else []

    def append(self, conversation_id: str, turn: Turn, owner: str = LOCAL_ID,
               drop: int = 0, spent: Spent | None = None, claim: str = "") -> None:
        """Remember ``turn`` as the newest of its conversation, evicting what the bounds say.

        A new conversation belongs to ``owner``, the id of the API key that made it. The
        ``drop`` oldest turns go first: those the turn's call left out for its token
        budget, so that the next call's prompt begins with this one's. ``spent``: the
        completion tokens the turn counted.
        """
        size = turn_size(turn)
        with self._lock:
            now = self._clock()
            self._expire(now)
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                conversation = self._start(conversation_id, owner, now)
            else:
                conversation.last_used = now
                self._conversations.move_to_end(conversation_id)
            for _ in range(min(drop, len(conversation.turns))):
                self._drop_oldest_turn(conversation)
            conversation.turns.append((turn, size))
            self._count(conversation, size)
            if len(conversation.turns) > self.max_turns:
                while len(conversation.turns) > self.keep_on_drop:
                    self._drop_oldest_turn(conversation)
            self._fit_budget(conversation_id, conversation)
            self._spend(spent or {})

    def spend(self, spent: Spent) -> None:
        with self._lock:
            self._spend(spent)

    def tokens_used(self, key_id: str, day: str) -> int:
        with self._lock:
            used_day, used = self._tokens.get(key_id, (day, 0))
            return used if used_day == day else 0

    def _spend(self, spent: Spent) -> None:
        for (key_id, day), count in spent.items():
            used_day, used = self._tokens.get(key_id, (day, 0))
            if day >= used_day:  # a turn that began before midnight may count for both days
                self._tokens[key_id] = (day, (used if used_day == day else 0) + count)

    def owner(self, conversation_id: str) -> str | None:
        """The id of the key whose conversation it is; None if it is not remembered."""
        with self._lock:
            self._expire(self._clock())
            conversation = self._conversations.get(conversation_id)
            return conversation.owner if conversation is not None else None

    def conversations(self) -> list[tuple[str, str, int]]:
        """Every remembered conversation as (id, owner, turns), most recently used first."""
        with self._lock:
            self._expire(self._clock())
            return [(cid, c.owner, len(c.turns))
                    for cid, c in reversed(self._conversations.items())]

    def forget(self, conversation_id: str) -> bool:
        """Forget a conversation; return whether there was one."""
        with self._lock:
            if conversation_id not in self._conversations:
                return False
            self._remove(conversation_id)
            return True

    def close(self) -> None:
        """Nothing to let go of: the dict goes with the process."""

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._conversations)

    def __contains__(self, conversation_id: object) -> bool:
        with self._lock:
            self._expire(self._clock())
            return conversation_id in self._conversations

    def _start(self, conversation_id: str, owner: str, now: float) -> _Conversation:
        """A new conversation, after its owner's least recently used one if the owner has
        its fill, and the store's least recently used one if the store has."""
        if owner != LOCAL_ID and self._per_owner[owner] >= self.max_per_key:
            oldest = next(cid for cid, c in self._conversations.items() if c.owner == owner)
            self._remove(oldest)
        conversation = _Conversation(now, owner, 0)
        self._conversations[conversation_id] = conversation
        self._per_owner[owner] += 1
        self._count(conversation, len(conversation_id.encode()))
        while len(self._conversations) > self.max_conversations:
            self._remove(next(iter(self._conversations)))
        return conversation

    def _fit_budget(self, newest_id: str, newest: _Conversation) -> None:
        """Over the budget, the key that keeps the most gives way: a key that sends long
        messages evicts its own conversations before anybody else's."""
        while self._bytes > self.max_bytes:
            heavy = self._owner_bytes.most_common(1)[0][0]
            victim = self._oldest_of(heavy, newest_id)
            if victim is not None:
                self._remove(victim)
            elif heavy == newest.owner and len(newest.turns) > 1:
                self._drop_oldest_turn(newest)
            elif len(self._conversations) > 1:
                # The newest is one turn of the heaviest key: the others' oldest go.
                self._remove(next(cid for cid in self._conversations if cid != newest_id))
            else:
                return  # one turn alone over the budget: it is kept until the next one

    def _oldest_of(self, owner: str, but: str) -> str | None:
        return next((cid for cid, c in self._conversations.items()
                     if c.owner == owner and cid != but), None)

    def _count(self, conversation: _Conversation, size: int) -> None:
        conversation.size += size
        self._owner_bytes[conversation.owner] += size
        self._bytes += size

    def _drop_oldest_turn(self, conversation: _Conversation) -> None:
        _, size = conversation.turns.popleft()
        self._count(conversation, -size)

    def _remove(self, conversation_id: str) -> None:
        conversation = self._conversations.pop(conversation_id)
        owner = conversation.owner
        self._count(conversation, -conversation.size)
        self._per_owner[owner] -= 1
        if not self._per_owner[owner]:
            del self._per_owner[owner]
            del self._owner_bytes[owner]

    def _expire(self, now: float) -> None:
        deadline = now - self.ttl_seconds
        while self._conversations:
            cid, oldest = next(iter(self._conversations.items()))
            if oldest.last_used > deadline:
                break
            self._remove(cid)
