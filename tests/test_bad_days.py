"""Bad days, through gunicorn with the gevent worker: clients that send half a body, read
nothing, or send what HTTP forbids (issue 13)."""
from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from pi_agent.security.keys import ApiKey, hash_key, new_key, write_keys

from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, serving

# A reply far larger than what the kernel buffers between the server and a client that
# reads nothing (a few MB at most with a small receive buffer), sent as fast as it can be.
BIG_TOKEN = "x" * 4096
BIG_REPLY = [BIG_TOKEN] * 5000


def connect(server: Gunicorn, receive_buffer: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    return sock


def post_head(path: str, length: int, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json",
             f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_all(sock: socket.socket, seconds: float = 10) -> bytes:
    """Read until the server closes the connection, within ``seconds``."""
    deadline = time.monotonic() + seconds
    received = b""
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not data:
            break
        received += data
    return received


def chat_until_served(server: Gunicorn, seconds: float) -> tuple[int, float]:
    """Ask for a chat until it is answered 200 (or ``seconds`` pass): status and when."""
    deadline = time.monotonic() + seconds
    status = 0
    while time.monotonic() < deadline:
        try:
            status = requests.post(server.url + "/chat", json={"message": "hi"},
                                   timeout=5).status_code
        except requests.RequestException:
            status = -1
        if status == 200:
            break
        time.sleep(0.2)
    return status, time.monotonic()


@pytest.fixture(scope="module")
def unread_server(upstream: FakeOllama,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with serving(tmp_path_factory.mktemp("unread") / "server.log", OLLAMA_URL=upstream.url,
                 MAX_CONCURRENT="1", MAX_QUEUE="0", TOTAL_TIMEOUT="3",
                 IDLE_TIMEOUT="60", ENABLE_MEMORY="false") as server:
        yield server


@pytest.mark.parametrize("path, body, accept", [
    ("/chat/stream", {"message": "write a lot"}, "text/event-stream"),
    ("/chat", {"message": "write a lot", "stream": True}, "text/plain"),
    ("/chat", {"message": "write a lot", "stream": True}, "application/x-ndjson"),
    ("/v1/chat/completions", {"model": "llama3.2:1b", "stream": True,
                              "messages": [{"role": "user", "content": "write a lot"}]},
     "*/*"),
    ("/api/chat", {"model": "llama3.2:1b",
                   "messages": [{"role": "user", "content": "write a lot"}]}, "*/*"),
])
def test_stream_nobody_reads_ends_at_the_total_timeout(
        unread_server: Gunicorn, fake: FakeOllama, path: str, body: dict[str, object],
        accept: str) -> None:
    """A client that reads nothing holds a write up; the total timeout still ends the
    turn, closing that client's connection and giving the only slot back."""
    server = unread_server
    fake.script = Script(tokens=BIG_REPLY)
    payload = json.dumps(body).encode()
    sock = connect(server, receive_buffer=4096)
    try:
        started = time.monotonic()
        sock.sendall(post_head(path, len(payload), f"Accept: {accept}") + payload)
        # The only slot is taken: another chat is refused while the reply is written.
        time.sleep(1)
        busy = requests.post(server.url + "/chat", json={"message": "hi"}, timeout=5)
        assert busy.status_code == 429, busy.text
        # Nothing is read; the turn ends at its total time (3 s) and the slot is free.
        status, served = chat_until_served(server, seconds=15)
        assert status == 200
        assert served - started < 10
        # The client's connection was closed: what it buffered ends, it is not kept.
        received = read_all(sock, seconds=10)
        assert received.startswith(b"HTTP/1.1 200")
        assert len(received) < len(BIG_REPLY) * len(BIG_TOKEN)
    finally:
        sock.close()
    assert "closed a client that read nothing for too long (timeout)" in \
        server.log.read_text()


@pytest.fixture(scope="module")
def strict_server(upstream: FakeOllama,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """Few connections and a short body deadline: half-sent bodies fill the worker fast."""
    with serving(tmp_path_factory.mktemp("strict") / "server.log", "--worker-connections",
                 "40", OLLAMA_URL=upstream.url, BODY_TIMEOUT="2", MAX_CONCURRENT="2") as server:
        yield server


def exchange(server: Gunicorn, data: bytes, seconds: float = 10) -> tuple[bytes, float]:
    """Send ``data`` on a new connection and read until the server closes it: what came
    back and how long it took."""
    sock = connect(server)
    try:
        started = time.monotonic()
        sock.sendall(data)
        received = read_all(sock, seconds)
        return received, time.monotonic() - started
    finally:
        sock.close()


def test_half_sent_bodies_get_408_while_others_are_served(
        strict_server: Gunicorn, fake: FakeOllama) -> None:
    server = strict_server
    attackers = [connect(server) for _ in range(100)]  # more than the 40 connections
    try:
        for sock in attackers:
            sock.sendall(post_head("/chat", 100) + b'{"message"')
        started = time.monotonic()
        health = requests.get(server.url + "/health", timeout=20)
        assert health.status_code == 200
        chat = requests.post(server.url + "/chat", json={"message": "hi"}, timeout=20)
        assert chat.status_code == 200
        assert chat.json()["reply"] == "Hello, world!"
        # Each deadline frees a connection: three rounds of 2 s, not forever.
        assert time.monotonic() - started < 15
        answers = [read_all(sock, seconds=15) for sock in attackers]
    finally:
        for sock in attackers:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), \
        {answer[:40] for answer in answers}
    assert b'"code":"request_timeout"' in answers[0]
    assert len(fake.chat_requests()) == 1  # only the normal client's chat went upstream


def test_body_that_trickles_gets_408_at_its_deadline(strict_server: Gunicorn) -> None:
    """A byte a second keeps every read short, but the whole body has a deadline."""
    sock = connect(strict_server)
    try:
        started = time.monotonic()
        sock.sendall(post_head("/chat", 1000))
        received = b""
        for _ in range(30):  # at most 30 s
            try:
                sock.sendall(b" ")
            except OSError:
                break
            time.sleep(0.5)
            sock.settimeout(0.5)
            try:
                received += sock.recv(65536)
            except TimeoutError:
                continue
            if received:
                break
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert elapsed < 2 + 1000 / 4096 + 3


def test_huge_chunk_size_is_400_at_once(strict_server: Gunicorn) -> None:
    head = (b"POST /chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    for size in (b"F" * 24, b"%x" % (64 * 1024 + 1)):
        received, elapsed = exchange(strict_server, head + size + b"\r\n{\"mess")
        assert received.startswith(b"HTTP/1.1 400 "), received
        assert elapsed < 1.5  # not the 2 s body deadline


def test_oversized_body_is_413_without_100_continue(strict_server: Gunicorn) -> None:
    received, elapsed = exchange(strict_server, post_head(
        "/chat", 100_000_000, "Expect: 100-continue"))
    assert received.startswith(b"HTTP/1.1 413 "), received
    assert b"100 Continue" not in received
    assert elapsed < 1.5  # answered, and the connection closed, at once
    # A body within the limit is still invited.
    payload = b'{"message": "hi"}'
    sock = connect(strict_server)
    try:
        sock.sendall(post_head("/chat", len(payload), "Expect: 100-continue"))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
    finally:
        sock.close()


@pytest.mark.parametrize("request_head, message", [
    (b"GET /health HTTP/1.1\r\n\r\n", b"Host"),
    (b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: identity, chunked\r\n\r\n11\r\n{\"message\": \"hi\"}\r\n0\r\n\r\n",
     b"Transfer-Encoding"),
    (b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"TE: identity, chunked\r\nContent-Length: 17\r\n\r\n{\"message\": \"hi\"}", b"TE"),
], ids=["no-host", "transfer-encoding", "te"])
def test_what_http_forbids_is_400(strict_server: Gunicorn, fake: FakeOllama,
                                  request_head: bytes, message: bytes) -> None:
    received, elapsed = exchange(strict_server, request_head)
    assert received.startswith(b"HTTP/1.1 400 "), received
    assert b'"code":"bad_request"' in received and message in received
    assert elapsed < 1.5  # and the connection is closed after it
    assert not fake.chat_requests()


def test_http_1_0_without_host_is_served(strict_server: Gunicorn) -> None:
    received, _ = exchange(strict_server, b"GET /health HTTP/1.0\r\n\r\n")
    assert received.startswith(b"HTTP/1.0 200 ") or received.startswith(b"HTTP/1.1 200 ")


def test_doubled_slashes_are_not_redirected(strict_server: Gunicorn) -> None:
    response = requests.post(strict_server.url + "//api//pull", json={"model": "x"},
                             headers={"Host": "evil.example"}, allow_redirects=False, timeout=5)
    assert response.status_code == 404
    assert "Location" not in response.headers
    assert "evil.example" not in response.text


def test_query_strings_stay_out_of_the_access_log(strict_server: Gunicorn) -> None:
    secret = "pia_" + "s3cret" * 5
    agent = "query-test-" + uuid.uuid4().hex  # this request's own line, not an earlier one
    response = requests.get(strict_server.url + "/health?api_key=" + secret, timeout=5,
                            headers={"User-Agent": agent})
    assert response.status_code == 200
    deadline = time.monotonic() + 5
    while agent not in strict_server.log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert secret not in strict_server.log.read_text()


def test_memory_is_bounded_in_bytes_and_per_key(
        upstream: FakeOllama, fake: FakeOllama, tmp_path: Path) -> None:
    keys = {"a": new_key(), "b": new_key()}
    write_keys(str(tmp_path / "keys.json"),
               [ApiKey(id=f"key_{name}", name=name, hash=hash_key(key))
                for name, key in keys.items()])
    # 64 KiB of memory, 3 conversations per key; replies of 4,000 characters.
    fake.script = Script(tokens=["y" * 1000] * 4)
    with serving(tmp_path / "server.log", OLLAMA_URL=upstream.url,
                 KEYS_FILE=str(tmp_path / "keys.json"), MEMORY_MAX_PER_KEY="3",
                 MEMORY_MAX_BYTES="65536", MAX_MESSAGE_CHARS="4000",
                 NUM_CTX="65536") as server:  # the bytes bound memory, not the context

        def chat(key: str, conversation_id: str, message: str) -> None:
            response = requests.post(server.url + "/chat", headers={"X-API-Key": keys[key]},
                                     json={"message": message,
                                           "conversation_id": conversation_id}, timeout=10)
            assert response.status_code == 200, response.text

        def listed(key: str) -> list[str]:
            response = requests.get(server.url + "/conversations",
                                    headers={"X-API-Key": keys[key]}, timeout=5)
            return [c["conversation_id"] for c in response.json()["conversations"]]

        def history(key: str, conversation_id: str) -> list[dict[str, str]]:
            response = requests.get(server.url + "/conversations/" + conversation_id,
                                    headers={"X-API-Key": keys[key]}, timeout=5)
            return response.json()["turns"] if response.status_code == 200 else []

        def kept_bytes(key: str, conversation_id: str) -> int:
            return len(conversation_id) + sum(len(t["user"].encode()) + len(
                t["assistant"].encode()) for t in history(key, conversation_id))

        chat("b", "b-only", "remember me")
        for i in range(6):  # key a makes 6 conversations: it keeps its last 3
            chat("a", f"a-{i}", "hello")
        assert listed("a") == ["a-5", "a-4", "a-3"]
        assert history("a", "a-2") == []
        assert listed("b") == ["b-only"]  # never another key's
        assert [t["user"] for t in history("b", "b-only")] == ["remember me"]
        # Filling the budget with 8,000-byte turns: the total stays under it.
        for i in range(12):
            chat("a", "a-5", "x" * 4000)
        assert 0 < kept_bytes("a", "a-5") + kept_bytes("b", "b-only") <= 65536
        assert len(history("a", "a-5")) < 10  # the turn bound alone (10) would keep more
        # The key that keeps the most bytes gave way: its own older conversations went,
        # then the oldest turns of this one; the other key's conversation is still there.
        assert listed("a") == ["a-5"]
        assert listed("b") == ["b-only"]
        assert [t["user"] for t in history("b", "b-only")] == ["remember me"]
