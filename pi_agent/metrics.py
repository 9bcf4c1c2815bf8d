"""The server's metrics, for ``GET /metrics`` in Prometheus' text format (prometheus-client).

``create_app`` builds one ``Metrics`` and hands it to what counts: the web layer (requests),
the turns (each turn once, at its end), admission (turns running and waiting, when they
change), failover (an upstream left for another) and the knowledge library (each search).
Nothing is counted per token.

With several gunicorn workers (``PI_AGENT_WORKERS``), gunicorn.conf.py gives the workers a
folder of their own in ``PROMETHEUS_MULTIPROC_DIR`` (see metrics_folder.py): the library
then keeps each worker's values in files there, and a scrape, whichever worker answers it,
reads them all.
"""
from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST
# A first token on a Pi: under a second with the model loaded, minutes for a cold load.
FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TURN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# A search of an agent's documents: a millisecond or so (knowledge.py).
SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The metrics of one server (one process, or each worker of several)."""

    def __init__(self, multiprocess_dir: str = "") -> None:
        """``multiprocess_dir``: the workers' shared folder (PROMETHEUS_MULTIPROC_DIR), ""
        for one process. A registry of its own: several apps in one process (the tests)
        do not collide."""
        self._folder = multiprocess_dir
        self._registry = registry = CollectorRegistry()
        self.requests = Counter(
            "pi_agent_requests", "HTTP requests, by route (the URL rule) and status",
            ("route", "status"), registry=registry)
        self.first_token = Histogram(
            "pi_agent_first_token_seconds",
            "Time from a turn's generation slot to its first token, by agent",
            ("agent",), buckets=FIRST_TOKEN_BUCKETS, registry=registry)
        self.turn = Histogram(
            "pi_agent_turn_seconds", "A turn's whole time, queue included, by agent",
            ("agent",), buckets=TURN_BUCKETS, registry=registry)
        self.turns = Counter(
            "pi_agent_turns", "Turns ended, by agent and outcome", ("agent", "outcome"),
            registry=registry)
        self.prompt_tokens = Counter(
            "pi_agent_prompt_tokens", "Prompt tokens, by agent and model", ("agent", "model"),
            registry=registry)
        self.completion_tokens = Counter(
            "pi_agent_completion_tokens", "Completion tokens, by agent and model",
            ("agent", "model"), registry=registry)
        # livesum: the workers' own counts added up, of the workers alive.
        self.running = Gauge(
            "pi_agent_turns_running", "Turns holding a generation slot",
            registry=registry, multiprocess_mode="livesum")
        self.waiting = Gauge(
            "pi_agent_turns_waiting", "Turns waiting in the queue for a generation slot",
            registry=registry, multiprocess_mode="livesum")
        self.cancellations = Counter(
            "pi_agent_cancellations",
            "Turns cancelled or left by their client, by phase (queued, before_first_token, "
            "streaming) and how (cancelled, disconnected)", ("phase", "how"),
            registry=registry)
        self.upstream_errors = Counter(
            "pi_agent_upstream_errors",
            "Model server failures, by kind (the error code), also those failed over",
            ("kind",), registry=registry)
        self.tool_calls = Counter(
            "pi_agent_tool_calls", "Tool calls run by the gateway, by tool and outcome",
            ("tool", "outcome"), registry=registry)
        self.router_decisions = Counter(
            "pi_agent_router_decisions", "Router decisions, by route and how it was taken",
            ("route", "by"), registry=registry)
        self.knowledge_search = Histogram(
            "pi_agent_knowledge_search_seconds", "Searches of an agent's documents, by agent",
            ("agent",), buckets=SEARCH_BUCKETS, registry=registry)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def turns_now(self, running: int, waiting: int) -> None:
        """This process's turns holding a slot and waiting for one, as they are now."""
        self.running.set(running)
        self.waiting.set(waiting)

    def turn_ended(self, agent: str, model: str, outcome: str, first_token: float | None,
                   total: float, prompt_tokens: int, completion_tokens: int) -> None:
        """One turn's figures, once, at its end; ``first_token`` in seconds, None if none
        came. Tokens are counted under a model that answered them only: a model name that
        a client made up adds no series."""
        agent = agent or "none"
        self.turns.labels(agent, outcome).inc()
        self.turn.labels(agent).observe(total)
        if first_token is not None:
            self.first_token.labels(agent).observe(first_token)
        if prompt_tokens:
            self.prompt_tokens.labels(agent, model).inc(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.labels(agent, model).inc(completion_tokens)

    def cancelled(self, phase: str, how: str) -> None:
        self.cancellations.labels(phase, how).inc()

    def upstream_failed(self, kind: str) -> None:
        self.upstream_errors.labels(kind).inc()

    def tools_called(self, calls: Sequence[tuple[str, bool]]) -> None:
        for tool, ok in calls:
            self.tool_calls.labels(tool, "ok" if ok else "error").inc()

    def routed(self, route: str, by: str) -> None:
        self.router_decisions.labels(route, by).inc()

    def searched(self, agent: str, seconds: float) -> None:
        self.knowledge_search.labels(agent).observe(seconds)

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format: this process's, or all the workers'."""
        if not self._folder:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        # It registers itself; prometheus-client leaves its __init__ unannotated.
        MultiProcessCollector(registry, path=self._folder)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
