"""Admission control: slots, the bounded queue, one turn per conversation (unit and full stack)."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from pi_agent.core.admission import Admission
from pi_agent.errors import ConversationBusy, QueueFull

from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, serving


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_admits_up_to_the_limit_then_queues_in_order() -> None:
    admission = Admission(max_concurrent=2, max_queue=3)
    tickets = [admission.enter(f"c{i}") for i in range(5)]
    assert [t.admitted for t in tickets] == [True, True, False, False, False]
    assert [admission.position(t) for t in tickets] == [0, 0, 1, 2, 3]
    admission.leave(tickets[0])
    assert tickets[2].admitted and not tickets[3].admitted
    assert [admission.position(t) for t in tickets[3:]] == [1, 2]
    assert (admission.running, admission.waiting) == (2, 2)


def test_full_queue_is_refused_with_retry_after() -> None:
    clock = Clock()
    admission = Admission(max_concurrent=1, max_queue=1, clock=clock)
    first = admission.enter("a")
    admission.enter("b")
    with pytest.raises(QueueFull) as refused:
        admission.enter("c")
    assert refused.value.code == 429 and refused.value.retry_after >= 1
    clock.now += 30  # a generation that took 30 s raises the estimate
    admission.leave(first)
    admission.enter("d")
    with pytest.raises(QueueFull) as again:
        admission.enter("e")
    assert again.value.retry_after > refused.value.retry_after


@pytest.mark.parametrize("queued", [False, True])
def test_one_turn_per_conversation(queued: bool) -> None:
    admission = Admission(max_concurrent=1, max_queue=5)
    if queued:
        admission.enter("other")
    ticket = admission.enter("same")
    with pytest.raises(ConversationBusy):
        admission.enter("same")
    admission.leave(ticket)
    admission.enter("same")


def test_leaving_the_queue_gives_the_place_back() -> None:
    admission = Admission(max_concurrent=1, max_queue=1)
    running = admission.enter("a")
    waiting = admission.enter("b")
    admission.leave(waiting)
    admission.leave(waiting)  # twice does nothing more
    admission.enter("c")
    admission.leave(running)
    assert (admission.running, admission.waiting) == (1, 0)


def test_wait_returns_when_admitted_or_timed_out() -> None:
    admission = Admission(max_concurrent=1, max_queue=1)
    running = admission.enter("a")
    waiting = admission.enter("b")
    assert admission.wait(waiting, 0.01) is False
    threading.Timer(0.05, admission.leave, args=(running,)).start()
    assert admission.wait(waiting, 5) is True


# --- through gunicorn ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with serving(tmp_path_factory.mktemp("admission") / "server.log",
                 OLLAMA_URL=upstream.url, MAX_CONCURRENT="1", MAX_QUEUE="2") as server:
        yield server


def post(server: Gunicorn, **body: object) -> requests.Response:
    return requests.post(server.url + "/chat", json={"message": "hi", **body}, timeout=30)


def test_burst_gets_three_answers_and_three_429s(
    server: Gunicorn, upstream: FakeOllama
) -> None:
    upstream.script = Script(tokens=["ok"], first_token_delay=0.5)
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(server), range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 200, 429, 429, 429]
    for refused in (r for r in responses if r.status_code == 429):
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"


def test_second_turn_of_a_running_conversation_is_409(
    server: Gunicorn, upstream: FakeOllama
) -> None:
    upstream.script = Script(tokens=["slow"], first_token_delay=1)
    before = len(upstream.chat_requests())
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, server, conversation_id="busy")
        deadline = time.monotonic() + 5
        while len(upstream.chat_requests()) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(upstream.chat_requests()) == before + 1  # the first turn is running
        second = post(server, conversation_id="busy")
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "conversation_busy"
        assert second.headers["X-Conversation-Id"] == "busy"
        assert first.result().status_code == 200
    assert post(server, conversation_id="busy").status_code == 200


def test_stream_holds_its_slot_until_the_upstream_is_closed(
    server: Gunicorn, upstream: FakeOllama
) -> None:
    # 3 s of tokens: the check after 0.2 s must come while the stream still holds the slot.
    upstream.script = Script(tokens=[f"t{i} " for i in range(30)], token_delay=0.1)
    stream = requests.post(server.url + "/chat", json={"message": "long", "stream": True},
                           stream=True, timeout=30)
    try:
        pieces = stream.iter_content(chunk_size=None)
        assert next(pieces) == b"t0 "
        upstream.script = Script(tokens=["after"])
        started = len(upstream.chat_requests())
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(post, server)
            time.sleep(0.2)
            # The slot is the stream's until it ends: the other request waits upstream-less.
            assert len(upstream.chat_requests()) == started
            assert b"".join(pieces).endswith(b"t29 ")
            assert queued.result().json()["reply"] == "after"
    finally:
        stream.close()
