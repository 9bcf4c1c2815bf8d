"""The one line a turn writes when it ends: who, which agent, route, model and upstream, how
it ended, how long it waited, took to its first token and took in all, and its tokens. The
turn's paths note what they learn as they go (the first token once, the rest at the end):
nothing is noted per token. With ``PI_AGENT_LOG_FORMAT=json`` the line is one JSON object
(logformat.py), its fields as they are here.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    ModelNotFound,
    PiAgentError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    UpstreamError,
    UpstreamProtocolError,
)
from ..metrics import Metrics
from ..providers.ollama_replies import full_model_name

logger = logging.getLogger("pi_agent.turns")

# How a turn stopped from outside ended, by the abort's reason.
STOPPED_OUTCOMES = {"cancelled": "cancelled", "client_gone": "disconnected",
                    "timeout": "timeout", "shutting_down": "shutting_down"}
# A turn that failed so timed out (the event stream's own deadlines).
TIMEOUT_ERRORS = {"upstream_timeout"}
# The model server's failures, by their codes (a kind each, for the metrics).
UPSTREAM_ERRORS = {kind.error_code for kind in (ProviderError, UpstreamError, ModelNotFound,
                                                UpstreamProtocolError, ProviderUnavailable,
                                                ProviderTimeout)}
# A relayed answer's error status, as ``relayed`` notes it.
RELAYED_STATUS = "upstream_status_"
# The outcomes of a turn that its client stopped: by a cancel, or by leaving.
CANCELLED = ("cancelled", "disconnected")
# A value in the text form is quoted when it holds what could pass for another field or line.
PLAIN = re.compile(r"[^\s=\"]{1,200}")


@dataclass
class TurnLog:
    """What is known of a turn so far; ``write`` logs it once."""

    request_id: str
    key_id: str
    started: float = field(default_factory=time.monotonic)
    first_token: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""  # the code of the error that ended it
    answer: str = ""
    ended: str = ""  # "done" once it has its whole answer; else how it was cut short
    written: bool = False

    def saw_first_token(self) -> None:
        """The model's first chunk came."""
        if not self.first_token:
            self.first_token = time.monotonic()

    def failed(self, exc: PiAgentError) -> None:
        """The turn ends with ``exc`` (the first one noted is the cause)."""
        self.error = self.error or exc.error_code

    def done(self, prompt_tokens: int = 0) -> None:
        """The turn has its whole answer."""
        self.ended = "done"
        self.prompt_tokens = prompt_tokens or self.prompt_tokens

    def relayed(self, status: int) -> None:
        """A relayed answer's status (the /api front): 200 is the whole answer relayed,
        anything else the model server's refusal."""
        if status != 200:
            self.error = self.error or f"{RELAYED_STATUS}{status}"
        elif not self.ended and not self.error:
            self.done()

    def cut_short(self, outcome: str) -> None:
        """How a turn cut short ended, as its relay saw it: "disconnected", "cancelled"."""
        self.ended = self.ended or outcome

    @contextmanager
    def noting_failure(self) -> Iterator[None]:
        """Note what ends the turn before its answer (a store that is down, a route that
        cannot answer), as the provider's failures are."""
        try:
            yield
        except PiAgentError as exc:
            self.failed(exc)
            raise

    def outcome(self, stopped: str) -> str:
        """How it ended; ``stopped``: the reason a stop from outside gave ("" if none)."""
        outcome = self.ended or STOPPED_OUTCOMES.get(stopped) or (
            "failed" if self.error else "ended")
        if outcome == "failed" and self.error in TIMEOUT_ERRORS:
            return "timeout"
        return outcome

    def first_token_seconds(self, admitted_at: float) -> float | None:
        """From the slot (``admitted_at``) to the first token; None if either never came."""
        return self.first_token - admitted_at if self.first_token and admitted_at else None

    @property
    def upstream_error(self) -> str:
        """The kind of the model server's failure that ended the turn; "" if none did. A
        relayed 4xx (the /api front) is the client's mistake (a model it named that is not
        there, a bad request), not the model server failing: any key could make many."""
        if self.error in UPSTREAM_ERRORS:
            return self.error
        if self.error.startswith(RELAYED_STATUS + "5"):
            return UpstreamError.error_code
        return ""

    def count(self, metrics: Metrics, outcome: str, admitted_at: float, agent: str,
              model: str, tool_calls: Sequence[tuple[str, bool]],
              route: tuple[str, str] | None) -> None:
        """The turn's metrics, counted once, at its end (nothing on the way is): its times
        and tokens, how a cancelled one was cut short, the failure that ended it, its tool
        calls (name, ok) and its route (route, by)."""
        metrics.turn_ended(agent, model_label(model), outcome,
                           self.first_token_seconds(admitted_at),
                           time.monotonic() - self.started, self.prompt_tokens,
                           self.completion_tokens)
        if outcome in CANCELLED:
            phase = ("queued" if not admitted_at else
                     "before_first_token" if not self.first_token else "streaming")
            metrics.cancelled(phase, outcome)
        if self.upstream_error:
            metrics.upstream_failed(self.upstream_error)
        if tool_calls:
            metrics.tools_called(tool_calls)
        if route is not None:
            metrics.routed(*route)

    def write(self, outcome: str, queued_at: float, admitted_at: float,
              fields: dict[str, Any], prompt: str | None) -> None:
        """Log the line (once). ``queued_at``/``admitted_at``: when the turn entered and got
        its slot (0: never); ``prompt``: the user's message, logged only when given (the
        owner's PI_AGENT_LOG_PROMPTS), with the answer."""
        if self.written:
            return
        self.written = True
        now = time.monotonic()
        first_token = self.first_token_seconds(admitted_at)
        line: dict[str, Any] = {
            "request_id": self.request_id, "key_id": self.key_id, **fields,
            "outcome": outcome, "error": self.error or None,
            "queue_ms": _ms((admitted_at or now) - queued_at),
            "first_token_ms": None if first_token is None else _ms(first_token),
            "total_ms": _ms(now - self.started),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
        }
        if prompt is not None:
            line["prompt"], line["reply"] = prompt, self.answer
        logger.info("turn %s", " ".join(f"{key}={_plain(value)}" for key, value in line.items()),
                    extra={"fields": line})


def model_label(model: str) -> str:
    """A model's name as the metrics label it: as Ollama matches it (without case, ":latest"
    when no tag, the default registry's prefix left out), so that a client cannot make a new
    series of one model by spelling it otherwise. Only a model that answered has tokens to
    count, so a made-up name adds none."""
    name = full_model_name(model) if model else ""
    for prefix in ("registry.ollama.ai/", "library/"):
        name = name.removeprefix(prefix)
    return name


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _plain(value: Any) -> str:
    """A value as the text form writes it: bare when it is plain, else quoted as JSON, so
    that a model's name or a prompt cannot forge a field or a line."""
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    if value is None or value == "":
        return "-"
    text = str(value)
    return text if PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=False)
