"""Several Ollama servers behind one gateway (PI_AGENT_OLLAMA_URL with commas): where a turn
goes (the conversation's upstream, then one with the model loaded, then the most free
slots), failover before the first token only (down, 5xx, slow first token), the cooldown of
an upstream that failed, /ready per upstream, and the model lists as one."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from pi_agent.providers.ollama import OllamaProvider
from pi_agent.providers.pool import UpstreamPool

from .conftest import running_fake, state, unused_port
from .fake_ollama import FakeOllama, Script
from .test_events import parse_sse


@pytest.fixture
def fakes() -> Iterator[list[FakeOllama]]:
    with running_fake() as one, running_fake() as two, running_fake() as three:
        yield [one, two, three]


def name(fake: FakeOllama) -> str:
    return fake.url.removeprefix("http://")


def chats(fake: FakeOllama) -> int:
    return len(fake.chat_requests())


def polled(app: Flask) -> UpstreamPool:
    """The app's pool once every upstream that answers was polled (the first /ready or turn
    starts the poll; a test does not want a turn routed on what is not known yet)."""
    pool = state(app).provider
    pool.start_polling()
    deadline = time.monotonic() + 10
    while any(u.installed is None for u in pool.upstreams if u.answers):
        assert time.monotonic() < deadline, "the upstreams were not polled"
        time.sleep(0.02)
    return pool


def repoll(pool: UpstreamPool) -> None:
    """Poll every upstream now, and wait until a poll begun after this call has ended (one
    under way may have asked before the test changed a fake)."""
    begun = [upstream.begun for upstream in pool.upstreams]
    for upstream in pool.upstreams:
        upstream.changed.set()
    deadline = time.monotonic() + 10
    while any(u.ended <= before for u, before in zip(pool.upstreams, begun)):
        assert time.monotonic() < deadline, "the upstreams were not polled again"
        time.sleep(0.02)


def chat(client: FlaskClient, **body: Any) -> Any:
    response = client.post("/chat", json={"message": "hello", **body})
    return response


@pytest.fixture
def several(make_app: Callable[..., Flask], fakes: list[FakeOllama]) -> Callable[..., Flask]:
    def make(*chosen: FakeOllama, **settings: Any) -> Flask:
        urls = ",".join(fake.url for fake in (chosen or fakes))
        return make_app(**{"OLLAMA_URL": urls, **settings})
    return make


def test_a_turn_goes_to_its_conversations_upstream_then_where_the_model_is_loaded(
    several: Callable[..., Flask], fakes: list[FakeOllama]
) -> None:
    a, b, c = fakes
    a.loaded, b.loaded, c.loaded = {"qwen3:0.6b"}, {"llama3.2:1b"}, set()
    app = several()
    pool = polled(app)
    client = app.test_client()
    first = chat(client, conversation_id="c1")
    assert first.status_code == 200 and first.get_json()["upstream"] == name(b)
    assert (chats(a), chats(b), chats(c)) == (0, 1, 0)
    # The model is now loaded on c (and on b no more): a new conversation goes to c, the
    # one that b served stays there, where its prompt is in the cache.
    b.loaded, c.loaded = set(), {"llama3.2:1b"}
    repoll(pool)
    assert chat(client, conversation_id="c2").get_json()["upstream"] == name(c)
    again = chat(client, conversation_id="c1")
    assert again.get_json()["upstream"] == name(b) and again.get_json()["history"]["turns"] == 1
    # A model that only one of them has goes there, loaded or not.
    b.models.add("mistral:7b")
    pool.upstreams[1].tags_due = 0.0
    repoll(pool)
    assert pool.upstreams[1].has("mistral:7b") and not pool.upstreams[0].has("mistral:7b")
    relayed = client.post("/api/chat", json={
        "model": "mistral:7b", "stream": False,
        "messages": [{"role": "user", "content": "hi"}]})
    assert relayed.status_code == 200 and b.chat_requests()[-1]["model"] == "mistral:7b"


def test_without_affinity_or_a_loaded_model_the_most_free_slots_win(
    fakes: list[FakeOllama]
) -> None:
    pool = UpstreamPool([fake.url for fake in fakes], OllamaProvider, poll=False)
    try:
        for upstream in pool.upstreams:
            upstream.installed = frozenset({"llama3.2:1b", "qwen3:0.6b"})
        a, b, c = pool.names
        assert pool.rank("llama3.2:1b", "x", {a: 1, b: 3, c: 2}) == [b, c, a]
        # A full one is not ranked; ties go either way.
        ties = {tuple(pool.rank("llama3.2:1b", "x", {a: 2, b: 2, c: 0})) for _ in range(60)}
        assert ties == {(a, b), (b, a)}
        # Loaded beats free slots; the conversation's upstream beats both.
        pool.upstreams[0].loaded = frozenset({"llama3.2:1b"})
        assert pool.rank("llama3.2:1b", "x", {a: 1, b: 3, c: 2})[0] == a
        pool.served(c, "qwen3:0.6b", "x")
        assert pool.rank("llama3.2:1b", "x", {a: 1, b: 3, c: 2})[0] == c
        # One that lacks the model comes only when none that answers has it.
        pool.upstreams[1].installed = frozenset({"qwen3:0.6b"})
        assert b not in pool.rank("llama3.2:1b", "y", {a: 1, b: 3, c: 2})
        assert pool.rank("mistral", "y", {a: 1, b: 3, c: 2}) == [b, c, a]
        # One that does not answer is left out, unless none answers.
        pool.upstreams[0].answers = False
        assert pool.rank("llama3.2:1b", "y", {a: 1, b: 3, c: 2}) == [c]
        for upstream in pool.upstreams:
            upstream.answers = False
        assert sorted(pool.rank("llama3.2:1b", "y", {a: 1, b: 3, c: 2})) == sorted([a, b, c])
    finally:
        pool.close()


@pytest.mark.parametrize("failure", ["down", "500", "slow first token", "dropped"])
def test_a_turn_moves_to_the_next_upstream_before_its_first_token(
    several: Callable[..., Flask], fakes: list[FakeOllama], failure: str
) -> None:
    a, b, _ = fakes
    a.loaded, b.loaded = {"llama3.2:1b"}, set()  # a is tried first
    if failure == "500":
        a.script = Script(status=500)
    elif failure == "slow first token":
        a.script = Script(first_token_delay=5)
    elif failure == "dropped":
        a.script = Script(drop_before_headers=True)
    app = several(a, b, FIRST_TOKEN_TIMEOUT=1)
    pool = polled(app)
    if failure == "down":
        a.stop()  # polled while it answered: it is still ranked first
    client = app.test_client()
    reply = chat(client, conversation_id="c")
    assert reply.status_code == 200, reply.get_json()
    assert reply.get_json()["upstream"] == name(b) and reply.get_json()["reply"] == "Hello, world!"
    assert chats(b) == 1
    # Unreachable or garbled: a is left out at once. A 5xx or a slow first token may be the
    # request's own doing: a is left out once it fails a second time in a row.
    cools_at_once = failure in ("down", "dropped")
    assert (pool.upstreams[0].cool_until > time.monotonic()) == cools_at_once
    if not cools_at_once:
        repoll(pool)  # b, which served, has the model loaded no more: a comes first again
        assert chat(client).get_json()["upstream"] == name(b)
        assert pool.upstreams[0].cool_until > time.monotonic()
    # The stream of the next turn goes straight to b: a cools down.
    repoll(pool)
    tried, served = chats(a), chats(b)
    events = parse_sse(client.post("/chat/stream", json={"message": "again"}).get_data(
        as_text=True))
    assert events[-1][0] == "done" and events[-1][1]["upstream"] == name(b)
    assert chats(a) == tried and chats(b) == served + 1


def test_an_event_stream_fails_over_a_slow_first_token_too(
    several: Callable[..., Flask], fakes: list[FakeOllama]
) -> None:
    a, b, _ = fakes
    a.loaded, b.loaded = {"llama3.2:1b"}, set()
    a.script = Script(first_token_delay=5)
    app = several(a, b, FIRST_TOKEN_TIMEOUT=1, HEARTBEAT_SECONDS=0.3)
    polled(app)
    text = app.test_client().post("/chat/stream", json={"message": "hi"}).get_data(as_text=True)
    events = parse_sse(text)
    assert [e[1]["content"] for e in events if e[0] == "token"] == ["Hello", ",", " world", "!"]
    assert events[-1][0] == "done" and events[-1][1]["upstream"] == name(b)


def test_no_failover_after_the_first_token_and_a_cooldown_that_ends(
    several: Callable[..., Flask], fakes: list[FakeOllama]
) -> None:
    a, b, _ = fakes
    a.loaded, b.loaded = {"llama3.2:1b"}, set()
    a.script = Script(drop_after=2)  # two tokens, then the connection drops
    app = several(a, b)
    pool = polled(app)
    client = app.test_client()
    events = parse_sse(client.post("/chat/stream", json={"message": "hi"}).get_data(
        as_text=True))
    assert [e[1]["content"] for e in events if e[0] == "token"] == ["Hello", ","]
    assert events[-1][0] == "error" and chats(b) == 0
    # A failure after the first token is the turn's, not the upstream's: no cooldown.
    assert pool.upstreams[0].cool_until == 0.0
    # Two 500s in a row leave a out for the cooldown, then it is tried again. The pool's
    # clock stands still meanwhile: a slow machine must not end the cooldown early.
    now = [time.monotonic()]
    pool._clock = lambda: now[0]
    pool.cooldown = 0.5
    a.script = Script(status=500)
    for tried in (2, 3):
        repoll(pool)  # b, which served, has the model loaded no more: a comes first
        assert chat(client).get_json()["upstream"] == name(b) and chats(a) == tried
    repoll(pool)
    assert chat(client).get_json()["upstream"] == name(b) and chats(a) == 3
    now[0] += 0.6
    a.script = Script()
    repoll(pool)
    assert chat(client).get_json()["upstream"] == name(a)


def test_every_upstream_failing_fails_the_turn_after_one_try_each(
    several: Callable[..., Flask], fakes: list[FakeOllama]
) -> None:
    for fake in fakes:
        fake.script = Script(status=503)
    app = several()
    polled(app)
    response = chat(app.test_client())
    assert response.status_code == 502
    assert [chats(fake) for fake in fakes] == [1, 1, 1]


def test_ready_lists_each_upstream_and_is_ready_while_one_is(
    several: Callable[..., Flask], fakes: list[FakeOllama]
) -> None:
    a, b, _ = fakes
    down = f"http://127.0.0.1:{unused_port()}"
    b.models.discard("llama3.2:1b")
    app = several(a, b, READY_CACHE_SECONDS=0)
    client = app.test_client()
    body = client.get("/ready").get_json()
    assert body["status"] == "ready"
    assert body["upstreams"] == [
        {"upstream": name(a), "status": "ready"},
        {"upstream": name(b), "status": "not_ready",
         "reason": "model llama3.2:1b is not pulled: run `ollama pull llama3.2:1b`"}]
    app = several(READY_CACHE_SECONDS=0, OLLAMA_URL=f"{b.url},{down}")
    response = app.test_client().get("/ready")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "not_ready" and body["reason"].startswith("no upstream is ready")
    assert body["upstreams"][1] == {
        "upstream": down.removeprefix("http://"), "status": "not_ready",
        "reason": f"ollama not reachable at {down}: is it running?"}


def test_model_lists_are_the_union_of_the_upstreams(
    several: Callable[..., Flask], fakes: list[FakeOllama]
) -> None:
    a, b, c = fakes
    a.models, b.models = {"llama3.2:1b"}, {"qwen3:0.6b", "llama3.2:1b"}
    a.loaded, b.loaded = {"llama3.2:1b"}, {"qwen3:0.6b"}
    c.stop()  # one that does not answer is left out
    client = several().test_client()
    tags = client.get("/api/tags").get_json()
    assert [m["name"] for m in tags["models"]] == ["llama3.2:1b", "qwen3:0.6b"]
    ps = client.get("/api/ps").get_json()
    assert [m["name"] for m in ps["models"]] == ["llama3.2:1b", "qwen3:0.6b"]
    models = client.get("/v1/models").get_json()
    assert {m["id"] for m in models["data"]} >= {"llama3.2:1b", "qwen3:0.6b"}
    # /api/show goes to an upstream that has the model.
    shown = client.post("/api/show", json={"model": "qwen3:0.6b"})
    assert shown.status_code == 200
    assert [r["_path"] for r in b.requests if r["_path"] == "/api/show"] == ["/api/show"]
    assert json.loads(shown.get_data())["modelfile"] == "FROM qwen3:0.6b"


def test_relayed_generations_fail_over_too_and_the_last_answer_is_ollamas_own(
    several: Callable[..., Flask], fakes: list[FakeOllama]
) -> None:
    a, b, _ = fakes
    for fake in (a, b):
        fake.models.add("mistral:7b")
    a.loaded, b.loaded = {"mistral:7b"}, set()  # a is tried first
    app = several(a, b)
    pool = polled(app)
    client = app.test_client()
    body = {"model": "mistral:7b", "stream": False,
            "messages": [{"role": "user", "content": "hi"}]}
    a.models.discard("mistral:7b")  # removed since the last poll: a says 404
    relayed = client.post("/api/chat", json=body)
    assert relayed.status_code == 200 and len(b.chat_requests()) == 1
    assert pool.upstreams[0].cool_until == 0.0  # a model it lacks is no reason to cool
    b.models.discard("mistral:7b")
    repoll(pool)  # both polled: neither has it; each is asked once, the last one's 404 told
    missing = client.post("/api/chat", json=body)
    assert missing.status_code == 404
    assert missing.get_json() == {"error": "model 'mistral:7b' not found"}
    # A 5xx of the one tried first: the other answers.
    body["model"] = "llama3.2:1b"
    a.loaded = {"llama3.2:1b"}
    repoll(pool)
    a.script = Script(status=500)
    assert client.post("/api/chat", json=body).status_code == 200
    assert b.chat_requests()[-1]["model"] == "llama3.2:1b"
