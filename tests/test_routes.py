"""``/health``, ``/agents`` and routes that do not exist."""
from __future__ import annotations

from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient

from pi_agent import __version__

from .conftest import unused_port


def test_health_never_calls_ollama(make_app: Callable[..., Flask]) -> None:
    response = make_app(OLLAMA_URL=f"http://127.0.0.1:{unused_port()}").test_client().get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "version": __version__}


def test_list_agents(client: FlaskClient) -> None:
    assert client.get("/agents").get_json() == {"agents": ["general", "coder"]}


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
