"""The WSGI hosts of docs/deployment.md, each in a subprocess in front of the fake Ollama:
gunicorn with its gevent worker (the default) and its gthread worker, and waitress. Streams
come token by token, and a client that leaves is noticed on each; gunicorn.conf.py fits the
sync and gthread workers; a host set up to split the memory or to miss clients says so."""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import requests
from flask import Flask

from pi_agent.config import load_settings
from pi_agent.hosts import FirstRequestCheck, threads_needed
from pi_agent.web.client_socket import client_probe

from .conftest import wait_until
from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, RawStream, Waitress, serving, serving_waitress
from .redis_server import RedisServer

Server = Gunicorn | Waitress
SETTINGS = {"MAX_CONCURRENT": "1", "MAX_QUEUE": "2"}
THREADS = threads_needed(load_settings(SETTINGS))


def _gevent(log: Path, url: str) -> AbstractContextManager[Server]:
    return serving(log, OLLAMA_URL=url, **SETTINGS)


def _gthread(log: Path, url: str) -> AbstractContextManager[Server]:
    return serving(log, "-k", "gthread", OLLAMA_URL=url, **SETTINGS)


def _waitress(log: Path, url: str) -> AbstractContextManager[Server]:
    # mod_wsgi's name for the app: served here, where it is cheap to try.
    return serving_waitress(log, "--channel-request-lookahead=1", f"--threads={THREADS}",
                            app="wsgi:application", OLLAMA_URL=url, **SETTINGS)


HOSTS: dict[str, Callable[[Path, str], AbstractContextManager[Server]]] = {
    "gevent": _gevent, "gthread": _gthread, "waitress": _waitress,
}


@pytest.fixture(scope="module", params=sorted(HOSTS))
def host(request: pytest.FixtureRequest, upstream: FakeOllama,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp(request.param) / "server.log"
    with HOSTS[request.param](log, upstream.url) as server:
        yield server


def sent_upstream(fake: FakeOllama) -> list[str]:
    return [r["messages"][-1]["content"] for r in fake.chat_requests()]


def raw_turn(server: Server, stream: bool, **body: object) -> RawStream:
    if stream:
        return RawStream(server, "/chat/stream", **body)
    return RawStream(server, "/chat", **body)


# --- the app's look at its host -----------------------------------------------------


@pytest.mark.parametrize("memory", [True, False], ids=["memory", "no-memory"])
def test_several_processes_are_told_once_then_nothing_is_left(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture, memory: bool
) -> None:
    app = make_app(ENABLE_MEMORY=memory)
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="pi_agent.hosts"):
        for _ in range(3):
            response = client.get("/health", environ_overrides={"wsgi.multiprocess": True})
            assert response.status_code == 200
    told = [r.getMessage() for r in caplog.records if r.name == "pi_agent.hosts"]
    assert len(told) == (1 if memory else 0)
    assert all("wsgi.multiprocess" in message for message in told)
    # The look took itself out of the call chain: later requests do not pass through it.
    assert not isinstance(app.wsgi_app, FirstRequestCheck)


def test_waitress_check_is_the_client_probe() -> None:
    def client_disconnected() -> bool:
        return True

    assert client_probe({"waitress.client_disconnected": client_disconnected}) is (
        client_disconnected)
    assert client_probe({"waitress.client_disconnected": None}) is None


# --- every host ---------------------------------------------------------------------


def test_tokens_arrive_one_by_one(host: Server, fake: FakeOllama) -> None:
    tokens = [f"w{i} " for i in range(40)]
    fake.script = Script(tokens=tokens, token_delay=0.05)
    stream = RawStream(host, message="count")
    try:
        stream.read_until(b"event: token")
        # The first token is here while the upstream is still sending the others.
        assert fake.tokens_sent < len(tokens) and not fake.stream_finished.is_set()
        received = stream.read_until(b"event: done")
    finally:
        stream.close()
    assert received.count(b"event: token") == len(tokens)


def test_non_stream_turn(host: Server, fake: FakeOllama) -> None:
    reply = requests.post(host.url + "/chat", json={"message": "hi"}, timeout=10)
    assert reply.status_code == 200 and reply.json()["reply"] == "Hello, world!"
    # One process: nothing to warn about.
    assert "wsgi.multiprocess" not in host.log.read_text()


@pytest.mark.parametrize("stream", [True, False], ids=["events", "non-stream"])
def test_client_leaving_before_the_first_token(host: Server, fake: FakeOllama,
                                               stream: bool) -> None:
    fake.script = Script(tokens=["never"], first_token_delay=20)
    turn = raw_turn(host, stream, message="slow")
    try:
        assert wait_until(lambda: sent_upstream(fake) == ["slow"])
    finally:
        turn.close()
    # Without a write to fail, only the host's disconnect check can see the client go.
    assert fake.client_closed.wait(5), "the upstream call was never closed"
    fake.script = Script(tokens=["ok"])
    assert requests.post(host.url + "/chat", json={"message": "x"}, timeout=10).ok


def test_client_leaving_mid_stream(host: Server, fake: FakeOllama) -> None:
    fake.script = Script(tokens=[f"t{i} " for i in range(200)], token_delay=0.05)
    stream = RawStream(host, message="long")
    try:
        stream.read_until(b'"t2 "')
    finally:
        stream.close()
    assert fake.client_closed.wait(5), "the upstream stream was never closed"
    assert not fake.stream_finished.is_set()


@pytest.mark.parametrize("stream", [True, False], ids=["events", "non-stream"])
def test_client_leaving_while_queued(host: Server, fake: FakeOllama, stream: bool) -> None:
    conversation = f"queued-{stream}"
    assert requests.post(host.url + "/chat", timeout=10,
                         json={"message": "first", "conversation_id": conversation}).ok

    answers: list[int] = []  # what forget() got, for the message of a failure

    def forget() -> int:
        # 409 while a turn of the conversation is queued or running, 200 once it is not.
        status = requests.delete(f"{host.url}/conversations/{conversation}",
                                 timeout=10).status_code
        if not answers or answers[-1] != status:
            answers.append(status)
        return status

    fake.stream_finished.clear()
    fake.scripts["holder"] = Script(tokens=[f"t{i} " for i in range(400)], token_delay=0.05)
    holder = RawStream(host, message="holder")
    try:
        holder.read_until(b"event: token")
        queued = raw_turn(host, stream, message="queued", conversation_id=conversation)
        try:
            assert wait_until(lambda: forget() == 409), (answers, host.log.read_text()[-3000:])
        finally:
            queued.close()
        # The queued turn is gone while the holder still holds the slot: the conversation
        # is forgotten (200), or was already, by a probe that came before the queued turn.
        assert wait_until(lambda: forget() in (200, 404)), (answers,
                                                            host.log.read_text()[-3000:])
        assert not fake.stream_finished.is_set()
    finally:
        holder.close()
    fake.script = Script(tokens=["ok"])
    assert requests.post(host.url + "/chat", json={"message": "after"}, timeout=10).ok
    assert "queued" not in sent_upstream(fake) and "after" in sent_upstream(fake)


def test_health_and_cancel_while_every_slot_and_place_is_taken(
    host: Server, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=[f"t{i} " for i in range(400)], token_delay=0.05)
    turns = [RawStream(host, message="holder", conversation_id="busy-0")]
    try:
        turns[0].read_until(b"event: token")
        for place in (1, 2):  # PI_AGENT_MAX_QUEUE=2
            turns.append(RawStream(host, message="wait", conversation_id=f"busy-{place}"))
            turns[-1].read_until(b"event: queued")
        assert requests.get(host.url + "/health", timeout=10).status_code == 200
        cancel = requests.post(host.url + "/chat/busy-0/cancel", timeout=10)
        assert cancel.status_code == 200
        turns[0].read_until(b'"code":"cancelled"')
    finally:
        for turn in turns:
            turn.close()


# --- one host each ------------------------------------------------------------------


def test_sync_worker_outlives_gunicorn_timeout(fake: FakeOllama, tmp_path: Path) -> None:
    fake.script = Script(first_token_delay=3)
    with serving(tmp_path / "server.log", "-k", "sync", "--timeout", "2",
                 OLLAMA_URL=fake.url, TOTAL_TIMEOUT="5") as server:
        assert "timeout raised to 35 s for the sync worker" in server.log.read_text()
        # Longer than the 2 s given to gunicorn: without the raise the master kills it.
        reply = requests.post(server.url + "/chat", json={"message": "hi"}, timeout=20)
        assert reply.status_code == 200 and reply.json()["reply"] == "Hello, world!"
    assert "WORKER TIMEOUT" not in server.log.read_text()


def test_gthread_worker_gets_a_thread_per_turn(fake: FakeOllama, tmp_path: Path) -> None:
    with serving(tmp_path / "server.log", "-k", "gthread", "--threads", "2",
                 OLLAMA_URL=fake.url, **SETTINGS) as server:
        log = server.log.read_text()
    assert f"threads raised to {THREADS} for the gthread worker" in log
    assert "Using worker: gthread" in log


def test_several_processes_that_share_redis_do_not_warn(
    fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> None:
    """gunicorn's own -w 2 (the sync worker marks the environ multiprocess): with the Redis
    store the processes share memory, slots and cancels, so nothing is wrong."""
    with serving(tmp_path / "server.log", "-k", "sync", "-w", "2", STORE="redis",
                 REDIS_URL=redis_server.url, REDIS_PREFIX=f"{uuid.uuid4().hex}:",
                 OLLAMA_URL=fake.url) as server:
        for _ in range(10):
            assert requests.get(server.url + "/health", timeout=10).status_code == 200
        log = server.log.read_text()
    assert log.count("Booting worker") == 2 and "wsgi.multiprocess" not in log


def test_waitress_set_up_to_miss_clients_says_so(fake: FakeOllama, tmp_path: Path) -> None:
    with serving_waitress(tmp_path / "server.log", OLLAMA_URL=fake.url) as server:
        for _ in range(3):
            assert requests.get(server.url + "/health", timeout=10).status_code == 200
        log = server.log.read_text()
    assert log.count("--channel-request-lookahead=1") == 1
    needed = threads_needed(load_settings())
    assert log.count("waitress runs 4 threads") == 1 and f"--threads={needed}" in log
