"""``/health``, ``/agents`` and routes that do not exist."""
from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from pi_agent import __version__
from pi_agent.providers.base import ModelInfo

from .conftest import unused_port
from .fake_ollama import FakeOllama


def test_health_never_calls_ollama(make_app: Callable[..., Flask]) -> None:
    response = make_app(OLLAMA_URL=f"http://127.0.0.1:{unused_port()}").test_client().get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "version": __version__}


def test_list_agents(client: FlaskClient) -> None:
    agents = ["general", "coder", "poet", "pi", "router"]
    assert client.get("/agents").get_json() == {"agents": agents}


def test_show_agent(client: FlaskClient) -> None:
    response = client.get("/agents/coder")
    assert response.status_code == 200
    body = response.get_json()
    assert body["name"] == "coder" and body["description"]
    assert body["model"] == "llama3.2:1b"
    assert body["options"] == {"temperature": 0.2, "num_ctx": 2048, "num_predict": 512}
    assert "system_prompt" not in body


def test_unknown_agent_is_404(client: FlaskClient) -> None:
    response = client.get("/agents/nobody")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "agent_not_found"


def test_unknown_path_is_json_404(client: FlaskClient) -> None:
    response = client.get("/nothing/here")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_wrong_method_on_health_is_405(client: FlaskClient) -> None:
    response = client.post("/health")
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"


def tags_requests(fake: FakeOllama) -> int:
    return sum(1 for r in fake.requests if r.get("_path") == "/api/tags")


def test_ready_when_the_model_is_installed(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "model": "llama3.2:1b"}


@pytest.mark.parametrize("model", ["LLAMA3.2:1b", "qwen3:0.6b"])
def test_ready_matches_names_as_ollama_does(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama, model: str
) -> None:
    assert make_app(MODEL=model).test_client().get("/ready").status_code == 200


def test_not_ready_when_the_model_is_not_pulled(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama
) -> None:
    response = make_app(MODEL="mistral").test_client().get("/ready")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "not_ready",
        "model": "mistral",
        "reason": "model mistral is not pulled: run `ollama pull mistral`",
    }


def test_not_ready_when_ollama_is_not_running(make_app: Callable[..., Flask]) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    response = make_app(OLLAMA_URL=url).test_client().get("/ready")
    assert response.status_code == 503
    assert response.get_json()["reason"] == f"ollama not reachable at {url}: is it running?"


def test_not_ready_when_ollama_answers_badly(
    client: FlaskClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.tags_status = 500
    response = client.get("/ready")
    assert response.status_code == 503
    assert "answered /api/tags badly" in response.get_json()["reason"]


def test_ready_answer_is_cached(make_app: Callable[..., Flask], fake_ollama: FakeOllama) -> None:
    client = make_app(READY_CACHE_SECONDS=60).test_client()
    assert [client.get("/ready").status_code for _ in range(3)] == [200, 200, 200]
    assert tags_requests(fake_ollama) == 1


def test_ready_asks_again_once_the_cache_is_old(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama
) -> None:
    client = make_app(READY_CACHE_SECONDS=0).test_client()
    assert client.get("/ready").status_code == 200
    fake_ollama.models.discard("llama3.2:1b")
    assert client.get("/ready").status_code == 503
    assert tags_requests(fake_ollama) == 2


class HangingProvider:
    """A provider whose /api/tags takes ``seconds`` of the fake clock, counting its calls."""

    def __init__(self, clock: list[float], seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self.calls = 0

    def list_models(self) -> list[ModelInfo]:
        self.calls += 1
        self.clock[0] += self.seconds
        return [ModelInfo("llama3.2:1b")]


def test_a_slow_probe_still_caches_its_answer() -> None:
    from pi_agent.core.readiness import ReadinessCheck

    clock = [100.0]
    provider = HangingProvider(clock, seconds=10)  # longer than the cache lifetime
    check = ReadinessCheck(provider, "llama3.2:1b", "http://x", ttl=5,  # type: ignore[arg-type]
                           clock=lambda: clock[0])
    assert check.check() == "" and check.check() == ""
    assert provider.calls == 1
    clock[0] += 5
    assert check.check() == "" and provider.calls == 2
