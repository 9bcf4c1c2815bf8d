"""Event streams (SSE and NDJSON): the event sequences, heartbeats, timeouts, cancellation
and disconnects, through the Flask test client and through gunicorn."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from .conftest import state
from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, RawStream, serving

Event = tuple[str, dict[str, Any]]


def parse_sse(text: str) -> list[Event]:
    """Read SSE the way the spec's parsers do: events end at a blank line, comment lines
    start with ':', each data line is JSON. Heartbeats come back as ("ping", {})."""
    events: list[Event] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        if all(line.startswith(":") for line in lines):
            events.append(("ping", {}))
            continue
        name = next(line[len("event: "):] for line in lines if line.startswith("event: "))
        data = "".join(line[len("data: "):] for line in lines if line.startswith("data: "))
        events.append((name, json.loads(data)))
    return events


def parse_ndjson(text: str) -> list[Event]:
    events = []
    for line in text.splitlines():
        obj = json.loads(line)
        events.append((obj.pop("event"), obj))
    return events


def names(events: list[Event]) -> list[str]:
    return [name for name, _ in events]


def sse(client: FlaskClient, **body: Any) -> Any:
    return client.post("/chat/stream", json={"message": "hello", **body})


# --- sequences ----------------------------------------------------------------------


def test_sse_sequence_and_headers(app: Flask, client: FlaskClient, fake_ollama: FakeOllama) -> None:
    fake_ollama.script = Script(tokens=["Hi", " there", " 🍓"])
    response = sse(client, conversation_id="ev-1")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["X-Conversation-Id"] == "ev-1"
    events = parse_sse(response.get_data(as_text=True))
    assert names(events) == ["start", "token", "token", "token", "done"]
    assert events[0][1] == {"conversation_id": "ev-1", "agent": "general", "model": "llama3.2:1b"}
    assert "".join(data["content"] for name, data in events if name == "token") == "Hi there 🍓"
    done = events[-1][1]
    assert done["conversation_id"] == "ev-1" and done["done_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert set(done["timings"]) == {"queue_ms", "first_token_ms", "total_ms"}
    memory = state(app).memory
    assert memory is not None and memory.history("ev-1")[0].assistant == "Hi there 🍓"


@pytest.mark.parametrize(
    "path, stream, accept, kind",
    [
        ("/chat", True, "text/event-stream", "sse"),
        ("/chat", True, "application/x-ndjson", "ndjson"),
        ("/chat/stream", False, "application/x-ndjson", "ndjson"),
        ("/chat/stream", False, "*/*", "sse"),
        ("/chat", True, "*/*", "text"),
        ("/chat", True, "application/x-ndjson;q=0.5, text/event-stream", "sse"),
        ("/chat", True, "text/event-stream; charset=utf-8", "sse"),
        ("/chat", True, "TEXT/EVENT-STREAM", "sse"),
        ("/chat", True, "application/x-ndjson; charset=utf-8", "ndjson"),
    ],
)
def test_accept_picks_the_format(
    client: FlaskClient, fake_ollama: FakeOllama, path: str, stream: bool, accept: str, kind: str
) -> None:
    response = client.post(path, json={"message": "x", "stream": stream},
                           headers={"Accept": accept})
    text = response.get_data(as_text=True)
    if kind == "text":
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert text == "Hello, world!"
        return
    events = parse_sse(text) if kind == "sse" else parse_ndjson(text)
    assert response.headers["Content-Type"].startswith(
        "text/event-stream" if kind == "sse" else "application/x-ndjson")
    assert names(events) == ["start", "token", "token", "token", "token", "done"]


@pytest.mark.parametrize(
    "script, code",
    [
        (Script(tokens=["a", "b"], error_after=0), "upstream_error"),
        (Script(tokens=["a", "b"], error_after=1), "upstream_error"),
        (Script(tokens=["a", "b"], drop_after=1), "upstream_protocol_error"),
        (Script(status=500), "upstream_error"),
    ],
    ids=["error-first", "error-mid", "dropped", "http-500"],
)
def test_failure_ends_with_one_error_event(
    app: Flask, client: FlaskClient, fake_ollama: FakeOllama, script: Script, code: str
) -> None:
    fake_ollama.script = script
    events = parse_sse(sse(client, conversation_id="ev-err").get_data(as_text=True))
    assert events[0][0] == "start" and events[-1][0] == "error"
    assert names(events).count("error") == 1 and "done" not in names(events)
    assert events[-1][1]["code"] == code
    assert all(name != "token" or "error" not in data["content"] for name, data in events)
    memory = state(app).memory
    assert memory is not None and memory.history("ev-err") == []


def test_model_not_pulled_is_an_error_event(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama
) -> None:
    events = parse_sse(sse(make_app(MODEL="mistral").test_client()).get_data(as_text=True))
    assert names(events) == ["start", "error"]
    assert events[-1][1]["code"] == "model_not_found"


def test_bad_request_is_refused_before_the_stream(client: FlaskClient) -> None:
    response = client.post("/chat/stream", json={"message": ""})
    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/json"


# --- heartbeats and timeouts ----------------------------------------------------------


def test_heartbeat_while_the_model_loads(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama
) -> None:
    fake_ollama.script = Script(tokens=["late"], first_token_delay=0.8)
    client = make_app(HEARTBEAT_SECONDS=0.2).test_client()
    events = parse_sse(sse(client).get_data(as_text=True))
    words = [name for name in names(events) if name != "ping"]  # a slow machine may ping late
    assert words == ["start", "token", "done"]
    assert names(events)[1] == "ping" and names(events).count("ping") >= 2
    ndjson = client.post("/chat/stream", json={"message": "x"},
                         headers={"Accept": "application/x-ndjson"}).get_data(as_text=True)
    assert '{"event":"ping"}' in ndjson.splitlines()


@pytest.mark.parametrize(
    "settings, script",
    [
        ({"FIRST_TOKEN_TIMEOUT": 0.3}, Script(tokens=["late"], first_token_delay=3)),
        ({"IDLE_TIMEOUT": 0.3}, Script(tokens=["a", "b", "c"], token_delay=3)),
        ({"TOTAL_TIMEOUT": 0.5}, Script(tokens=[f"t{i}" for i in range(50)], token_delay=0.1)),
    ],
    ids=["first-token", "idle", "total"],
)
def test_each_timeout_ends_with_upstream_timeout(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama,
    settings: dict[str, float], script: Script,
) -> None:
    fake_ollama.script = script
    client = make_app(HEARTBEAT_SECONDS=0.2, **settings).test_client()
    events = parse_sse(sse(client).get_data(as_text=True))
    assert events[-1] == ("error", {"code": "upstream_timeout",
                                    "message": "the model server did not answer in time"})
    assert "done" not in names(events)


# --- through gunicorn: queueing, cancellation, disconnects ------------------------------

HEARTBEAT = 1.0
# What is noticed by the watchdog (every 0.5 s) or the next heartbeat (every second) is
# noticed within this on a slow, shared machine; the upstream's next word is seconds later.
NOTICED = 2.5


@pytest.fixture(scope="module")
def server(upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with serving(tmp_path_factory.mktemp("events") / "server.log", OLLAMA_URL=upstream.url,
                 MAX_CONCURRENT="1", MAX_QUEUE="2", HEARTBEAT_SECONDS=str(HEARTBEAT)) as server:
        yield server


def upstream_closed_within(fake: FakeOllama, since: float, seconds: float) -> bool:
    return fake.client_closed.wait(seconds + 2) and (fake.client_closed_at or 0) - since < seconds


def test_queued_events_then_the_answer(server: Gunicorn, fake: FakeOllama) -> None:
    fake.scripts["first"] = Script(tokens=[f"t{i} " for i in range(20)], token_delay=0.05)
    first = RawStream(server, message="first")
    try:
        first.read_until(b"event: token")
        second = requests.post(server.url + "/chat/stream", json={"message": "second"},
                               timeout=30)
    finally:
        first.close()
    events = parse_sse(second.text)
    assert names(events)[:2] == ["start", "queued"] and events[1][1] == {"position": 1}
    assert names(events)[-1] == "done"
    assert events[-1][1]["timings"]["queue_ms"] > 0


def test_disconnect_while_waiting_for_the_first_token(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=["never"], first_token_delay=20)
    before = len(fake.chat_requests())
    stream = RawStream(server)
    stream.read_until(b"event: start")
    deadline = time.monotonic() + 5
    while len(fake.chat_requests()) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fake.chat_requests()) == before + 1  # the call waits for its first token
    closed = stream.close()
    assert upstream_closed_within(fake, closed, NOTICED)
    # The slot is free again: the next turn is answered at once.
    fake.script = Script(tokens=["ok"])
    assert requests.post(server.url + "/chat", json={"message": "x"}, timeout=10).status_code == 200


def test_disconnect_mid_stream(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=[f"t{i} " for i in range(200)], token_delay=0.05)
    stream = RawStream(server, conversation_id="ev-gone")
    stream.read_until(b'"t2 "')
    closed = stream.close()
    assert upstream_closed_within(fake, closed, HEARTBEAT)
    fake.script = Script(tokens=["ok"])
    requests.post(server.url + "/chat", json={"message": "and?", "conversation_id": "ev-gone"},
                  timeout=10)
    remembered = fake.chat_requests()[-1]["messages"][-2]
    assert remembered["role"] == "assistant" and remembered["content"].startswith("t0 t1 t2 ")


def test_disconnect_while_queued_gives_the_place_back(server: Gunicorn, fake: FakeOllama) -> None:
    # The holder runs 4 s: the queued client's ping has long found it gone by then.
    fake.scripts["holder"] = Script(tokens=[f"t{i} " for i in range(40)], token_delay=0.1)
    holder = RawStream(server, message="holder")
    try:
        holder.read_until(b"event: token")
        queued = RawStream(server, message="queued")
        queued.read_until(b"event: queued")
        queued.close()
        time.sleep(HEARTBEAT + 0.5)  # a ping finds the queued client gone
        holder.read_until(b"event: done")
    finally:
        holder.close()
    assert "queued" not in [r["messages"][-1]["content"] for r in fake.chat_requests()]


def test_cancel_a_running_turn(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=[f"t{i} " for i in range(200)], token_delay=0.05)
    stream = RawStream(server, conversation_id="ev-cancel")
    try:
        stream.read_until(b'"t1 "')
        asked = time.monotonic()
        response = requests.post(server.url + "/chat/ev-cancel/cancel", timeout=10)
        assert response.status_code == 200
        assert response.json() == {"conversation_id": "ev-cancel", "status": "cancelling"}
        text = stream.read_until(b"event: error").decode()
        assert upstream_closed_within(fake, asked, HEARTBEAT)
    finally:
        stream.close()
    body = text.split("\r\n\r\n", 1)[1]
    assert '"code":"cancelled"' in body and "event: done" not in body


def test_a_new_conversation_with_its_first_turn_running_is_busy(
    server: Gunicorn, fake: FakeOllama
) -> None:
    # Nothing is remembered yet, but a turn runs: deleting it is a 409, not a 404.
    fake.script = Script(tokens=[f"t{i} " for i in range(200)], token_delay=0.05)
    stream = RawStream(server, conversation_id="ev-new-busy")
    try:
        stream.read_until(b'"t1 "')
        busy = requests.delete(server.url + "/conversations/ev-new-busy", timeout=10)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "conversation_busy"
    finally:
        stream.close()


@pytest.mark.parametrize("conversation_id", ["nobody-here", "bad..id"])
def test_cancel_of_an_idle_conversation_is_404(server: Gunicorn, conversation_id: str) -> None:
    response = requests.post(server.url + f"/chat/{conversation_id}/cancel", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "turn_not_running"


def test_cancel_a_plain_text_stream(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=[f"t{i} " for i in range(200)], token_delay=0.05)
    with requests.post(server.url + "/chat", json={"message": "x", "stream": True,
                                                   "conversation_id": "text-cancel"},
                       stream=True, timeout=10) as response:
        pieces = response.iter_content(chunk_size=None)
        next(pieces)
        canceller = threading.Thread(target=requests.post, args=(
            server.url + "/chat/text-cancel/cancel",), kwargs={"timeout": 10})
        canceller.start()
        rest = b"".join(pieces)
        canceller.join()
    assert rest.endswith(b"\n[error] the turn was cancelled\n")


@pytest.mark.parametrize("stream", [True, False], ids=["plain-text", "non-stream"])
def test_disconnect_before_the_first_token_without_events(
    server: Gunicorn, fake: FakeOllama, stream: bool
) -> None:
    fake.script = Script(tokens=["never"], first_token_delay=20)
    before = len(fake.chat_requests())
    request = RawStream(server, "/chat", stream=stream)
    deadline = time.monotonic() + 5
    while len(fake.chat_requests()) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fake.chat_requests()) == before + 1
    closed = request.close()
    # Nothing is written to such a client before the first token, so a watcher notices.
    assert upstream_closed_within(fake, closed, NOTICED)


def test_cancel_a_non_stream_turn(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=["never"], first_token_delay=20)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(requests.post, server.url + "/chat",
                              json={"message": "x", "conversation_id": "ns-cancel"}, timeout=15)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            cancelled = requests.post(server.url + "/chat/ns-cancel/cancel", timeout=10)
            if cancelled.status_code == 200:
                break
            time.sleep(0.05)
        assert cancelled.status_code == 200
        response = waiting.result()
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "cancelled"


@pytest.mark.parametrize(
    "accept, script, expected",
    [
        ("text/event-stream", Script(tokens=["a", "b"]), ["start", "token", "token", "done"]),
        ("application/x-ndjson", Script(tokens=["a", "b"]), ["start", "token", "token", "done"]),
        ("text/event-stream", Script(tokens=["a", "b"], error_after=1),
         ["start", "token", "error"]),
        ("text/event-stream", Script(tokens=["late"], first_token_delay=2.5),
         ["start", "ping", "token", "done"]),
        ("application/x-ndjson", Script(tokens=["late"], first_token_delay=2.5),
         ["start", "ping", "token", "done"]),
    ],
    ids=["sse", "ndjson", "sse-error", "sse-heartbeat", "ndjson-heartbeat"],
)
def test_event_sequences_through_gunicorn(
    server: Gunicorn, fake: FakeOllama, accept: str, script: Script, expected: list[str]
) -> None:
    fake.script = script
    response = requests.post(server.url + "/chat", json={"message": "x", "stream": True},
                             headers={"Accept": accept}, timeout=30)
    assert response.status_code == 200
    parse = parse_sse if accept == "text/event-stream" else parse_ndjson
    seen = names(parse(response.text))
    # Heartbeats come every second while the fake holds its first token back 2.5 s.
    collapsed = [name for i, name in enumerate(seen) if name != "ping" or seen[i - 1] != "ping"]
    assert collapsed == expected


def test_plain_text_client_leaving_between_tokens(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=["a ", "b ", "c "], token_delay=5)
    request = RawStream(server, "/chat", stream=True)
    request.read_until(b"a ")
    closed = request.close()
    # Nothing is written while Ollama is silent between tokens; the turn's watcher notices.
    assert upstream_closed_within(fake, closed, NOTICED)


@pytest.mark.parametrize("stream", [True, False], ids=["plain-text", "non-stream"])
def test_cancel_a_queued_turn(server: Gunicorn, fake: FakeOllama, stream: bool) -> None:
    # The holder would run 6 s: a cancel answered before then is not the holder's end.
    fake.scripts["holder"] = Script(tokens=[f"t{i} " for i in range(40)], token_delay=0.15)
    holder = RawStream(server, message="holder")
    try:
        holder.read_until(b"event: token")
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(requests.post, server.url + "/chat", timeout=15,
                                 json={"message": "queued", "stream": stream,
                                       "conversation_id": "q-cancel"})
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # until the queued turn is known
                asked = time.monotonic()
                cancelled = requests.post(server.url + "/chat/q-cancel/cancel", timeout=10)
                if cancelled.status_code == 200:
                    break
                time.sleep(0.05)
            assert cancelled.status_code == 200
            response = queued.result()
            answered = time.monotonic()
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "cancelled"
        assert answered - asked < NOTICED  # not only once the holder is done
        assert b"event: done" not in holder.received
    finally:
        holder.close()
    assert "queued" not in [r["messages"][-1]["content"] for r in fake.chat_requests()]


@pytest.mark.parametrize(
    "path, body, started, ending",
    [
        ("/chat/stream", {}, b'"t1 "', '"code":"server_shutting_down"'),
        ("/chat", {"stream": True}, b"t1 ", "[error] the server is shutting down"),
    ],
    ids=["events", "plain-text"],
)
def test_sigterm_ends_a_running_stream_with_a_last_word(
    upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory,
    path: str, body: dict[str, Any], started: bytes, ending: str,
) -> None:
    upstream.script = Script(tokens=[f"t{i} " for i in range(400)], token_delay=0.05)
    with serving(tmp_path_factory.mktemp("shutdown") / "server.log", "--graceful-timeout",
                 "3", OLLAMA_URL=upstream.url, HEARTBEAT_SECONDS="0.5") as server:
        stream = RawStream(server, path, **body)
        try:
            stream.read_until(started)
            server.process.terminate()
            text = stream.read_until(ending.encode()).decode()
        finally:
            stream.close()
        assert ending in text and "event: done" not in text
        assert server.process.wait(timeout=15) == 0


@pytest.fixture(scope="module")
def quick_timeouts(
    upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    with serving(tmp_path_factory.mktemp("timeouts") / "server.log",
                 OLLAMA_URL=upstream.url, FIRST_TOKEN_TIMEOUT="0.8", IDLE_TIMEOUT="0.8",
                 TOTAL_TIMEOUT="2", HEARTBEAT_SECONDS="0.5", READY_CACHE_SECONDS="0") as server:
        yield server


@pytest.mark.parametrize(
    "script",
    [
        Script(tokens=["late"], first_token_delay=5),
        Script(tokens=["a", "b"], token_delay=5),
        Script(tokens=[f"t{i}" for i in range(100)], token_delay=0.1),
    ],
    ids=["first-token", "idle", "total"],
)
@pytest.mark.parametrize("mode", ["sse", "text"])
def test_each_timeout_through_gunicorn(
    quick_timeouts: Gunicorn, fake: FakeOllama, script: Script, mode: str
) -> None:
    fake.script = script
    response = requests.post(quick_timeouts.url + ("/chat/stream" if mode == "sse" else "/chat"),
                             json={"message": "x", "stream": True}, timeout=30)
    if mode == "sse":
        events = parse_sse(response.text)
        assert events[-1] == ("error", {"code": "upstream_timeout",
                                        "message": "the model server did not answer in time"})
    elif script.first_token_delay:
        assert response.status_code == 504  # before the first byte: a status
        assert response.json()["error"]["code"] == "upstream_timeout"
    else:
        assert response.text.endswith("\n[error] the model server did not answer in time\n")


def test_ready_in_each_state_through_gunicorn(quick_timeouts: Gunicorn, fake: FakeOllama) -> None:
    ready = requests.get(quick_timeouts.url + "/ready", timeout=10)
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    fake.models.discard("llama3.2:1b")
    try:
        missing = requests.get(quick_timeouts.url + "/ready", timeout=10)
    finally:
        fake.models.add("llama3.2:1b")
    assert missing.status_code == 503
    assert missing.json()["reason"] == (
        "model llama3.2:1b is not pulled: run `ollama pull llama3.2:1b`")
