"""Short-term conversation memory: the last turns of each conversation, in this process."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from .keys import LOCAL_ID


@dataclass(frozen=True, slots=True)
class Turn:
    """One exchange: what the user said and what the model answered.

    ``partial`` marks an answer cut short because the client went away mid-stream.
    """

    user: str
    assistant: str
    partial: bool = False
    done_reason: str = "stop"


class _Conversation:
    __slots__ = ("turns", "last_used", "owner")

    def __init__(self, max_turns: int, now: float, owner: str) -> None:
        self.turns: deque[Turn] = deque(maxlen=max_turns)
        self.last_used = now
        self.owner = owner  # the id of the API key that made it


class MemoryStore:
    """Keep the recent turns of many conversations, bounded three ways.

    At most ``max_turns`` turns per conversation (the oldest go first), conversations idle
    for longer than ``ttl_seconds`` are forgotten, and beyond ``max_conversations`` the least
    recently used one is evicted. The store is one dict guarded by one lock; under gunicorn's
    gevent worker the lock is cooperative, because the worker patches ``threading`` first.
    """

    def __init__(
        self,
        max_turns: int,
        ttl_seconds: float,
        max_conversations: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_turns = max_turns
        self.ttl_seconds = ttl_seconds
        self.max_conversations = max_conversations
        self._clock = clock
        self._lock = threading.Lock()
        # Ordered from least to most recently used, so expiry and eviction pop from the front.
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()

    def get_history(self, conversation_id: str) -> list[Turn]:
        """Return the remembered turns of a conversation, oldest first (empty if unknown).

        Reading does not count as use: a turn whose upstream call fails leaves the
        conversation's idle time and eviction order as they were.
        """
        with self._lock:
            self._expire(self._clock())
            conversation = self._conversations.get(conversation_id)
            return list(conversation.turns) if conversation is not None else []

    def append_turn(self, conversation_id: str, turn: Turn, owner: str = LOCAL_ID) -> None:
        """Remember ``turn`` as the newest of its conversation, evicting what the bounds say.

        A new conversation belongs to ``owner``, the id of the API key that made it.
        """
        with self._lock:
            now = self._clock()
            self._expire(now)
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                conversation = _Conversation(self.max_turns, now, owner)
                self._conversations[conversation_id] = conversation
                while len(self._conversations) > self.max_conversations:
                    self._conversations.popitem(last=False)
            else:
                conversation.last_used = now
                self._conversations.move_to_end(conversation_id)
            conversation.turns.append(turn)

    def owner(self, conversation_id: str) -> str | None:
        """The id of the key whose conversation it is; None if it is not remembered."""
        with self._lock:
            self._expire(self._clock())
            conversation = self._conversations.get(conversation_id)
            return conversation.owner if conversation is not None else None

    def list_conversations(self) -> list[tuple[str, str, int]]:
        """Every remembered conversation as (id, owner, turns), most recently used first."""
        with self._lock:
            self._expire(self._clock())
            return [(cid, c.owner, len(c.turns))
                    for cid, c in reversed(self._conversations.items())]

    def forget(self, conversation_id: str) -> bool:
        """Forget a conversation; return whether there was one."""
        with self._lock:
            return self._conversations.pop(conversation_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._conversations)

    def __contains__(self, conversation_id: object) -> bool:
        with self._lock:
            self._expire(self._clock())
            return conversation_id in self._conversations

    def _expire(self, now: float) -> None:
        deadline = now - self.ttl_seconds
        while self._conversations:
            oldest = next(iter(self._conversations.values()))
            if oldest.last_used > deadline:
                break
            self._conversations.popitem(last=False)
