"""``/conversations``: the remembered conversations of the request's key (of every key, for
an admin key), one conversation's turns, and forgetting one."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ...core.conversation import CONVERSATION_ID
from ...errors import ConversationBusy, ConversationNotFound
from ...memory import Store
from ...state import current_state
from ..auth import current_key, require_conversation
from .schemas import (
    ConversationInfo,
    ConversationList,
    ConversationTurns,
    Forgotten,
    TurnInfo,
)

bp = Blueprint("conversations", __name__)


@bp.get("/conversations")
def list_conversations() -> Response:
    key = current_key()
    memory = current_state().memory
    found = memory.conversations() if memory is not None else []
    listed = [ConversationInfo(conversation_id=cid, turns=turns,
                               owner=owner if key.admin else None)
              for cid, owner, turns in found if key.admin or owner == key.id]
    return jsonify(ConversationList(conversations=listed).model_dump(exclude_none=True))


@bp.get("/conversations/<conversation_id>")
def show_conversation(conversation_id: str) -> Response:
    """The turns, to the key that made the conversation only: an admin key manages other
    keys' conversations, it does not read them."""
    memory = _find(conversation_id, manage=False)
    turns = [TurnInfo(user=t.user, assistant=t.assistant, partial=t.partial,
                      done_reason=t.done_reason) for t in memory.history(conversation_id)]
    return jsonify(ConversationTurns(conversation_id=conversation_id, turns=turns).model_dump())


@bp.delete("/conversations/<conversation_id>")
def forget_conversation(conversation_id: str) -> Response:
    """:raise ConversationBusy: 409 while a turn of it is queued or runs, also its first
        one (nothing is remembered yet); cancel that first.
    :raise ConversationNotFound: 404 for an unknown or another key's conversation.
    """
    state = current_state()
    if state.memory is not None and CONVERSATION_ID.fullmatch(conversation_id) \
            and state.running.owner(conversation_id) is not None:
        require_conversation(conversation_id, manage=True)  # another key's: 404
        raise ConversationBusy()
    memory = _find(conversation_id, manage=True)
    memory.forget(conversation_id)
    return jsonify(Forgotten(conversation_id=conversation_id, status="deleted").model_dump())


def _find(conversation_id: str, manage: bool) -> Store:
    """The memory that holds a conversation the key may manage.

    :raise ConversationNotFound: 404 for an unknown, malformed or another key's id.
    """
    memory = current_state().memory
    if memory is None or not CONVERSATION_ID.fullmatch(conversation_id):
        raise ConversationNotFound()
    owner = memory.owner(conversation_id)
    if owner is None:
        raise ConversationNotFound()
    require_conversation(conversation_id, manage=manage, owner=owner)
    return memory
