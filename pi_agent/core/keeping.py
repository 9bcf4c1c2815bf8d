"""What a turn keeps in the store: its claim on the conversation, the completion tokens it
spent, and its answer; one write when the answer is remembered, one more for tokens that
went with no answer, and the claim let go when the turn ends. Nothing here runs per token.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from ..errors import StoreUnavailable
from ..memory import Store
from ..memory import Turn as Remembered

logger = logging.getLogger(__name__)


class Keeping:
    """One turn's business with the store. ``memory`` is None for a turn that reads and
    keeps no history (memory off, or the ``/api`` front); its tokens still go to ``store``.

    :raise ConversationBusy: 409 when a turn of another gateway holds the conversation.
    :raise StoreUnavailable: 503 when the store that holds it is down.
    """

    def __init__(self, store: Store, memory: Store | None, conversation_id: str, owner: str,
                 meter: Callable[[int], str | None], fresh: bool = False) -> None:
        """A ``fresh`` conversation (its id made for this request) has no history to lose:
        while the store is down it is answered without memory instead of refused."""
        self.memory = memory
        self._store = store
        self._conversation_id = conversation_id
        self._owner = owner
        self._meter = meter
        # The completion tokens counted and not yet written to the store, by (key, day).
        self._spent: Counter[tuple[str, str]] = Counter()
        # Held in every gateway that shares the store too (Redis); "" where it is this one's.
        self._claim = ""
        if memory is not None:
            try:
                self._claim = memory.claim(conversation_id, owner)
            except StoreUnavailable:
                if not fresh:
                    raise
                logger.warning("conversation %s is answered without memory: the store is "
                               "down", conversation_id)
                self.memory = None

    def spend(self, tokens: int) -> None:
        """Count completion tokens against the key's day; written with the answer, or when
        the turn ends."""
        try:
            day = self._meter(tokens)
        except StoreUnavailable:  # a new day's count could not be read: logged by the store
            return
        if day is not None:
            self._spent[(self._owner, day)] += tokens

    def remember(self, turn: Remembered, drop: int) -> None:
        """Write the turn, the ``drop`` oldest turns its call left out and the tokens spent
        so far in one step. A store that fails is logged and told no further: the client
        has the answer; its tokens are tried again alone when the turn ends."""
        assert self.memory is not None
        spent, self._spent = self._spent, Counter()
        try:
            self.memory.append(self._conversation_id, turn, self._owner, drop, spent,
                               self._claim)
        except StoreUnavailable:
            logger.error("the answer of conversation %s was not remembered",
                         self._conversation_id)
            self._spent.update(spent)

    def finish(self) -> None:
        """Write the tokens of a turn that remembered nothing, and let go of the claim."""
        try:
            if self._spent:
                spent, self._spent = self._spent, Counter()
                self._store.spend(spent)
        except StoreUnavailable:
            logger.error("the tokens of a turn of key %s were not written", self._owner)
        finally:
            if self._claim and self.memory is not None:
                self.memory.let_go(self._conversation_id, self._claim)
