"""Full stack: gunicorn with the project's gunicorn.conf.py and the gevent worker, in a
subprocess, in front of the fake Ollama."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from .fake_ollama import FakeOllama, Script
from .live_server import (
    ROOT,
    STARTUP_SECONDS,
    Gunicorn,
    RawStream,
    gunicorn_command,
    serving,
    server_env,
)


@pytest.fixture(scope="module")
def server(upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with serving(tmp_path_factory.mktemp("gunicorn") / "server.log", OLLAMA_URL=upstream.url,
                 MAX_CONCURRENT="4") as server:
        yield server


def open_stream(server: Gunicorn, **body: object) -> requests.Response:
    response = requests.post(
        server.url + "/chat", json={"message": "tell me", "stream": True, **body},
        stream=True, timeout=(3, 10),
    )
    assert response.status_code == 200
    return response


def test_tokens_are_flushed_one_by_one(server: Gunicorn, fake: FakeOllama) -> None:
    tokens = [f"w{i} " for i in range(20)]
    fake.script = Script(tokens=tokens, token_delay=0.05)
    with open_stream(server) as response:
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.headers["X-Accel-Buffering"] == "no"
        assert response.headers["Transfer-Encoding"] == "chunked"
        pieces = response.iter_content(chunk_size=None)
        first = next(pieces)
        # The first token is here while the fake upstream is still sending the others.
        assert not fake.stream_finished.is_set()
        assert fake.tokens_sent < len(tokens)
        rest = list(pieces)
    assert [first, *rest] == [t.encode() for t in tokens]  # one chunk frame per token


def test_disconnect_closes_upstream_within_a_second(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=[f"t{i} " for i in range(400)], token_delay=0.02)
    response = open_stream(server, conversation_id="gone-away")
    pieces = response.iter_content(chunk_size=None)
    received = next(pieces) + next(pieces)
    response.close()
    closed_by_client = time.monotonic()
    assert fake.client_closed.wait(5), "the upstream stream was never closed"
    assert fake.client_closed_at is not None
    assert fake.client_closed_at - closed_by_client < 1.0
    assert not fake.stream_finished.is_set()

    # The partial answer was remembered: it is in the next turn's history.
    fake.script = Script(tokens=["ok"])
    follow_up = requests.post(
        server.url + "/chat", json={"message": "and?", "conversation_id": "gone-away"}, timeout=10
    )
    assert follow_up.json()["reply"] == "ok"
    remembered = fake.chat_requests()[-1]["messages"][-2]
    assert remembered["role"] == "assistant"
    assert remembered["content"].startswith(received.decode())


def test_gevent_worker_serves_requests_side_by_side(server: Gunicorn, fake: FakeOllama) -> None:
    assert "Using worker: pi_agent.worker.GeventWorker" in server.log.read_text()
    fake.scripts["slow"] = Script(tokens=["late"], first_token_delay=3)
    slow: list[requests.Response] = []
    waiting = threading.Thread(target=lambda: slow.append(open_stream(server, message="slow")))
    waiting.start()
    try:
        deadline = time.monotonic() + 5
        while len(fake.chat_requests()) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        # While one request waits for its first token, another one is answered.
        fast = requests.post(server.url + "/chat", json={"message": "fast"}, timeout=10)
        assert fast.status_code == 200
        assert waiting.is_alive() and not slow
    finally:
        waiting.join(10)
        for response in slow:
            response.close()
    assert slow and slow[0].status_code == 200


def loaded_files(pid: int) -> set[str]:
    """The files mapped into a process: its shared libraries, compiled modules among them."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split()) == 6}


def child_pids(pid: int) -> list[int]:
    children = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if parent == pid:
            children.append(int(name))
    return children


def test_only_the_worker_loads_gevent(server: Gunicorn) -> None:
    master = server.process.pid
    (worker,) = child_pids(master)

    def gevent_files(pid: int) -> set[str]:
        return {path for path in loaded_files(pid) if "/gevent/" in path}

    # gevent's compiled modules are in the worker that serves the requests...
    assert gevent_files(worker), loaded_files(worker)
    # ...and not in the master, which only forks and watches it.
    assert gevent_files(master) == set()


def raw_exchange(server: Gunicorn, request: bytes) -> bytes:
    """Send raw bytes, return all that comes back until the server closes or stops."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:
            pass  # a server that answers before reading the whole body then resets
    return received


def chunked_post(body_frames: bytes) -> bytes:
    return (b"POST /chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body_frames)


def test_chunked_body_over_the_limit_is_413(server: Gunicorn, fake: FakeOllama) -> None:
    body = b'{"message": "hi"}' + b" " * (64 * 1024)  # just over the 64 KiB limit
    frames = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192])
                      for i in range(0, len(body), 8192)) + b"0\r\n\r\n"
    before = len(fake.chat_requests())
    answer = raw_exchange(server, chunked_post(frames))
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"code":"payload_too_large"' in answer
    assert len(fake.chat_requests()) == before


def test_small_chunked_body_is_read_whole(server: Gunicorn, fake: FakeOllama) -> None:
    body = b'{"message": "in chunks"}'
    answer = raw_exchange(server, chunked_post(b"5\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                                               % (body[:5], len(body) - 5, body[5:])))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert fake.chat_requests()[-1]["messages"][-1]["content"] == "in chunks"


def test_broken_chunked_body_is_400(server: Gunicorn, fake: FakeOllama) -> None:
    answer = raw_exchange(server, chunked_post(b"zz\r\n{}\r\n0\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Traceback" not in answer and b"Internal" not in answer
    assert "Traceback" not in server.log.read_text()


def test_disconnect_while_the_model_thinks_closes_upstream(
    server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(thinking=["hmm "] * 300, tokens=["answer"], token_delay=0.02)
    request = RawStream(server, "/chat", message="think hard", stream=True)
    deadline = time.monotonic() + 5
    while fake.tokens_sent < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.tokens_sent >= 5  # the model is thinking; nothing was written to us
    closed_by_client = request.close()
    assert fake.client_closed.wait(5), "the upstream stream was never closed"
    assert fake.client_closed_at is not None
    assert fake.client_closed_at - closed_by_client < 1.5
    assert not fake.stream_finished.is_set()


def test_non_stream_reply_and_errors(server: Gunicorn, fake: FakeOllama) -> None:
    reply = requests.post(server.url + "/chat", json={"message": "hi"}, timeout=10)
    assert reply.status_code == 200 and reply.json()["reply"] == "Hello, world!"
    assert reply.headers["X-Conversation-Id"] == reply.json()["conversation_id"]
    bad = requests.post(server.url + "/chat", data=b"{", timeout=10,
                        headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    fake.script = Script(tokens=["a", "b", "c"], error_after=1)
    with open_stream(server) as response:
        assert response.text == "a\n[error] the model server answered with an error\n"


def test_bad_setting_stops_startup_with_one_line() -> None:
    result = subprocess.run(
        gunicorn_command(), cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_SECONDS,
        env=server_env(BIND="127.0.0.1:0", NUM_CTX="abc"),
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("pi-agent: invalid setting PI_AGENT_NUM_CTX='abc': ")
    assert "Traceback" not in result.stderr and "Booting worker" not in result.stderr


def test_config_file_loads_neither_ssl_nor_requests() -> None:
    check = (
        "import runpy, sys; runpy.run_path('gunicorn.conf.py'); "
        "print(sorted(m for m in ('ssl', 'requests', 'flask') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True,
                            text=True, timeout=STARTUP_SECONDS, env=server_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
