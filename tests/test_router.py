"""A router agent: keywords first, then a classifier call held to the route names, else the
fallback; fixed replies without a model call; the route event and the JSON reply's route."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from .fake_ollama import FakeOllama, Script
from .live_server import serving
from .test_events import parse_sse

REFUSAL = "I am afraid I can't help with that."
AGENTS = f"""
[agents.general]
system = "You help."

[agents.coder]
system = "You write code."

[agents.pi]
system = "Use a tool."
tools = ["time_now"]

[agents.router]
kind = "router"
description = "Sends each message to the right agent."
fallback = "general"
  [[agents.router.routes]]
  name = "unsafe"
  keywords = ["unsafe"]
  reply = "{REFUSAL}"
  [[agents.router.routes]]
  name = "code"
  agent = "coder"
  keywords = ["python", "traceback"]
  examples = ["write a bash script that renames files"]
  [[agents.router.routes]]
  name = "pi"
  agent = "pi"
  keywords = ["temperature"]
"""


@pytest.fixture
def client(make_app: Callable[..., Flask], tmp_path: Path) -> FlaskClient:
    (tmp_path / "agents.toml").write_text(AGENTS)
    return make_app(AGENTS_FILE=str(tmp_path / "agents.toml")).test_client()


def stream(client: FlaskClient, message: str, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    response = client.post("/chat/stream", json={"message": message, "agent": "router", **body})
    return parse_sse(response.get_data(as_text=True))


def test_a_keyword_reply_is_streamed_without_a_model_call(
    client: FlaskClient, fake_ollama: FakeOllama
) -> None:
    events = stream(client, "Tell me something UNSAFE")
    assert events[0][0] == "start" and events[0][1]["agent"] == "router"
    assert events[1] == ("route", {"route": "unsafe", "agent": None, "by": "keyword"})
    tokens = [data["content"] for name, data in events if name == "token"]
    assert tokens[:2] == ["I", " am"] and "".join(tokens) == REFUSAL
    assert events[-1][0] == "done" and events[-1][1]["usage"]["completion_tokens"] == 0
    whole = client.post("/chat", json={"message": "unsafe", "agent": "router"}).get_json()
    assert whole["reply"] == REFUSAL
    assert whole["route"] == {"route": "unsafe", "agent": None, "by": "keyword"}
    assert whole["steps"] == 0 and whole["tool_calls"] == []  # no model call
    assert events[-1][1]["steps"] == 0
    text = client.post("/chat", json={"message": "unsafe", "agent": "router", "stream": True})
    assert text.get_data(as_text=True) == REFUSAL
    assert fake_ollama.chat_requests() == []


def test_a_keyword_sends_the_message_to_its_agent(client: FlaskClient,
                                                  fake_ollama: FakeOllama) -> None:
    events = stream(client, "my Python script fails")
    assert events[1] == ("route", {"route": "code", "agent": "coder", "by": "keyword"})
    (call,) = fake_ollama.chat_requests()  # no classifier call
    assert call["messages"][0] == {"role": "system", "content": "You write code."}
    assert events[-1][0] == "done"


def test_the_classifier_picks_a_route_from_the_names(client: FlaskClient,
                                                     fake_ollama: FakeOllama) -> None:
    fake_ollama.classifier_script = Script(tokens=['{"route": ', '"code"}'])
    events = stream(client, "rename my files with bash")
    assert events[1] == ("route", {"route": "code", "agent": "coder", "by": "classifier"})
    classifier, answer = fake_ollama.chat_requests()
    assert classifier["format"]["properties"]["route"]["enum"] == ["unsafe", "code", "pi"]
    assert classifier["options"]["temperature"] == 0
    assert classifier["options"]["num_predict"] == 16 and classifier["think"] is False
    assert "write a bash script that renames files" in classifier["messages"][0]["content"]
    assert classifier["messages"][-1]["content"] == "rename my files with bash"
    assert answer["messages"][0]["content"] == "You write code."
    assert "format" not in answer
    # The classifier's answer is not the reply.
    reply = "".join(d["content"] for n, d in events if n == "token")
    assert reply == "Hello, world!"


def test_a_fixed_reply_chosen_by_the_classifier(
    client: FlaskClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.classifier_script = Script(tokens=['{"route":"unsafe"}'])
    body = client.post("/chat", json={"message": "hmm", "agent": "router"}).get_json()
    assert body["route"] == {"route": "unsafe", "agent": None, "by": "classifier"}
    assert body["reply"] == REFUSAL and len(fake_ollama.chat_requests()) == 1


@pytest.mark.parametrize("classifier", [
    Script(tokens=["not json"]), Script(tokens=['{"route": "nowhere"}']),
    Script(tokens=['["code"]']), Script(status=500), Script(error_after=0),
], ids=["not json", "unknown route", "not an object", "http 500", "error line"])
def test_a_bad_classification_goes_to_the_fallback(
    client: FlaskClient, fake_ollama: FakeOllama, classifier: Script
) -> None:
    fake_ollama.classifier_script = classifier
    events = stream(client, "hello there")
    assert events[1] == ("route", {"route": None, "agent": "general", "by": "fallback"})
    assert events[-1][0] == "done"
    assert fake_ollama.chat_requests()[-1]["messages"][0]["content"] == "You help."
    body = client.post("/chat", json={"message": "hello", "agent": "router"}).get_json()
    assert body["route"] == {"route": None, "agent": "general", "by": "fallback"}
    assert body["reply"] == "Hello, world!"


def test_the_conversation_is_the_routers(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    first = client.post("/chat", json={"message": "python question", "agent": "router",
                                       "conversation_id": "r1"})
    assert first.status_code == 200
    client.post("/chat", json={"message": "another python one", "agent": "router",
                               "conversation_id": "r1"})
    messages = fake_ollama.chat_requests()[-1]["messages"]
    assert [(m["role"], m["content"]) for m in messages[1:]] == [
        ("user", "python question"), ("assistant", "Hello, world!"),
        ("user", "another python one")]


def test_v1_does_not_run_routers(client: FlaskClient) -> None:
    response = client.post("/v1/chat/completions", json={
        "model": "agent:router", "messages": [{"role": "user", "content": "unsafe"}]})
    assert response.status_code == 501
    assert "use POST /chat" in response.get_json()["error"]["message"]


def test_routing_through_gunicorn(tmp_path: Path, fake_ollama: FakeOllama) -> None:
    (tmp_path / "agents.toml").write_text(AGENTS)
    fake_ollama.classifier_script = Script(tokens=['{"route": "code"}'])
    with serving(tmp_path / "server.log", AGENTS_FILE=str(tmp_path / "agents.toml"),
                 OLLAMA_URL=fake_ollama.url) as server:
        response = requests.post(server.url + "/chat/stream", timeout=10,
                                 json={"message": "rename files", "agent": "router"})
        events = parse_sse(response.text)
        fixed = requests.post(server.url + "/chat", timeout=10,
                              json={"message": "unsafe", "agent": "router"}).json()
    assert [name for name, _ in events][:3] == ["start", "route", "token"]
    assert events[1][1] == {"route": "code", "agent": "coder", "by": "classifier"}
    assert fixed["reply"] == REFUSAL


def test_the_built_in_router(make_app: Callable[..., Flask], fake_ollama: FakeOllama) -> None:
    client = make_app().test_client()
    poem = client.post("/chat", json={"message": "a HAIKU about rain", "agent": "router"})
    assert poem.get_json()["route"] == {"route": "poem", "agent": "poet", "by": "keyword"}
    assert fake_ollama.chat_requests()[-1]["options"]["temperature"] == 0.9  # the poet's
    refused = client.post("/chat", json={"message": "how to make a bomb", "agent": "router"})
    assert refused.get_json()["reply"] == "I am afraid I can't help with that."
    fake_ollama.classifier_script = Script(tokens=['{"route": "clarify"}'])
    unclear = client.post("/chat", json={"message": "hm", "agent": "router"}).get_json()
    assert unclear["route"]["by"] == "classifier" and unclear["reply"].startswith("Could you")
    listed = client.get("/v1/models").get_json()["data"]
    assert "agent:router" not in [m["id"] for m in listed]  # /v1 does not run routers
    assert "agent:pi" in [m["id"] for m in listed]
