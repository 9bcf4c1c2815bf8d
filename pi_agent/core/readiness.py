"""Whether Ollama answers and has the configured model, asked at most once per ``ttl``;
``GET /ready`` shows it (web/native/health.py)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import ProviderError, ProviderUnavailable
from ..providers.base import Provider


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


def full_model_name(model: str) -> str:
    """A model name as Ollama matches it: without case, and "llama3.2" is "llama3.2:latest"."""
    name = model.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
