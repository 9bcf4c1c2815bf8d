"""Agents with tools, run by the gateway through gunicorn: calls one by one and several at
once, calls written as JSON text, unknown tools, tools that fail or take too long, repeated
calls, the step cap, a model that fails mid-loop, cancel, disconnect and shutdown while a
tool runs, the events, the JSON reply, memory, quotas, /v1 and a router's route."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, RawStream, serving
from .test_events import parse_sse

AGENTS = """
[defaults]
max_steps = 3
tool_timeout = {timeout}

[agents.pi]
description = "Has tools."
system = "Use a tool when you need one."
tools = ["time_now", "calculator", "pi_stats", "tests.agent_tools:add",
         "tests.agent_tools:slow", "tests.agent_tools:counter", "tests.agent_tools:fails",
         "tests.agent_tools:repeat"]

[agents.plain]
system = "No tools."

[agents.router]
kind = "router"
fallback = "plain"
  [[agents.router.routes]]
  name = "pi"
  agent = "pi"
  keywords = ["sum"]
  [[agents.router.routes]]
  name = "chat"
  agent = "plain"
"""


def call(name: str, call_id: str | None = None, **arguments: Any) -> dict[str, Any]:
    """A tool call as Ollama writes it (Ollama before 0.12 writes no id)."""
    made: dict[str, Any] = {"function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        made["id"] = call_id
    return made


def asks(*calls: dict[str, Any]) -> Script:
    return Script(tokens=[], tool_calls=list(calls))


ANSWER = Script(tokens=["The answer", " is 42."])


def start_server(folder: Path, upstream: FakeOllama, timeout: float = 30,
                 **settings: str) -> Any:
    (folder / "agents.toml").write_text(AGENTS.format(timeout=timeout))
    return serving(folder / "server.log", "--graceful-timeout", "3",
                   AGENTS_FILE=str(folder / "agents.toml"), OLLAMA_URL=upstream.url,
                   STATE_DIR=str(folder / "state"), HEARTBEAT_SECONDS="0.5", **settings)


@pytest.fixture(scope="module")
def server(upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with start_server(tmp_path_factory.mktemp("steps"), upstream) as server:
        yield server


def events(server: Gunicorn, message: str = "what is 6 * 7?", agent: str = "pi",
           **body: Any) -> list[tuple[str, dict[str, Any]]]:
    response = requests.post(server.url + "/chat/stream", timeout=30,
                             json={"message": message, "agent": agent, **body})
    assert response.status_code == 200, response.text
    return [event for event in parse_sse(response.text) if event[0] != "ping"]


def names(seen: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in seen]


def text(seen: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(data["content"] for name, data in seen if name == "token")


def test_one_call_then_the_answer(server: Gunicorn, fake: FakeOllama) -> None:
    fake.steps.extend([asks(call("calculator", "call_x1", expression="6 * 7")), ANSWER])
    seen = events(server, conversation_id="tools-one")
    assert names(seen) == ["start", "tool_call", "tool_result", "token", "token", "done"]
    assert seen[1][1] == {"id": "call_x1", "name": "calculator",
                          "arguments": {"expression": "6 * 7"}}
    result = seen[2][1]
    assert (result["id"], result["name"], result["ok"], result["content"]) == (
        "call_x1", "calculator", True, "42")
    assert isinstance(result["ms"], int) and result["ms"] >= 0
    done = seen[-1][1]
    assert done["steps"] == 2
    assert done["tool_calls"] == [{**seen[1][1], **result}]
    # Both calls count: 12 prompt tokens each, as the fake says.
    assert done["usage"]["prompt_tokens"] == 24
    first, second = fake.chat_requests()
    assert [tool["function"]["name"] for tool in first["tools"]] == [
        "time_now", "calculator", "pi_stats", "add", "slow", "counter", "fails", "repeat"]
    assert first["think"] is False and second["tools"] == first["tools"]
    assert second["messages"][2:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_x1", "function": {"name": "calculator",
                                           "arguments": {"expression": "6 * 7"}}}]},
        {"role": "tool", "tool_name": "calculator", "content": "42"}]
    # Memory keeps the user's message and the final answer, not the steps.
    remembered = requests.get(server.url + "/conversations/tools-one", timeout=10).json()
    assert [(t["user"], t["assistant"]) for t in remembered["turns"]] == [
        ("what is 6 * 7?", "The answer is 42.")]


def test_several_calls_run_in_order_with_ids_unique_in_the_turn(
    server: Gunicorn, fake: FakeOllama
) -> None:
    fake.steps.extend([
        asks(call("add", "same", a=1, b=2), call("add", "same", a=3, b=4), call("time_now")),
        asks(call("add", "same", a=5, b=6)),
        ANSWER])
    seen = events(server)
    calls = [data for name, data in seen if name == "tool_call"]
    results = [data for name, data in seen if name == "tool_result"]
    assert [c["name"] for c in calls] == ["add", "add", "time_now", "add"]
    ids = [c["id"] for c in calls]
    assert ids[0] == "same" and len(set(ids)) == 4  # Ollama's own id, then ones made here
    assert [r["id"] for r in results] == ids
    assert [r["content"] for r in results[:2]] == ["3", "7"] and results[3]["content"] == "11"
    assert results[2]["ok"] and results[2]["content"][:2] == "20"  # an ISO 8601 time
    told = fake.chat_requests()[1]["messages"][3:]
    assert [(m["tool_name"], m["content"]) for m in told] == [
        ("add", "3"), ("add", "7"), ("time_now", results[2]["content"])]
    assert seen[-1][1]["steps"] == 3 and len(seen[-1][1]["tool_calls"]) == 4


@pytest.mark.parametrize("written", [
    ["```json\n", '{"name": "add", ', '"arguments": {"a": 2, "b": 3}}', "\n```"],
    ['{"name": "add", "parameters": {"a": 2, "b": 3}}'],
    ["  ", "`", "``\n{", '"name": "add", "arguments": {"a": 2, "b": 3}}\n', "```"],
], ids=["fenced", "bare, parameters", "fence in pieces"])
def test_a_call_written_as_json_text_is_run_and_never_shown(
    server: Gunicorn, fake: FakeOllama, written: list[str]
) -> None:
    fake.steps.extend([Script(tokens=written), ANSWER])
    seen = events(server)
    assert names(seen) == ["start", "tool_call", "tool_result", "token", "token", "done"]
    assert seen[1][1]["arguments"] == {"a": 2, "b": 3} and seen[2][1]["content"] == "5"
    assert text(seen) == "The answer is 42."
    fake.steps.extend([Script(tokens=written), ANSWER])
    plain = requests.post(server.url + "/chat", timeout=30,
                          json={"message": "2 + 3?", "agent": "pi", "stream": True})
    assert plain.text == "The answer is 42."


def test_json_that_is_no_call_is_the_answer(server: Gunicorn, fake: FakeOllama) -> None:
    # Held back while it could be a call; once the step ends, it is the answer.
    fake.steps.append(Script(tokens=['{"name": "nobody", ', '"arguments": {}}']))
    seen = events(server)
    assert names(seen) == ["start", "token", "done"]
    assert text(seen) == '{"name": "nobody", "arguments": {}}'
    assert seen[-1][1]["steps"] == 1 and seen[-1][1]["tool_calls"] == []
    # Text that is clearly no call streams at once, also if a fence follows.
    fake.steps.append(Script(tokens=["Sure:", " ```python\n", "print(1)\n```"]))
    seen = events(server)
    tokens = [d["content"] for n, d in seen if n == "token"]
    assert tokens == ["Sure:", " ```python\n", "print(1)\n```"]
    fake.steps.append(Script(tokens=["```", "python\n", "print(1)\n```"]))
    seen = events(server)
    assert [d["content"] for n, d in seen if n == "token"] == ["```python\n", "print(1)\n```"]


@pytest.mark.parametrize("written", ['{"name": ["add"]}', '{"name": {"a": 1}}',
                                     '{"name": "add", "arguments": [1, 2]}', "{not json"])
def test_json_text_of_any_shape_is_an_answer_not_a_failure(
    server: Gunicorn, fake: FakeOllama, written: str
) -> None:
    for path, body in (("/chat/stream", {}), ("/chat", {"stream": True}), ("/chat", {})):
        fake.steps.append(Script(tokens=[written[:3], written[3:]]))
        response = requests.post(server.url + path, timeout=30,
                                 json={"message": "x", "agent": "pi", **body})
        assert response.status_code == 200, (path, body, response.text)
        if path == "/chat/stream":
            assert text(parse_sse(response.text)) == written
        elif body:
            assert response.text == written
        else:
            assert response.json()["reply"] == written


def test_text_before_a_tool_call_is_shown_but_is_not_the_answer(
    server: Gunicorn, fake: FakeOllama
) -> None:
    fake.steps.extend([Script(tokens=["Let me", " compute."],
                              tool_calls=[call("add", a=40, b=2)]), ANSWER])
    seen = events(server, conversation_id="tools-said")
    assert names(seen) == ["start", "token", "token", "tool_call", "tool_result", "token",
                           "token", "done"]
    assert text(seen) == "Let me compute.The answer is 42."
    remembered = requests.get(server.url + "/conversations/tools-said", timeout=10).json()
    assert remembered["turns"][0]["assistant"] == "The answer is 42."
    fake.steps.extend([Script(tokens=["Let me", " compute."],
                              tool_calls=[call("add", a=40, b=2)]), ANSWER])
    body = requests.post(server.url + "/chat", json={"message": "x", "agent": "pi"},
                         timeout=30).json()
    assert body["reply"] == "The answer is 42."
    # The model is told what it said before its call.
    assert fake.chat_requests()[-1]["messages"][2]["content"] == "Let me compute."


@pytest.mark.parametrize("asked, expected", [
    (call("nope"), "error: unknown tool 'nope'"),
    (call("fails", reason="disk on fire"), "error: RuntimeError: disk on fire"),
    (call("add", a="many"), "error: bad arguments: a: Input should be a valid integer"),
    (call("calculator", expression="__import__('os')"), "error: "),
    (call("calculator", expression="9 ** 9 ** 9"), "error: "),
], ids=["unknown", "raises", "bad arguments", "not arithmetic", "too big"])
def test_a_tool_that_fails_is_the_models_to_read(
    server: Gunicorn, fake: FakeOllama, asked: dict[str, Any], expected: str
) -> None:
    fake.steps.extend([asks(asked), ANSWER])
    seen = events(server)
    result = next(data for name, data in seen if name == "tool_result")
    assert not result["ok"] and result["content"].startswith(expected), result
    assert seen[-1][0] == "done" and text(seen) == "The answer is 42."
    told = fake.chat_requests()[1]["messages"][-1]
    assert told["role"] == "tool" and told["content"].startswith(expected)


def test_a_repeated_call_runs_once_and_the_cap_ends_the_loop(
    server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = asks(call("counter"))  # every call asks again, for ever
    seen = events(server)
    results = [data for name, data in seen if name == "tool_result"]
    # max_steps = 3: two calls run (the second from the first's answer), the third call's
    # request is not run, and a fourth call without tools answers.
    assert len(results) == 2 and results[0]["content"] == results[1]["content"]
    assert seen[-1][0] == "done" and seen[-1][1]["steps"] == 4
    assert [c["content"] for c in seen[-1][1]["tool_calls"]] == [results[0]["content"]] * 2
    sent = fake.chat_requests()
    assert ["tools" in request for request in sent] == [True, True, True, False]
    assert len(sent[3]["messages"]) == len(sent[2]["messages"])  # the unrun call is not told
    fake.script = asks(call("counter"))
    body = requests.post(server.url + "/chat", json={"message": "count", "agent": "pi"},
                         timeout=30).json()
    assert body["steps"] == 4 and len(body["tool_calls"]) == 2
    # Another turn runs the tool again: a repeat is answered from the same turn only.
    assert body["tool_calls"][0]["content"] == str(int(results[0]["content"]) + 1)


def test_the_json_reply_lists_the_calls(server: Gunicorn, fake: FakeOllama) -> None:
    fake.steps.extend([asks(call("add", "c1", a=40, b=2)), ANSWER])
    body = requests.post(server.url + "/chat", json={"message": "sum?", "agent": "pi"},
                         timeout=30).json()
    assert body["reply"] == "The answer is 42." and body["steps"] == 2
    assert body["route"] is None and body["sources"] == []
    [made] = body["tool_calls"]
    assert {k: made[k] for k in ("id", "name", "arguments", "ok", "content")} == {
        "id": "c1", "name": "add", "arguments": {"a": 40, "b": 2}, "ok": True, "content": "42"}
    plain = requests.post(server.url + "/chat", json={"message": "hi", "agent": "plain"},
                          timeout=30).json()
    assert plain["tool_calls"] == [] and plain["steps"] == 1


def test_a_tool_result_is_cut_for_the_model_and_for_the_client(
    server: Gunicorn, fake: FakeOllama
) -> None:
    fake.steps.extend([asks(call("repeat", text="0123456789", times=500)),
                       asks(call("pi_stats")), ANSWER])
    seen = events(server)
    long, stats = [data for name, data in seen if name == "tool_result"]
    assert long["content"] == "0123456789" * 50  # 500 characters for the client
    told = fake.chat_requests()[1]["messages"][-1]["content"]
    assert told == "0123456789" * 200  # 2,000 for the model
    assert stats["ok"] and "uptime" in stats["content"]


def test_the_model_failing_mid_loop_ends_the_turn(server: Gunicorn, fake: FakeOllama) -> None:
    fake.steps.extend([asks(call("add", a=1, b=1)), Script(tokens=["a", "b"], error_after=1)])
    seen = events(server, conversation_id="tools-fail")
    assert names(seen) == ["start", "tool_call", "tool_result", "token", "error"]
    assert seen[-1][1]["code"] == "upstream_error"
    fake.steps.extend([asks(call("add", a=1, b=1)), Script(status=500)])
    whole = requests.post(server.url + "/chat", json={"message": "x", "agent": "pi"}, timeout=30)
    assert whole.status_code == 502 and whole.json()["error"]["code"] == "upstream_error"
    remembered = requests.get(server.url + "/conversations/tools-fail", timeout=10)
    assert remembered.status_code == 404  # a failed turn leaves no answer in memory


def test_cancel_while_a_tool_runs(server: Gunicorn, fake: FakeOllama) -> None:
    fake.steps.extend([asks(call("slow", seconds=20)), ANSWER])
    stream = RawStream(server, message="slow?", agent="pi", conversation_id="tool-cancel")
    try:
        stream.read_until(b"event: tool_call")
        asked = time.monotonic()
        response = requests.post(server.url + "/chat/tool-cancel/cancel", timeout=10)
        assert response.status_code == 200
        body = stream.read_until(b'"code":"cancelled"').decode()
        assert time.monotonic() - asked < 5
    finally:
        stream.close()
    assert "event: done" not in body and "tool_result" not in body
    assert len(fake.chat_requests()) == 1  # no model call after the cancel
    # The conversation is free again at once, not when the tool is done.
    again = requests.post(server.url + "/chat", timeout=10, json={
        "message": "hi", "agent": "plain", "conversation_id": "tool-cancel"})
    assert again.status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/chat/stream", {}), ("/chat", {"stream": True}), ("/chat", {}),
], ids=["events", "plain-text", "json"])
def test_a_client_that_leaves_while_a_tool_runs_frees_its_turn(
    server: Gunicorn, fake: FakeOllama, path: str, body: dict[str, Any]
) -> None:
    fake.steps.extend([asks(call("slow", seconds=20)), ANSWER])
    stream = RawStream(server, path, message="slow?", agent="pi",
                       conversation_id="tool-gone", **body)
    try:
        deadline = time.monotonic() + 10
        while len(fake.chat_requests()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the tool runs now
    finally:
        left = stream.close()
    # The turn ends within a check or two of the watch, not when the tool is done.
    again = None
    while time.monotonic() - left < 8:
        again = requests.post(server.url + "/chat", timeout=10, json={
            "message": "hi", "agent": "plain", "conversation_id": "tool-gone"})
        if again.status_code != 409:
            break
        time.sleep(0.2)
    assert again is not None and again.status_code == 200, again.text if again else None
    assert len(fake.chat_requests()) == 2  # the tool turn made no second model call


def test_a_shutdown_while_a_tool_runs_ends_the_turn(
    upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upstream.reset()
    upstream.steps.extend([asks(call("slow", seconds=30)), ANSWER])
    with start_server(tmp_path_factory.mktemp("tool-shutdown"), upstream) as server:
        stream = RawStream(server, message="slow?", agent="pi")
        try:
            stream.read_until(b"event: tool_call")
            server.process.terminate()
            body = stream.read_until(b'"code":"server_shutting_down"').decode()
        finally:
            stream.close()
        assert "event: done" not in body
        assert server.process.wait(timeout=15) == 0


def test_a_tool_that_takes_too_long_is_an_error_and_the_turn_goes_on(
    upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upstream.reset()
    upstream.steps.extend([asks(call("slow", seconds=4)), ANSWER])
    with start_server(tmp_path_factory.mktemp("tool-timeout"), upstream, timeout=1.5,
                      IDLE_TIMEOUT="0.8") as server:
        seen = events(server)
    result = next(data for name, data in seen if name == "tool_result")
    assert result == {**result, "ok": False, "content": "error: timed out after 1.5 s"}
    assert 1400 <= result["ms"] < 3500  # the tool would take 4 s
    # The idle timeout (0.8 s) is not taken by the tool's time.
    assert seen[-1][0] == "done" and text(seen) == "The answer is 42."


def test_each_model_call_has_its_own_first_token_timeout(
    upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upstream.reset()
    upstream.steps.extend([asks(call("add", a=1, b=2)), Script(first_token_delay=5)])
    with start_server(tmp_path_factory.mktemp("tool-first-token"), upstream,
                      FIRST_TOKEN_TIMEOUT="1") as server:
        seen = events(server)
        upstream.steps.extend([asks(call("add", a=1, b=2)), Script(first_token_delay=5)])
        whole = requests.post(server.url + "/chat", json={"message": "x", "agent": "pi"},
                              timeout=30)
    assert names(seen) == ["start", "tool_call", "tool_result", "error"]
    assert seen[-1][1]["code"] == "upstream_timeout"
    assert whole.status_code == 504


def test_v1_runs_an_agents_tools_unless_the_request_brings_its_own(
    server: Gunicorn, fake: FakeOllama
) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    fake.steps.extend([asks(call("add", a=40, b=2)), ANSWER])
    completion = client.chat.completions.create(
        model="agent:pi", messages=[{"role": "user", "content": "40 + 2?"}])
    assert completion.choices[0].message.content == "The answer is 42."
    assert completion.choices[0].finish_reason == "stop"
    assert fake.chat_requests()[1]["messages"][-1] == {
        "role": "tool", "tool_name": "add", "content": "42"}
    fake.steps.extend([asks(call("add", a=40, b=2)), ANSWER])
    with client.chat.completions.stream(
            model="agent:pi", messages=[{"role": "user", "content": "40 + 2?"}]) as stream:
        streamed = stream.get_final_completion()
    assert streamed.choices[0].message.content == "The answer is 42."
    # A request's own tools go to its client: the agent's are not offered, nor run.
    fake.reset()
    own = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {}}}}
    fake.script = asks(call("lookup", "c9"))
    passed = client.chat.completions.create(
        model="agent:pi", messages=[{"role": "user", "content": "look it up"}], tools=[own])
    assert passed.choices[0].finish_reason == "tool_calls"
    assert passed.choices[0].message.tool_calls[0].function.name == "lookup"
    [sent] = fake.chat_requests()
    assert sent["tools"] == [own]
    listed = [model.id for model in client.models.list()]
    assert "agent:pi" in listed and "agent:router" not in listed
    # tool_choice "none": an answer without tools, the agent's included.
    fake.reset()
    client.chat.completions.create(model="agent:pi", tool_choice="none",
                                   messages=[{"role": "user", "content": "hi"}])
    assert "tools" not in fake.chat_requests()[0]


def test_a_router_sends_a_message_to_an_agent_with_tools(
    server: Gunicorn, fake: FakeOllama
) -> None:
    fake.steps.extend([asks(call("add", a=2, b=2)), ANSWER])
    seen = events(server, "the sum of 2 and 2", agent="router")
    assert names(seen) == ["start", "route", "tool_call", "tool_result", "token", "token",
                           "done"]
    assert seen[1][1] == {"route": "pi", "agent": "pi", "by": "keyword"}
    assert seen[-1][1]["steps"] == 2
    fake.classifier_script = Script(tokens=['{"route": "pi"}'])
    fake.steps.extend([asks(call("add", a=2, b=2)), ANSWER])
    body = requests.post(server.url + "/chat", json={"message": "2 and 2?", "agent": "router"},
                         timeout=30).json()
    # The classifier's call is not a step.
    assert body["route"]["by"] == "classifier" and body["steps"] == 2
    assert body["tool_calls"][0]["content"] == "4"


def test_every_model_call_of_a_turn_counts_against_the_daily_quota(
    upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pi_agent.cli import main as cli

    folder = tmp_path_factory.mktemp("tool-quota")
    keys = folder / "keys.json"
    assert cli(["keys", "--file", str(keys), "create", "--name", "q",
                "--tokens-per-day", "6"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    upstream.reset()
    # Each call makes four completion tokens (the fake counts its script's tokens).
    upstream.steps.extend([
        Script(tokens=["a", "b", "c", "d"], tool_calls=[call("add", a=1, b=1)]),
        Script(tokens=["e", "f", "g", "h"])])
    with start_server(folder, upstream, KEYS_FILE=str(keys)) as server:
        first = requests.post(server.url + "/chat", headers={"X-API-Key": key}, timeout=30,
                              json={"message": "x", "agent": "pi"})
        refused = requests.post(server.url + "/chat", headers={"X-API-Key": key}, timeout=30,
                                json={"message": "x", "agent": "plain"})
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 8
    assert refused.status_code == 429


def test_the_whole_turn_holds_one_generation_slot(
    server: Gunicorn, fake: FakeOllama
) -> None:
    # Tools included: a second turn waits for the slot while the first one's tool runs.
    fake.steps.extend([asks(call("slow", seconds=1.5)), ANSWER])
    first: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: first.update(events=events(server)))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while len(fake.chat_requests()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = events(server, "hi", agent="plain")
    finally:
        runner.join(30)
    assert "queued" in names(second)
    assert names(first["events"])[-1] == "done"
