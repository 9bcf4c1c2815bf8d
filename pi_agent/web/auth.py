"""Who is asking: the API key of each request, its scopes, its limits and its conversations.

Every route but ``/health`` and CORS preflights needs a key once a key file is configured
(``PI_AGENT_KEYS_FILE``). Without one the server is in local mode: every request acts as
the one local user, and gunicorn.conf.py lets it listen on loopback only.
"""
from __future__ import annotations

import logging
import socket

from flask import Flask, Response, g, request

from ..config import LOCAL_ID
from ..providers.ollama_replies import full_model_name
from ..errors import (
    ConversationNotFound,
    LocalOnly,
    NotAllowed,
    RateLimited,
    StoreUnavailable,
    Unauthenticated,
)
from ..security.exposure import is_loopback
from ..security.keys import ApiKey
from ..state import current_state

logger = logging.getLogger(__name__)

# The user of a server without keys (or with PI_AGENT_AUTH=off): may do everything.
LOCAL = ApiKey(id=LOCAL_ID, name="local", hash="0" * 64, admin=True)


def init_app(app: Flask) -> None:
    app.before_request(authenticate)
    app.before_request(count_request)
    app.after_request(add_limit_headers)


# Answered to anyone, with or without a key: liveness, the API's description, and the chat
# page's own files (the page asks for a key when the API wants one).
PUBLIC = ("/health", "/openapi.json", "/docs", "/ui")
PUBLIC_FOLDERS = ("/docs/", "/ui/")


def authenticate() -> None:
    """Find the request's key; without a key file, the local user, for local clients only.

    :raise Unauthenticated: 401, the same for a missing, unknown or revoked key.
    :raise LocalOnly: 403 in local mode for a client on another machine.
    """
    if request.method == "OPTIONS" or request.path in PUBLIC or request.path.startswith(
            PUBLIC_FOLDERS):
        return
    state = current_state()
    if state.keys is None:
        # Local mode. gunicorn.conf.py binds it to loopback; this also holds where it does
        # not run (another WSGI server, systemd sockets) and behind a reverse proxy on this
        # machine, which says whom it forwards for.
        if state.settings.auth == "on" and not _from_this_machine():
            raise LocalOnly()
        g.api_key = LOCAL
        return
    key = state.keys.find(_presented_key())
    if key is None:
        # Never the key itself, nor a part of it: a log is read by more people than keys.
        logger.info("refused %s %s: no valid API key", request.method, request.path[:100])
        raise Unauthenticated()
    g.api_key = key
    logger.info("%s %s by %s", request.method, request.path[:100], key.id)


def count_request() -> None:
    """Count the request against its key's limits.

    :raise RateLimited: 429 when the key has used up a limit.
    """
    key: ApiKey | None = g.get("api_key")
    # Stopping a turn must work also for a key that used up its limits.
    if key is None or key is LOCAL or request.endpoint == "chat.cancel":
        return
    try:
        g.standing = current_state().limits.admit(key, spends_tokens=request.method == "POST")
    except RateLimited:
        logger.info("refused a request of %s: over its limit", key.id)
        raise


def add_limit_headers(response: Response) -> Response:
    """X-RateLimit-* on every response to a key with limits, refusals included."""
    key: ApiKey | None = g.get("api_key")
    if key is None or (key.rpm is None and key.tokens_per_day is None):
        return response
    standing = g.get("standing")
    if standing is None:
        try:
            standing = current_state().limits.standing(key)
        except StoreUnavailable:  # the answer says so already: no headers rather than a 500
            return response
    requests, tokens = standing
    if requests is not None:
        response.headers["X-RateLimit-Limit"] = str(requests.limit)
        response.headers["X-RateLimit-Remaining"] = str(requests.remaining)
        response.headers["X-RateLimit-Reset"] = str(requests.reset_seconds)
    if tokens is not None:
        response.headers["X-RateLimit-Limit-Tokens"] = str(tokens.limit)
        response.headers["X-RateLimit-Remaining-Tokens"] = str(tokens.remaining)
        response.headers["X-RateLimit-Reset-Tokens"] = str(tokens.reset_seconds)
    return response


def current_key() -> ApiKey:
    key: ApiKey = g.get("api_key", LOCAL)
    return key


def allow_agent(name: str, param: str = "agent") -> None:
    """:raise NotAllowed: 403 if the request's key may not use the agent."""
    key = current_key()
    if key.agents is not None and name not in key.agents:
        raise NotAllowed(f"the agent {name!r}", param=param)


def allow_model(model: str, param: str = "model") -> None:
    """:raise NotAllowed: 403 if the request's key may not use the model."""
    if not may_use_model(current_key(), model):
        raise NotAllowed(f"the model {model[:200]!r}", param=param)


def may_use_model(key: ApiKey, model: str) -> bool:
    return key.models is None or full_model_name(model) in {full_model_name(m) for m in key.models}


def may_use_agent(key: ApiKey, name: str) -> bool:
    return key.agents is None or name in key.agents


def require_conversation(conversation_id: str, manage: bool = False,
                         owner: str | None = None) -> None:
    """Check that the request's key may use the conversation: its own, or, to ``manage``
    it (delete it, cancel its turn), any, with the admin scope. A conversation that does
    not exist yet is there for the taking. ``owner``: already looked up by the caller
    (with a shared store, each look is a round trip).

    :raise ConversationNotFound: 404, as if another key's conversation did not exist.
    """
    key = current_key()
    owner = owner or owner_of(conversation_id)
    if owner is None or owner == key.id or (manage and key.admin):
        return
    raise ConversationNotFound()


def owner_of(conversation_id: str) -> str | None:
    """The id of the key whose conversation it is: running now, or remembered."""
    state = current_state()
    owner = state.running.owner(conversation_id)
    if owner is None and state.memory is not None:
        owner = state.memory.owner(conversation_id)
    return owner


def _from_this_machine() -> bool:
    if "Forwarded" in request.headers or "X-Forwarded-For" in request.headers:
        return False
    sock = request.environ.get("gunicorn.socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        return True
    return is_loopback(request.remote_addr or "")


def _presented_key() -> str:
    # The first that is not empty: a client library may send an empty X-API-Key by default
    # beside the key it was given as a Bearer token.
    value = request.headers.get("X-API-Key", "")
    if not value:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        value = token.strip() if scheme.lower() == "bearer" else ""
    return value
