"""The log: with PI_AGENT_LOG_FORMAT=json every line is one JSON object (the app's and
gunicorn's own), and every turn writes one line when it ends, with its times and tokens;
its prompt and reply only with PI_AGENT_LOG_PROMPTS=true."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from .fake_ollama import FakeOllama, Script
from .live_server import RawStream, serving


def _lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _turns(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "pi_agent.turns"]


def test_every_line_is_json_and_each_turn_writes_one_line(
    fake: FakeOllama, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with serving(log, OLLAMA_URL=fake.url, LOG_FORMAT="json") as server:
        reply = requests.post(server.url + "/chat", json={"message": "secret question"},
                              headers={"X-Request-ID": "req-one"}, timeout=10)
        assert reply.status_code == 200
        streamed = requests.post(server.url + "/chat/stream", json={
            "message": "again", "conversation_id": reply.json()["conversation_id"]},
            timeout=10)
        assert b"event: done" in streamed.content
        fake.script = Script(tokens=[f"tok{i} " for i in range(50)], token_delay=0.1)
        left = RawStream(server, message="leaving")
        left.read_until(b"tok1 ")
        left.close()
        assert fake.client_closed.wait(5)
        fake.script = Script(status=500)
        assert requests.post(server.url + "/chat", json={"message": "fails"},
                             timeout=10).status_code == 502
    lines = _lines(log)  # each parses: none is plain text
    assert {line["logger"] for line in lines} >= {"gunicorn.error", "gunicorn.access",
                                                  "pi_agent.turns"}
    first, second, gone, failed = _turns(lines)
    assert first["request_id"] == "req-one" and first["key_id"] == "local"
    assert (first["outcome"], first["agent"], first["model"], first["route"]) == (
        "done", "general", "llama3.2:1b", None)
    assert first["upstream"] == fake.url.removeprefix("http://")
    assert (first["prompt_tokens"], first["completion_tokens"]) == (12, 4)
    assert first["queue_ms"] >= 0 and first["first_token_ms"] >= 0
    assert first["total_ms"] >= first["first_token_ms"] and first["tool_calls"] == []
    assert second["outcome"] == "done" and second["completion_tokens"] == 4
    assert gone["outcome"] == "disconnected" and 2 <= gone["completion_tokens"] < 50
    assert failed["outcome"] == "failed" and failed["error"] == "upstream_error"
    assert failed["first_token_ms"] is None
    # Neither prompts nor replies without PI_AGENT_LOG_PROMPTS.
    assert "secret question" not in log.read_text()
    assert all("prompt" not in turn and "reply" not in turn for turn in _turns(lines))


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_prompts_and_replies_are_logged_only_when_asked(
    fake: FakeOllama, tmp_path: Path, log_format: str
) -> None:
    log = tmp_path / "server.log"
    with serving(log, OLLAMA_URL=fake.url, LOG_FORMAT=log_format,
                 LOG_PROMPTS="true") as server:
        assert requests.post(server.url + "/chat", json={"message": "what is a Pi?"},
                             timeout=10).status_code == 200
    if log_format == "json":
        (turn,) = _turns(_lines(log))
        assert (turn["prompt"], turn["reply"]) == ("what is a Pi?", "Hello, world!")
    else:
        (turn,) = [line for line in log.read_text().splitlines() if "pi_agent.turns" in line]
        assert "outcome=done" in turn and "completion_tokens=4" in turn
        assert 'prompt="what is a Pi?" reply="Hello, world!"' in turn


def test_a_value_cannot_forge_a_field_or_a_line_and_relays_say_how_they_ended(
    fake: FakeOllama, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with serving(log, OLLAMA_URL=fake.url) as server:
        refused = requests.post(server.url + "/api/chat", timeout=10, json={
            "model": "nope x\nforged=1", "stream": False,
            "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 404  # Ollama's own answer, relayed
        relayed = requests.post(server.url + "/api/chat", timeout=10, json={
            "model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]})
        assert relayed.status_code == 200
    turns = [line for line in log.read_text().splitlines() if "pi_agent.turns" in line]
    assert not any(line.startswith("forged=") for line in log.read_text().splitlines())
    first, second = turns
    assert 'model="nope x\\nforged=1"' in first and "outcome=failed" in first
    assert "error=upstream_status_404" in first
    assert "outcome=done" in second and "completion_tokens=4" in second
    assert "prompt_tokens=12" in second and "first_token_ms=-" not in second


def test_a_whole_api_reply_logs_its_first_token_and_prompt(
    fake: FakeOllama, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    fake.script = Script(first_token_delay=0.3)
    with serving(log, OLLAMA_URL=fake.url, LOG_FORMAT="json") as server:
        for path, body in (("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/api/generate", {"prompt": "hi"})):
            whole = requests.post(server.url + path, timeout=10, json={
                "model": "llama3.2:1b", "stream": False, **body})
            assert whole.status_code == 200, whole.text
    turns = _turns(_lines(log))
    assert [turn["model"] for turn in turns] == ["llama3.2:1b"] * 2
    for turn in turns:
        assert turn["outcome"] == "done"
        assert (turn["prompt_tokens"], turn["completion_tokens"]) == (12, 4)
        assert 300 <= turn["first_token_ms"] <= turn["total_ms"]
