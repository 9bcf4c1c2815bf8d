"""Whether each Ollama answers and has the configured model, and whether the store does,
asked at most once per ``ttl``; ``GET /ready`` shows it (web/native/health.py)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import ProviderError, ProviderUnavailable
from ..providers.base import Provider
from ..providers.ollama_replies import full_model_name


class ReadinessCheck:
    """Tell whether Ollama answers and has the configured model installed.

    The answer is kept for ``ttl`` seconds, so that a load balancer or a monitoring script
    that probes often does not turn into load on Ollama.
    """

    def __init__(
        self,
        provider: Provider,
        model: str,
        ollama_url: str,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.model = model
        self.ollama_url = ollama_url
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: tuple[float, str] | None = None  # (when, reason; "" when ready)

    def check(self) -> str:
        """Return "" when ready, otherwise the reason, in words a person can act on."""
        with self._lock:
            if self._answer is None or self._clock() - self._answer[0] >= self.ttl:
                reason = self._probe()
                # Stamped when the answer came: a probe that hung for its whole timeout
                # must not leave an answer that is stale already, or every request that
                # waited on the lock meanwhile would probe again.
                self._answer = (self._clock(), reason)
            return self._answer[1]

    def _probe(self) -> str:
        try:
            installed = [model.name for model in self.provider.list_models()]
        except ProviderUnavailable:
            return f"ollama not reachable at {self.ollama_url}: is it running?"
        except ProviderError as exc:
            return f"ollama at {self.ollama_url} answered /api/tags badly: {exc.description}"
        if full_model_name(self.model) not in {full_model_name(name) for name in installed}:
            return f"model {self.model} is not pulled: run `ollama pull {self.model}`"
        return ""


class Readiness:
    """What ``GET /ready`` tells: ready while at least one upstream answers and has the
    model; degraded while a store apart from the server (Redis) does not answer."""

    def __init__(self, checks: list[tuple[str, ReadinessCheck]],
                 store_trouble: Callable[[], str], ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.checks = checks  # (upstream name, its check)
        self._store_trouble = store_trouble
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._trouble: tuple[float, str] | None = None

    def check(self) -> tuple[str, list[tuple[str, str]]]:
        """The reason it is not ready ("" when it is), and each upstream's (name, reason)."""
        states = [(name, check.check()) for name, check in self.checks]
        if any(not reason for _, reason in states):
            return "", states
        if len(states) == 1:
            return states[0][1], states
        return "no upstream is ready: " + "; ".join(
            f"{name}: {reason}" for name, reason in states), states

    def check_store(self) -> str:
        """What is wrong with the store ("" when nothing is), asked at most once per ttl."""
        with self._lock:
            if self._trouble is None or self._clock() - self._trouble[0] >= self.ttl:
                trouble = self._store_trouble()
                self._trouble = (self._clock(), trouble)
            return self._trouble[1]
