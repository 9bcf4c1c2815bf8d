"""Errors that know their HTTP status, a stable code and a message a client can act on.

Rendering them is the web layer's job (pi_agent/web/errors.py picks the front's renderer):
here they are only raised and caught, also where no request exists.
"""
from __future__ import annotations

from pydantic import BaseModel


class FieldProblem(BaseModel):
    """One failing field of a rejected body; the input itself is never echoed back."""

    field: str
    problem: str


class PiAgentError(Exception):
    """Base of the server's own errors: an HTTP status, a stable code and a message.

    Not a werkzeug ``HTTPException``: the core raises these without knowing about Flask.
    """

    code = 500
    error_code = "internal_error"
    description = "internal server error"
    param: str | None = None  # the request field at fault, where there is one
    # Whether the client's connection must not serve another request after this answer,
    # because the rest of the request's body may still be on its way.
    close_connection = False

    def __init__(self, description: str | None = None, param: str | None = None) -> None:
        if description is not None:
            self.description = description
        if param is not None:
            self.param = param
        super().__init__(self.description)

    def get_headers(self) -> list[tuple[str, str]]:
        """Headers that the response to this error must carry."""
        return []


class InvalidRequest(PiAgentError):
    """The body is not JSON, or not sent as JSON, or asks for what cannot be done; fix the
    request before retrying."""

    code = 400
    error_code = "invalid_request"
    description = "the request body must be JSON sent with Content-Type: application/json"


class RequestTimeout(PiAgentError):
    """The body did not arrive within PI_AGENT_BODY_TIMEOUT (and its allowance for size);
    the connection is closed after this answer, since the rest of the body may still come."""

    code = 408
    error_code = "request_timeout"
    description = "the request body did not arrive in time"
    close_connection = True


class BadFraming(PiAgentError):
    """The request breaks HTTP/1.1's rules on how a message is framed; it could be read
    differently by a proxy in front, so the connection is not used for another request."""

    code = 400
    error_code = "bad_request"
    description = "the request is not valid HTTP/1.1"
    close_connection = True


class ValidationFailed(PiAgentError):
    """The JSON is well formed but a field is missing, of the wrong type or out of range."""

    code = 422
    error_code = "validation_error"
    description = "the request body failed validation"

    def __init__(self, fields: list[FieldProblem]) -> None:
        super().__init__(param=fields[0].field if fields else None)
        self.fields = fields

    def summary(self) -> str:
        """The description with the first problems, for APIs whose errors have no fields."""
        problems = "; ".join(f"{f.field}: {f.problem}" for f in self.fields[:3])
        return f"{self.description}: {problems}" if problems else self.description


class ContextTooLong(PiAgentError):
    """The messages cannot fit in the model's context, even with older ones left out;
    send less, or ask for a larger ``num_ctx`` (up to ``PI_AGENT_MAX_NUM_CTX``)."""

    code = 400
    error_code = "context_length_exceeded"

    def __init__(self, tokens: int, num_ctx: int, param: str) -> None:
        super().__init__(
            f"the messages need about {tokens} tokens, more than the model's context of "
            f"{num_ctx} (num_ctx) holds even with older messages left out", param=param)


class AgentNotFound(PiAgentError):
    """No agent preset has that name; ``GET /agents`` lists the ones there are."""

    code = 404
    error_code = "agent_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown agent {name!r}: GET /agents lists the agents")


class AgentNotRunnable(PiAgentError):
    """The agent uses what this API does not run (a router, on ``/v1``): its file is valid,
    but a turn with it cannot be answered here."""

    code = 501
    error_code = "not_implemented"

    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"agent {name!r} uses {what}, which this API does not run: "
                         "use POST /chat (see docs/agents.md)")


class Unauthenticated(PiAgentError):
    """No key, or not a valid one. Which of the two is not said: that would help a guesser."""

    code = 401
    error_code = "invalid_api_key"
    description = ("a valid API key is required: send it as X-API-Key: <key> or "
                   "Authorization: Bearer <key>")

    def get_headers(self) -> list[tuple[str, str]]:
        return [*super().get_headers(), ("WWW-Authenticate", "Bearer")]


class LocalOnly(PiAgentError):
    """The server has no API keys, so it serves its own machine only."""

    code = 403
    error_code = "local_only"
    description = ("this server has no API keys and serves its own machine only: create a key "
                   "(python -m pi_agent keys create) and set PI_AGENT_KEYS_FILE")


class NotAllowed(PiAgentError):
    """The key is valid but its scopes do not cover this agent, model or route."""

    code = 403
    error_code = "permission_denied"

    def __init__(self, what: str, param: str | None = None) -> None:
        super().__init__(f"this API key may not use {what}", param=param)


class TryLater(PiAgentError):
    """A 429: the request may succeed after ``retry_after`` seconds (the Retry-After header)."""

    code = 429

    def __init__(self, retry_after: int, description: str | None = None) -> None:
        super().__init__(description)
        self.retry_after = retry_after

    def get_headers(self) -> list[tuple[str, str]]:
        return [*super().get_headers(), ("Retry-After", str(self.retry_after))]


class RateLimited(TryLater):
    """The key used up its requests per minute or its completion tokens for the day."""

    error_code = "rate_limited"


class ConversationNotFound(PiAgentError):
    """No conversation of that id that this key may see."""

    code = 404
    error_code = "conversation_not_found"
    description = "no such conversation"


class UnknownModel(PiAgentError):
    """No installed model and no agent has that name (OpenAI's ``model_not_found``)."""

    code = 404
    error_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.",
                         param="model")


class ModelManagementRefused(PiAgentError):
    """Pulling, creating, copying, pushing or deleting models is not for a chat gateway."""

    code = 403
    error_code = "forbidden"
    description = (
        "model management is not available through Pi Agent Server: a chat gateway must not "
        "let its clients fill or wipe the disk. Run `ollama pull` (or rm, cp, create) on the "
        "machine itself"
    )


class TurnNotRunning(PiAgentError):
    """No turn of that conversation is queued or running, so none can be cancelled."""

    code = 404
    error_code = "turn_not_running"
    description = "no turn of this conversation is running"


class TurnCancelled(PiAgentError):
    """The turn was cancelled (``POST /chat/<id>/cancel``) before its reply started."""

    code = 409
    error_code = "cancelled"
    description = "the turn was cancelled"


class ServerShuttingDown(PiAgentError):
    """The server is shutting down and ended the turn; send it again in a moment."""

    code = 503
    error_code = "server_shutting_down"
    description = "the server is shutting down; send the turn again in a moment"


class ConversationBusy(PiAgentError):
    """The conversation has a turn queued or running; retry once that one has ended."""

    code = 409
    error_code = "conversation_busy"
    description = "this conversation has a turn in progress: wait for it to end"


class StoreUnavailable(PiAgentError):
    """The conversation store could not be read or written (a full disk, a file removed or
    damaged while the server runs); the server's log says why."""

    code = 503
    error_code = "store_unavailable"
    description = "the conversation store cannot be read or written: see the server's log"
    # A store that is down (a Redis restarting, a lock held by a backup) is back in seconds.
    retry_after = 5

    def get_headers(self) -> list[tuple[str, str]]:
        return [*super().get_headers(), ("Retry-After", str(self.retry_after))]


class QueueFull(TryLater):
    """Every generation slot is taken and the wait queue is full; retry after Retry-After."""

    error_code = "queue_full"
    description = "the server is busy: every generation slot is taken and the queue is full"


class ClientGone(PiAgentError):
    """The client closed its connection while its request waited; nobody reads the answer."""

    code = 499  # nginx's "client closed request", so that the access log says what happened
    error_code = "client_closed_request"
    description = "the client closed the connection"


class ProviderError(PiAgentError):
    """The model provider failed; the subclasses say how."""

    code = 502
    error_code = "upstream_error"
    description = "the model server answered with an error"


class UpstreamError(ProviderError):
    """The model server answered with an error status or an error line; retrying may help."""

    def __init__(self, description: str | None = None, upstream_status: int = 0,
                 upstream_text: str = "") -> None:
        super().__init__(description)
        # What the model server said, for the APIs that pass a refusal on as a 400.
        self.upstream_status = upstream_status
        self.upstream_text = upstream_text


class UpstreamProtocolError(ProviderError):
    """The model server's answer was broken: bad JSON, or a stream cut before its end."""

    error_code = "upstream_protocol_error"
    description = "the model server sent a broken or incomplete answer"


class ModelNotFound(ProviderError):
    """The model is not installed on the model server; pull it, then retry."""

    error_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is not installed in Ollama: run `ollama pull {model}`",
                         param="model")
        self.model = model


class ProviderUnavailable(ProviderError):
    """The model server cannot be reached; safe to retry once it runs."""

    code = 503
    error_code = "upstream_unavailable"
    description = "the model server is not reachable: is Ollama running?"


class ProviderTimeout(ProviderError):
    """The model server took longer than the configured timeout; safe to retry."""

    code = 504
    error_code = "upstream_timeout"
    description = "the model server did not answer in time"
