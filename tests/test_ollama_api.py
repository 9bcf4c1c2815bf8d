"""The Ollama-compatible API, driven by the official ``ollama`` Python client (and by raw HTTP
where the framing itself is checked), through gunicorn and the gevent worker, in front of
the fake Ollama."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import ollama
import pytest
import requests
from flask import Flask

from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, serving

MODEL = "llama3.2:1b"
OSLO_CALL = {"id": "call_k3j9x0ab",
             "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Oslo"}}}


@pytest.fixture(scope="module")
def server(upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with serving(tmp_path_factory.mktemp("ollama") / "server.log", OLLAMA_URL=upstream.url,
                 MAX_CONCURRENT="1", MAX_QUEUE="1", NUM_PREDICT="300",
                 TOTAL_TIMEOUT="4") as server:
        yield server


@pytest.fixture
def client(server: Gunicorn) -> Iterator[ollama.Client]:
    client = ollama.Client(host=server.url, timeout=20)
    try:
        yield client
    finally:
        client._client.close()


def test_chat(client: ollama.Client, fake: FakeOllama) -> None:
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content == "Hello, world!" and reply.done_reason == "stop"
    assert reply.eval_count == 4
    parts = list(client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                             stream=True))
    assert [p.message.content for p in parts] == ["Hello", ",", " world", "!", ""]
    assert parts[-1].done is True
    # Streamed upstream also for a whole reply: so the timeouts and cancel can stop it.
    assert [r["stream"] for r in fake.chat_requests()] == [True, True]


def test_generate(client: ollama.Client, fake: FakeOllama) -> None:
    assert client.generate(model=MODEL, prompt="hi").response == "Hello, world!"
    parts = list(client.generate(model=MODEL, prompt="hi", stream=True))
    assert "".join(p.response for p in parts) == "Hello, world!" and parts[-1].done
    sent = [r for r in fake.requests if r["_path"] == "/api/generate"]
    assert [r["prompt"] for r in sent] == ["hi", "hi"]


def test_list_show_ps_version(client: ollama.Client, server: Gunicorn) -> None:
    assert [m.model for m in client.list().models] == ["llama3.2:1b", "qwen3:0.6b"]
    shown = client.show(MODEL)
    assert shown.capabilities == ["completion", "tools"]
    assert [m.model for m in client.ps().models] == ["llama3.2:1b"]
    assert requests.get(server.url + "/api/version", timeout=5).json() == {"version": "0.33.0"}
    with pytest.raises(ollama.ResponseError) as info:
        client.show("not-installed")
    assert info.value.status_code == 404
    assert info.value.error == "model 'not-installed:latest' not found"  # Ollama's own text


def test_root_answers_like_ollama(server: Gunicorn) -> None:
    response = requests.get(server.url + "/", timeout=5)
    assert (response.status_code, response.text) == (200, "Ollama is running")
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert requests.head(server.url + "/", timeout=5).status_code == 200


def test_streams_keep_ollamas_framing(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=["a", "<b>", "c"], token_delay=0.02)
    with requests.post(server.url + "/api/chat", stream=True, timeout=10,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
                       ) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        frames = list(response.iter_content(chunk_size=None))
    # One chunk frame per object, each object one line, exactly as Ollama wrote it.
    assert len(frames) == 4 and all(f.endswith(b"\n") and f.count(b"\n") == 1 for f in frames)
    assert b'"content":"\\u003cb\\u003e"' in frames[1]  # Go's escaping is kept
    assert json.loads(frames[-1])["done"] is True


def test_the_client_host_is_not_forwarded(server: Gunicorn, fake: FakeOllama) -> None:
    requests.post(server.url + "/api/generate", timeout=10, headers={"Host": "evil.example"},
                  json={"model": MODEL, "prompt": "hi", "stream": False})
    requests.get(server.url + "/api/tags", timeout=10, headers={"Host": "evil.example"})
    hosts = {r["_host"] for r in fake.requests}
    assert hosts == {fake.url.removeprefix("http://")}


def test_gateway_limits_are_applied(client: ollama.Client, fake: FakeOllama) -> None:
    client.generate(model=MODEL, prompt="hi")
    client.generate(model=MODEL, prompt="hi", options={"num_predict": 5000, "num_ctx": 4096},
                    keep_alive="5m")
    client.generate(model=MODEL, prompt="hi", options={"num_predict": 20})
    sent = [r for r in fake.requests if r["_path"] == "/api/generate"]
    assert [r["options"]["num_predict"] for r in sent] == [300, 300, 20]
    assert [r["options"]["num_ctx"] for r in sent] == [2048, 4096, 2048]
    assert [r["keep_alive"] for r in sent] == ["30m", "5m", "30m"]


def test_null_options_are_left_out_and_num_ctx_is_capped(server: Gunicorn, fake: FakeOllama
                                                         ) -> None:
    # What llama-index's Ollama class sends by default: the context length it read from
    # /api/show, and a temperature it was not given.
    options = {"temperature": None, "num_ctx": 131072, "top_k": None}
    reply = requests.post(server.url + "/api/chat", timeout=10, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "options": options, "keep_alive": None})
    assert reply.status_code == 200, reply.text
    [sent] = fake.chat_requests()
    assert sent["options"] == {"num_ctx": 8192, "num_predict": 300}  # PI_AGENT_MAX_NUM_CTX
    assert sent["keep_alive"] == "30m"


def test_numbers_no_model_server_takes_are_refused(server: Gunicorn, fake: FakeOllama) -> None:
    for options in ({"num_predict": 10**30}, {"num_ctx": 10**30}, {"seed": 10**30}):
        refused = requests.post(server.url + "/api/chat", timeout=10, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": options})
        assert refused.status_code == 400, options
        assert "options." in refused.json()["error"]
    refused = requests.post(server.url + "/api/generate", timeout=10, headers={
        "Content-Type": "application/json"}, data=b'{"model": "llama3.2:1b", "prompt": "hi", '
                                                  b'"options": {"mirostat_tau": Infinity}}')
    assert refused.status_code == 400
    assert list(fake.requests) == []


def test_a_whole_reply_over_its_time_is_504(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=[f"t{i}" for i in range(100)], token_delay=0.1)
    response = requests.post(server.url + "/api/generate", timeout=20, json={
        "model": MODEL, "prompt": "x", "stream": False})  # TOTAL_TIMEOUT is 4 s
    assert response.status_code == 504
    assert response.json() == {"error": "the model server did not answer in time"}
    assert fake.client_closed.wait(5)


def test_long_messages_fit_the_context_or_are_refused(server: Gunicorn, fake: FakeOllama
                                                      ) -> None:
    document = "word " * 1500  # 7,500 characters: more than /chat takes, within 2048 tokens
    history = [{"role": "user", "content": "x" * 9000}, {"role": "assistant", "content": "ok"}]
    fits = requests.post(server.url + "/api/chat", timeout=10, json={
        "model": MODEL, "stream": False,
        "messages": history + [{"role": "user", "content": document}]})
    assert fits.status_code == 200, fits.text  # Ollama drops the old message, not the gateway
    assert fake.chat_requests()[-1]["messages"][-1]["content"] == document
    too_long = requests.post(server.url + "/api/chat", timeout=10, json={
        "model": MODEL, "messages": [{"role": "system", "content": "s" * 6000},
                                     {"role": "user", "content": document}]})
    assert too_long.status_code == 400
    assert "context of 2048 (num_ctx)" in too_long.json()["error"]
    # A larger num_ctx, asked for, makes room (up to PI_AGENT_MAX_NUM_CTX).
    larger = requests.post(server.url + "/api/generate", timeout=10, json={
        "model": MODEL, "prompt": "s" * 6000 + document, "stream": False,
        "options": {"num_ctx": 4096}})
    assert larger.status_code == 200, larger.text
    assert len(fake.chat_requests()) == 1


@pytest.mark.parametrize("path, body", [
    ("/api/chat", {"messages": [{"role": "user", "content": "<b>hi</b> & more"}],
                   "tools": [{"type": "function", "function": {"name": "get_weather"}}]}),
    ("/api/generate", {"prompt": "<b>hi</b> & more"}),
])
def test_a_whole_reply_is_what_ollama_answers(server: Gunicorn, fake: FakeOllama, path: str,
                                              body: dict[str, object]) -> None:
    fake.script = Script(tokens=["<b>", "Hello", "</b>", " & bye"], thinking=["hm", "m"],
                         tool_calls=[OSLO_CALL] if path == "/api/chat" else [])
    request = {"model": MODEL, "stream": False, "keep_alive": "30m",
               "options": {"num_predict": 300, "num_ctx": 2048}, **body}
    gathered = requests.post(server.url + path, json=request, timeout=10)
    # What Ollama (here the fake) answers itself when asked for a whole reply.
    direct = requests.post(fake.url + path, json=request, timeout=10)
    assert gathered.status_code == direct.status_code == 200
    assert gathered.headers["Content-Type"] == direct.headers["Content-Type"]
    assert b"\\u003cb\\u003e" in gathered.content  # Go's escaping
    mine, theirs = gathered.json(), direct.json()
    for reply in (mine, theirs):
        del reply["created_at"]
    assert mine == theirs
    assert fake.requests[0]["stream"] is True  # the gateway's own request was a stream


def test_a_whole_reply_that_fails_midway(client: ollama.Client, fake: FakeOllama) -> None:
    fake.script = Script(error_after=2, error_text="an error was encountered while running")
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=False)
    assert info.value.status_code == 500
    assert info.value.error == "an error was encountered while running"
    fake.script = Script(drop_after=2)
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model=MODEL, prompt="hi", stream=False)
    assert info.value.status_code == 502


def test_a_whole_reply_keeps_the_timeouts(make_app: Callable[..., Flask],
                                          fake_ollama: FakeOllama) -> None:
    client = make_app(FIRST_TOKEN_TIMEOUT=1, IDLE_TIMEOUT=1, TOTAL_TIMEOUT=60).test_client()
    fake_ollama.script = Script(first_token_delay=3)  # a cold load that does not end
    silent = client.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
    assert silent.status_code == 504
    assert silent.get_json() == {"error": "the model server did not answer in time"}
    fake_ollama.script = Script(tokens=["a", "b", "c"], token_delay=3)  # silent after a token
    idle = client.post("/api/chat", json={"model": MODEL, "stream": False,
                                          "messages": [{"role": "user", "content": "x"}]})
    assert idle.status_code == 504
    assert fake_ollama.client_closed.wait(5)
    assert fake_ollama.tokens_sent == 1


def test_upstream_errors_keep_their_status_and_body(client: ollama.Client, fake: FakeOllama
                                                    ) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="nope:1b", messages=[{"role": "user", "content": "hi"}])
    assert (info.value.status_code, info.value.error) == (404, "model 'nope:1b' not found")
    fake.script = Script(status=400, error_text="registry.ollama.ai/x does not support tools")
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=False)
    assert info.value.status_code == 400 and "does not support tools" in info.value.error


def test_an_error_line_mid_stream_is_relayed(client: ollama.Client, fake: FakeOllama) -> None:
    fake.script = Script(error_after=2, error_text="an error was encountered while running")
    with pytest.raises(ollama.ResponseError) as info:
        for _ in client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                             stream=True):
            pass
    assert info.value.error == "an error was encountered while running"


def test_a_dropped_stream_ends_with_an_error_line(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(drop_after=2)
    response = requests.post(server.url + "/api/chat", timeout=10,
                             json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    lines = response.text.splitlines()
    assert len(lines) == 3 and "" not in lines
    assert json.loads(lines[-1]) == {
        "error": "the model server sent a broken or incomplete answer"}


def test_a_drop_after_the_last_line_is_no_error(client: ollama.Client, fake: FakeOllama) -> None:
    fake.script = Script(drop_after=5)  # four tokens and done:true, then no end of body
    parts = list(client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                             stream=True))
    assert parts[-1].done and "".join(p.message.content or "" for p in parts) == "Hello, world!"


def test_a_stream_over_its_time_ends_with_an_error_line(
    server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=[f"t{i}" for i in range(100)], token_delay=0.1)
    response = requests.post(server.url + "/api/generate", timeout=20,
                             json={"model": MODEL, "prompt": "x"})  # TOTAL_TIMEOUT is 4 s
    lines = response.text.splitlines()
    assert 10 < len(lines) < 100
    assert json.loads(lines[-1]) == {"error": "the model server did not answer in time"}
    assert fake.client_closed.wait(5)


def test_a_client_that_leaves_mid_stream_stops_ollama(
    server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=[f"t{i}" for i in range(200)], token_delay=0.05)
    with requests.post(server.url + "/api/chat", stream=True, timeout=10, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}]
    }) as response:
        assert json.loads(next(response.iter_lines()))["done"] is False
    assert fake.client_closed.wait(5)
    assert fake.tokens_sent < 200


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
    ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("POST", "/api/blobs/sha256:abc"),
])
def test_model_management_is_refused(server: Gunicorn, fake: FakeOllama, method: str,
                                     path: str) -> None:
    response = requests.request(method, server.url + path, json={"model": MODEL}, timeout=5)
    assert response.status_code == 403
    assert "model management is not available" in response.json()["error"]
    assert list(fake.requests) == []


def test_bad_bodies_get_ollama_shaped_errors(server: Gunicorn, fake: FakeOllama) -> None:
    cases = [("/api/chat", b"{nope"), ("/api/chat", b'{"stream": "yes"}'),
             ("/api/chat", b'{"model": "m", "options": {"num_predict": "lots"}}'),
             ("/api/generate", b'{"options": [1]}'), ("/api/generate", b""),
             ("/api/show", b'{"model": 7}'), ("/api/show", b"[" * 5000),
             ("/api/show", b'{"name": ["x"]}')]
    for path, body in cases:
        response = requests.post(server.url + path, data=body, timeout=5)
        assert response.status_code == 400, (path, body[:50])
        assert isinstance(response.json()["error"], str)
    missing = requests.get(server.url + "/api/nothing-here", timeout=5)
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)
    assert list(fake.requests) == []


def test_a_full_queue_is_429(client: ollama.Client, server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(first_token_delay=1.5)
    threads = [threading.Thread(target=client.generate, kwargs={"model": MODEL, "prompt": p})
               for p in ("one", "two")]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    try:
        with pytest.raises(ollama.ResponseError) as info:
            client.generate(model=MODEL, prompt="three")
        assert info.value.status_code == 429 and "busy" in info.value.error
    finally:
        for thread in threads:
            thread.join(10)


def test_a_client_that_leaves_stops_ollama(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(first_token_delay=30)
    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"model": MODEL, "prompt": "hi"}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        time.sleep(0.5)
    # The watchdog sees the client gone and shuts the upstream, long before 30 s.
    assert fake.client_closed.wait(5)
