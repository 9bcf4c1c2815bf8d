"""GET /openapi.json (OpenAPI 3.1, from the pydantic models the views use) and GET /docs
(Swagger UI from the package's own files): a valid document, every native route in it, the
event stream's events as a real stream sends them, public with a key file too."""
from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from pi_agent.web.native.schemas import EVENTS

from .fake_ollama import FakeOllama, Script
from .test_knowledge import folder  # noqa: F401 (a fixture: an agent with knowledge)
from .test_security import create_key
from .test_steps import asks, call

NATIVE = ("health", "agents", "chat", "conversations")


def test_the_document_is_valid_openapi_and_names_every_native_route(app: Flask) -> None:
    document = app.test_client().get("/openapi.json").get_json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    routes = {(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
              for rule in app.url_map.iter_rules()
              if rule.endpoint.split(".")[0] in NATIVE
              for method in rule.methods or () if method not in ("HEAD", "OPTIONS")}
    assert len(routes) == 10
    described = {(path, method) for path, item in document["paths"].items()
                 for method in item}
    assert routes == described
    schemas = document["components"]["schemas"]
    for name in ("ChatRequest", "ChatReply", "ErrorBody", "DoneEvent", "TokenEvent"):
        assert name in schemas
    # The request's bounds are the ones the view checks.
    assert schemas["ChatRequest"]["properties"]["message"]["minLength"] == 1
    reply = document["paths"]["/chat"]["post"]["responses"]
    assert set(reply["200"]["content"]) == {"application/json", "text/plain",
                                            "text/event-stream", "application/x-ndjson"}
    assert reply["409"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")


def _events(text: str) -> list[dict[str, Any]]:
    """The stream's events but its heartbeats (in the document as the ping event)."""
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [event for event in events if event["event"] != "ping"]


def _check(events: list[dict[str, Any]]) -> None:
    """Each event has exactly the fields of its model, and fits it."""
    for event in events:
        data = {key: value for key, value in event.items() if key != "event"}
        model = EVENTS[event["event"]]
        assert set(data) == set(model.model_fields), event
        model.model_validate(data)


def test_every_event_of_a_real_stream_fits_its_model(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama, folder: Path  # noqa: F811
) -> None:
    knowing = make_app(AGENTS_FILE=str(folder / "agents.toml"),
                       STATE_DIR=str(folder / "state")).test_client()
    client = make_app(STATE_DIR=str(folder / "built-in")).test_client()  # the built-in agents
    seen: set[str] = set()

    def stream(via: FlaskClient = client, **body: Any) -> None:
        response = via.post("/chat/stream", json={"message": "water tomatoes?", **body},
                            headers={"Accept": "application/x-ndjson"})
        assert response.status_code == 200, response.get_data(as_text=True)
        events = _events(response.get_data(as_text=True))
        seen.update(e["event"] for e in events)
        _check(events)

    stream(knowing, agent="docs")  # start, sources, token, done
    fake_ollama.classifier_script = Script(tokens=['{"route": "general"}'])
    stream(agent="router")  # route
    fake_ollama.classifier_script = None
    fake_ollama.steps.extend([asks(call("calculator", expression="6*7")), Script()])
    stream(agent="pi")  # tool_call, tool_result
    # queued: a second turn waits while the first one's model loads.
    fake_ollama.script = Script(first_token_delay=1.0)
    first = threading.Thread(target=lambda: client.post(
        "/chat/stream", json={"message": "first"}).get_data())
    first.start()
    try:
        time.sleep(0.3)
        stream(conversation_id="second")
    finally:
        first.join()
    fake_ollama.script = Script(status=500)
    stream()  # error
    assert seen == set(EVENTS)


def test_docs_are_served_from_the_package_and_public_with_keys(
    make_app: Callable[..., Flask], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.json"
    create_key(keys, capsys, "--name", "someone")
    client = make_app(KEYS_FILE=str(keys)).test_client()
    assert client.get("/agents").status_code == 401
    assert client.get("/openapi.json").status_code == 200
    page = client.get("/docs/")
    assert page.status_code == 200 and b"swagger-ui" in page.data
    html = page.get_data(as_text=True)
    # Every script and style comes from this server: nothing from another site.
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/docs/") for a in assets), assets
    for asset in assets:
        answer = client.get(asset)
        answer.close()  # a file's answer holds it open until then
        assert answer.status_code == 200, asset
    assert '"url": "/openapi.json"' in html
