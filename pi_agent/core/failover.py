"""A turn's calls to the model server, with failover before the first chunk.

A turn's calls go to the upstream whose slot it holds (admission.py). A call that fails
before its first chunk comes (a refused connection, a 5xx, a dropped or garbled answer, no
first token within the first-token timeout, the model missing there) moves the turn's slot
to the next upstream that may take it, each upstream at most once, and leaves the failing
one out for a cooldown (providers/pool.py). Once a chunk came, a failure ends the turn as
with one upstream: what the client was shown cannot be taken back.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, TypeVar

from ..errors import (
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    UpstreamError,
    UpstreamProtocolError,
)
from ..metrics import Metrics
from ..providers.base import Abort, ChatCall, ChatStream, Forwarded, ModelInfo, Provider
from ..providers.pool import UpstreamPool
from .admission import Admission, Ticket

logger = logging.getLogger(__name__)

T = TypeVar("T")


def moves_on(exc: ProviderError) -> bool:
    """Whether a call that failed so, before its first chunk, is tried elsewhere."""
    if isinstance(exc, _Refused):
        return True
    if isinstance(exc, UpstreamError):
        # 0: Ollama's error line in place of the first chunk (its runner died).
        return exc.upstream_status >= 500 or exc.upstream_status == 0
    return isinstance(exc, (ProviderUnavailable, ProviderTimeout, UpstreamProtocolError,
                            ModelNotFound))


class Failover:
    """The model server as one turn sees it: a ``Provider`` for its calls."""

    name = "ollama"

    def __init__(self, pool: UpstreamPool, admission: Admission, ticket: Ticket,
                 conversation_id: str, model: Callable[[], str],
                 metrics: Metrics | None = None) -> None:
        """``conversation_id``: the remembered conversation whose next turn is to go where
        this one went; "" for a turn that keeps none. ``metrics``: told each failure that
        moves the turn on (the turn counts the failure it ends with)."""
        self._pool = pool
        self._admission = admission
        self._ticket = ticket
        self._conversation_id = conversation_id
        self._model = model  # the turn's, for a call that names none (a relayed one)
        self._metrics = metrics

    @property
    def tries(self) -> int:
        """How many upstreams a call may try: its first-token wait is that many times the
        first-token timeout, at most."""
        return len(self._pool.upstreams)

    def stream_chat(self, call: ChatCall, abort: Abort | None = None) -> ChatStream:
        return self._attempt(lambda provider: provider.stream_chat(call, abort), call.model,
                             abort)

    def forward(
        self, method: str, path: str, body: bytes | None = None, *,
        wait: Literal["quick", "stream", "whole"] = "quick", abort: Abort | None = None,
    ) -> Forwarded:
        def send(provider: Provider) -> Forwarded:
            answer = provider.forward(method, path, body, wait=wait, abort=abort)
            if self._pool.several and (answer.status >= 500 or answer.status == 404):
                raise _Refused(answer, self._model())  # the next upstream may answer
            return answer

        try:
            return self._attempt(send, self._model(), abort)
        except _Refused as exc:
            return exc.answer  # the last upstream's own error, as it came

    def list_models(self) -> list[ModelInfo]:
        return self._pool.list_models()

    def close(self) -> None:
        pass  # the pool's connections are the app's

    def _attempt(self, start: Callable[[Provider], T], model: str, abort: Abort | None) -> T:
        tried: list[str] = []
        while True:
            name = self._ticket.upstream
            try:
                result = start(self._pool.provider(name))
            except ProviderError as exc:
                stopped = abort is not None and abort.requested
                if stopped or not self._pool.several or not moves_on(exc):
                    raise
                cause = exc.cause if isinstance(exc, _Refused) else exc
                self._pool.failed(name, cause)
                tried.append(name)
                if not self._admission.move(self._ticket, tried):
                    raise
                if self._metrics is not None:
                    self._metrics.upstream_failed(cause.error_code)
                if isinstance(exc, _Refused):
                    exc.answer.close()
                logger.warning("upstream %s failed before the first token (%s): the turn "
                               "moves to %s", name, type(exc).__name__, self._ticket.upstream)
                continue
            if getattr(result, "status", 200) < 400:  # a relayed refusal served nothing
                self._pool.served(name, model, self._conversation_id)
            return result


class _Refused(UpstreamError):
    """A relayed request that an upstream answered with an error another one may not give
    (a 5xx, or 404 for a model it lacks); ``answer`` is still unread, for the client if no
    other upstream takes the request."""

    def __init__(self, answer: Forwarded, model: str) -> None:
        super().__init__(f"the model server answered with an error (HTTP {answer.status})",
                         answer.status)
        self.answer = answer
        # What the pool is told: a model it lacks is not a reason for a cooldown.
        self.cause: ProviderError = ModelNotFound(model) if answer.status == 404 else self
