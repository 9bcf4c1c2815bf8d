"""The Redis store (PI_AGENT_STORE=redis): two gateways on one Redis share conversations,
their owners, one turn at a time per conversation, each key's bucket of requests and its
tokens of the day; Redis frozen or stopped answers 503 store_unavailable where a
conversation is needed, the limits count per gateway meanwhile, the rest keeps working, and
all of it comes back with Redis."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from pi_agent.core.admission import SHARED_RETRY_SECONDS, Admission
from pi_agent.errors import ConversationBusy, QueueFull, RateLimited, StoreUnavailable
from pi_agent.memory import Turn
from pi_agent.security.keys import ApiKey
from pi_agent.security.limits import Limits
from pi_agent.stores.redis import BREAKER_SECONDS, RedisStore

from .fake_ollama import FakeOllama, Script
from .conftest import unused_port, wait_until
from .live_server import (
    ROOT,
    STARTUP_SECONDS,
    Gunicorn,
    RawStream,
    gunicorn_command,
    serving,
    server_env,
)
from .redis_server import RedisServer
from .test_gunicorn import child_pids
from .test_security import create_key

ANSWER = "Hello, world!"


def post(url: str, path: str, key: str, **body: Any) -> requests.Response:
    return requests.post(url + path, json=body, headers={"X-API-Key": key}, timeout=30)


def get(url: str, path: str, key: str) -> requests.Response:
    return requests.get(url + path, headers={"X-API-Key": key}, timeout=30)


def test_two_gateways_share_conversations_owners_and_tokens(
    fake: FakeOllama, redis_server: RedisServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.json"
    ada = create_key(keys, capsys, "--name", "ada", "--tokens-per-day", "100")
    bob = create_key(keys, capsys, "--name", "bob")
    limited = create_key(keys, capsys, "--name", "limited", "--rpm", "2")
    settings = {"STORE": "redis", "REDIS_URL": redis_server.url, "KEYS_FILE": str(keys),
                "REDIS_PREFIX": f"{uuid.uuid4().hex}:", "OLLAMA_URL": fake.url}
    with serving(tmp_path / "a.log", **settings) as one, \
            serving(tmp_path / "b.log", **settings) as other:
        first = post(one.url, "/chat", ada, message="q0", conversation_id="shared")
        assert first.json()["reply"] == ANSWER
        # The other gateway continues it: its prompt carries the first turn.
        assert post(other.url, "/chat", ada, message="q1",
                    conversation_id="shared").status_code == 200
        sent = fake.chat_requests()[-1]["messages"]
        assert [m["content"] for m in sent if m["role"] == "user"] == ["q0", "q1"]
        turns = get(one.url, "/conversations/shared", ada).json()["turns"]
        assert [t["user"] for t in turns] == ["q0", "q1"]
        # Another key's, on either gateway.
        assert get(other.url, "/conversations/shared", bob).status_code == 404
        assert post(other.url, "/chat", bob, message="mine?",
                    conversation_id="shared").status_code == 404
        # The tokens of the day, read by a gateway that counted none of them.
        with serving(tmp_path / "c.log", **settings) as third:
            standing = get(third.url, "/conversations", ada)
            assert standing.headers["X-RateLimit-Remaining-Tokens"] == str(100 - 2 * 4)
        assert requests.delete(other.url + "/conversations/shared", timeout=10,
                               headers={"X-API-Key": ada}).status_code == 200
        assert get(one.url, "/conversations/shared", ada).status_code == 404
        # One bucket of requests for a key, whichever gateway they reach.
        statuses = [get(url, "/conversations", limited).status_code
                    for url in (one.url, other.url, one.url)]
        assert statuses == [200, 200, 429]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to freeze and stop."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


def _store_unavailable(response: requests.Response) -> bool:
    return (response.status_code == 503 and response.headers.get("Retry-After") == "5"
            and response.json()["error"]["code"] == "store_unavailable")


def test_redis_frozen_or_gone_is_503_where_a_conversation_is_needed(
    fake: FakeOllama, own_redis: RedisServer, tmp_path: Path
) -> None:
    with serving(tmp_path / "server.log", STORE="redis", REDIS_URL=own_redis.url,
                 OLLAMA_URL=fake.url, READY_CACHE_SECONDS="0") as server:
        assert requests.post(server.url + "/chat", json={
            "message": "q0", "conversation_id": "c"}, timeout=10).status_code == 200
        own_redis.freeze()
        try:
            _check_degraded(server, own_redis.url)
        finally:
            own_redis.thaw()
        # Back within the breaker's second: the conversation is where it was.
        deadline = time.monotonic() + 1 + 3
        while requests.get(server.url + "/ready", timeout=10).json()["status"] != "ready":
            assert time.monotonic() < deadline, "the store did not come back"
            time.sleep(0.1)
        again = requests.post(server.url + "/chat", timeout=10,
                              json={"message": "q1", "conversation_id": "c"})
        assert again.status_code == 200 and again.json()["history"]["turns"] == 1
        own_redis.stop()
        _check_degraded(server, own_redis.url)
    assert "Traceback" not in server.log.read_text()


def _check_degraded(server: Gunicorn, redis_url: str) -> None:
    """Requests that name or list a conversation: 503, each within a second (the client's
    timeout is far above it); a chat of a new conversation, one that remembers nothing and
    /health still answer; /ready says what is wrong."""
    for response in (
        requests.post(server.url + "/chat", timeout=10,
                      json={"message": "q", "conversation_id": "c"}),
        requests.get(server.url + "/conversations", timeout=10),
        requests.get(server.url + "/conversations/c", timeout=10),
    ):
        assert _store_unavailable(response), response.text
        assert response.elapsed.total_seconds() < 1.0
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    relayed = requests.post(server.url + "/api/chat", timeout=10, json={
        "model": "llama3.2:1b", "stream": False,
        "messages": [{"role": "user", "content": "hi"}]})
    assert relayed.status_code == 200
    fresh = requests.post(server.url + "/chat", json={"message": "new"}, timeout=10)
    assert fresh.status_code == 200 and fresh.json()["reply"] == ANSWER
    ready = requests.get(server.url + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.elapsed.total_seconds() < 1.0
    assert ready.json()["status"] == "degraded"
    assert ready.json()["reason"].startswith(f"redis at {redis_url} does not answer")


def _store(server: RedisServer, prefix: str, **options: Any) -> RedisStore:
    return RedisStore(server.url, max_turns=10, ttl_seconds=600, max_conversations=100,
                      prefix=prefix, sweep_seconds=0, **options)


def test_a_claim_holds_a_conversation_in_every_gateway_until_it_ends_or_runs_out(
    redis_server: RedisServer
) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    # Leases of 1.5 s, renewed every 0.5 s: a stall of the test process under half a
    # second must not let one lapse.
    one = _store(redis_server, prefix, claim_seconds=1.5)
    other = _store(redis_server, prefix, claim_seconds=1.5)
    try:
        held = one.claim("c")
        with pytest.raises(ConversationBusy):
            other.claim("c")
        time.sleep(3.5)  # past the lease: renewed while held
        with pytest.raises(ConversationBusy):
            other.claim("c")
        one.append("c", Turn("q0", "a"), claim=held)
        one.let_go("c", held)
        other.claim("c")
        # A turn whose claim was lost (taken by another) counts its tokens only.
        one.append("c", Turn("late", "a"), claim=held, spent={("key_a", "2026-12-05"): 3})
        assert [t.user for t in other.history("c")] == ["q0"]
        assert other.tokens_used("key_a", "2026-12-05") == 3
        other.close()  # a gateway that dies: its claim is not renewed, and runs out
        deadline = time.monotonic() + 10
        while True:
            try:
                one.let_go("c", one.claim("c"))
                break
            except ConversationBusy:
                assert time.monotonic() < deadline, "the claim did not run out"
                time.sleep(0.1)
    finally:
        one.close()
        other.close()


def test_a_second_turn_of_a_conversation_on_another_gateway_is_409(
    fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = {"STORE": "redis", "REDIS_URL": redis_server.url,
                "REDIS_PREFIX": f"{uuid.uuid4().hex}:", "OLLAMA_URL": fake.url}
    fake.script = Script(tokens=["tok1 ", "tok2 ", "tok3"], token_delay=1.0)
    with serving(tmp_path / "a.log", **settings) as one, \
            serving(tmp_path / "b.log", **settings) as other:
        stream = RawStream(one, message="q0", conversation_id="c")
        try:
            stream.read_until(b"tok1")  # the turn runs on the first gateway
            busy = requests.post(other.url + "/chat", timeout=10,
                                 json={"message": "q1", "conversation_id": "c"})
            assert busy.status_code == 409
            assert busy.json()["error"]["code"] == "conversation_busy"
            elsewhere = requests.post(other.url + "/chat", timeout=30,
                                      json={"message": "q", "conversation_id": "d"})
            assert elsewhere.status_code == 200
            stream.read_until(b"tok3")
            # The end of the chunked body (after a chunk's own CRLF: a header such as
            # X-Request-ID may end in "0" too): remembered
            stream.read_until(b"\r\n0\r\n\r\n")
        finally:
            stream.close()
        fake.script = Script()
        assert requests.post(other.url + "/chat", timeout=30, json={
            "message": "q1", "conversation_id": "c"}).json()["history"]["turns"] == 1


# Holds Redis up for ARGV[1] seconds, as a slow disk or a long command of another client.
STALL = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local start = now()
while now() - start < tonumber(ARGV[1]) do end
return 1
"""


def stalled(server: RedisServer) -> bool:
    """Whether Redis is busy with the stall: a PING is not answered."""
    probe = redis.Redis.from_url(server.url, socket_timeout=0.05)
    try:
        probe.ping()
        return False
    except redis.TimeoutError:
        return True
    finally:
        probe.close()


def test_a_write_that_timed_out_is_not_run_twice(redis_server: RedisServer) -> None:
    """A write that Redis was too slow to answer: the store says 503 and does not send it
    again (a retry after a timeout stored the turn and counted its tokens twice)."""
    store = _store(redis_server, f"{uuid.uuid4().hex}:")
    staller = redis.Redis.from_url(redis_server.url)
    stall = threading.Thread(target=lambda: staller.eval(STALL, 0, 1.0))
    try:
        stall.start()
        assert wait_until(lambda: stalled(redis_server), 2)
        with pytest.raises(StoreUnavailable):
            store.append("c", Turn("q", "a"), spent={("key_a", "2026-12-05"): 5})
        stall.join()
        time.sleep(BREAKER_SECONDS)  # the store asks Redis again after its breaker's second
        # Redis may have read the write before its client gave up, or not: once at most.
        assert [t.user for t in store.history("c")] in ([], ["q"])
        assert store.tokens_used("key_a", "2026-12-05") in (0, 5)
    finally:
        stall.join()
        staller.close()
        store.close()


def test_two_gateways_fill_one_bucket_and_one_day(redis_server: RedisServer) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    one_store, other_store = _store(redis_server, prefix), _store(redis_server, prefix)
    one = Limits(ledger=one_store, shared=one_store)
    other = Limits(ledger=other_store, shared=other_store)
    key = ApiKey(id="key_a", name="a", hash="0" * 64, rpm=3, tokens_per_day=10)
    try:
        requests_left = [gateway.admit(key)[0] for gateway in (one, other, one)]
        assert [s.remaining for s in requests_left if s is not None] == [2, 1, 0]
        with pytest.raises(RateLimited) as refused:
            other.admit(key)
        assert refused.value.retry_after >= 1
        # The tokens a turn on one gateway spent, seen by the other at its next request.
        day = datetime.now(timezone.utc).date().isoformat()
        assert one.add_tokens(key, 10) == day
        one_store.spend({(key.id, day): 10})
        no_rpm = ApiKey(id="key_a", name="a", hash="0" * 64, tokens_per_day=10)
        with pytest.raises(RateLimited, match="tokens"):
            other.admit(no_rpm)
        _, tokens = other.admit(no_rpm, spends_tokens=False)
        assert tokens is not None and tokens.remaining == 0
    finally:
        one_store.close()
        other_store.close()


def test_limits_count_on_their_own_while_redis_is_down(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(own_redis, "down:")
    limits = Limits(ledger=store, shared=store)
    key = ApiKey(id="key_a", name="a", hash="0" * 64, rpm=2)
    spent = ApiKey(id="key_b", name="b", hash="0" * 64, tokens_per_day=5)
    try:
        store.spend({("key_b", datetime.now(timezone.utc).date().isoformat()): 5})
        with pytest.raises(RateLimited, match="tokens"):
            limits.admit(spent)  # read in Redis: used up
        own_redis.stop()
        with pytest.raises(RateLimited, match="tokens"):
            limits.admit(spent)  # still, from the last reading: no new quota
        assert limits.admit(key)[0] is not None  # counted here
        assert limits.admit(key)[0] is not None
        with pytest.raises(RateLimited):
            limits.admit(key)
        said = [r for r in caplog.records if "shared limits cannot be read" in r.getMessage()]
        assert len(said) == 1
    finally:
        store.close()


def test_a_cancel_reaches_the_gateway_whose_turn_holds_the_conversation(
    redis_server: RedisServer
) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    heard: list[str] = []
    one = _store(redis_server, prefix, on_cancel=heard.append)
    other = _store(redis_server, prefix)
    try:
        held = one.claim("c", "key_a")
        assert not other.cancel_elsewhere("c", "key_b", admin=False)  # not bob's turn
        assert not other.cancel_elsewhere("d", "key_a", admin=False)  # no turn at all
        assert other.cancel_elsewhere("c", "key_a", admin=False)
        # Heard through Redis's publish: the claim's renewal, which would find the cancel
        # too, comes only after 10 s.
        deadline = time.monotonic() + 3
        while heard != ["c"]:
            assert time.monotonic() < deadline, heard
            time.sleep(0.02)
        assert other.cancel_elsewhere("c", "key_admin", admin=True)
        one.let_go("c", held)
        assert not other.cancel_elsewhere("c", "key_a", admin=False)  # that turn has ended
    finally:
        one.close()
        other.close()


def test_a_stream_on_one_gateway_is_cancelled_from_the_other(
    fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = {"STORE": "redis", "REDIS_URL": redis_server.url,
                "REDIS_PREFIX": f"{uuid.uuid4().hex}:", "OLLAMA_URL": fake.url}
    fake.script = Script(tokens=[f"tok{i} " for i in range(30)], token_delay=0.5)
    with serving(tmp_path / "a.log", **settings) as one, \
            serving(tmp_path / "b.log", **settings) as other:
        stream = RawStream(one, message="q0", conversation_id="c")
        try:
            stream.read_until(b"tok1")
            cancelled = requests.post(other.url + "/chat/c/cancel", timeout=10)
            assert cancelled.status_code == 200, cancelled.text
            assert cancelled.json()["status"] == "cancelling"
            # The stream ended at once (published), not at the claim's renewal 10 s later
            # nor after its 30 tokens (15 s).
            stream.read_until(b"\r\n0\r\n\r\n", seconds=3)
        finally:
            stream.close()
        (turn,) = requests.get(other.url + "/conversations/c", timeout=10).json()["turns"]
        assert turn["partial"] is True and "tok29" not in turn["assistant"]
        assert requests.post(other.url + "/chat/c/cancel", timeout=10).status_code == 404


# --- generation slots shared by every gateway ------------------------------------------


def test_slots_are_leases_that_every_gateway_counts_and_that_run_out(
    redis_server: RedisServer
) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    one = _store(redis_server, prefix, claim_seconds=1.5)
    other = _store(redis_server, prefix, claim_seconds=1.5)
    try:
        lease = one.take_slot("pi:11434", 1)
        assert lease and other.take_slot("pi:11434", 1) == ""
        assert other.take_slot("pi2:11434", 1)  # each upstream has slots of its own
        time.sleep(3.5)  # past the lease: renewed while held
        assert other.take_slot("pi:11434", 1) == ""
        one.give_slot("pi:11434", lease)
        second = other.take_slot("pi:11434", 1)
        assert int(second.split()[0]) > int(lease.split()[0])  # the fence only grows
        one.give_slot("pi:11434", lease)  # an ended lease ends no later one
        assert one.take_slot("pi:11434", 1) == ""
        other.close()  # a gateway that dies: its leases are not renewed, and run out
        deadline = time.monotonic() + 10
        while not one.take_slot("pi:11434", 1):
            assert time.monotonic() < deadline, "the lease did not run out"
            time.sleep(0.1)
    finally:
        one.close()
        other.close()


def test_two_admissions_share_slots_and_queue_places_and_count_alone_without_redis(
    redis_server: RedisServer
) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    one, other = _store(redis_server, prefix), _store(redis_server, prefix)
    gone = RedisStore(f"redis://127.0.0.1:{unused_port()}/0", max_turns=10, ttl_seconds=600,
                      max_conversations=100, sweep_seconds=0)
    try:
        here = Admission(1, 1, upstreams=["pi:11434"], shared=one)
        there = Admission(1, 1, upstreams=["pi:11434"], shared=other)
        running = here.enter("c1")
        assert running.admitted and running.lease
        waiting = there.enter("c2")
        assert not waiting.admitted and there.position(waiting) == 1 and waiting.place
        # The queue's one place is taken on the other gateway: this one's is full too.
        with pytest.raises(QueueFull):
            here.enter("c3")
        assert not there.wait(waiting, 0.5)
        here.leave(running)
        # Nothing here tells the other gateway: its waiting ticket looks again by itself.
        assert there.wait(waiting, 3) and waiting.upstream == "pi:11434"
        assert waiting.place == ""  # its place in the queue is given back
        queued = here.enter("c3")
        assert not queued.admitted and queued.place
        here.leave(queued)  # leaving the queue gives the place back
        there.leave(waiting)
        assert here.enter("c4").admitted
        alone = Admission(1, 4, upstreams=["pi:11434"], shared=gone)  # its own bound
        started = time.monotonic()
        ticket = alone.enter("c3")
        assert ticket.admitted and ticket.lease == "" and alone.on_my_own
        assert time.monotonic() - started < 1.5
        with pytest.raises(QueueFull):  # its own count holds meanwhile
            for i in range(5):
                alone.enter(f"d{i}")
    finally:
        for store in (one, other, gone):
            store.close()


def test_a_freed_slot_goes_to_the_turn_that_waited_longest_in_any_gateway(
    redis_server: RedisServer
) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    one, other = _store(redis_server, prefix), _store(redis_server, prefix)
    try:
        here = Admission(1, 4, upstreams=["pi:11434"], shared=one)
        there = Admission(1, 4, upstreams=["pi:11434"], shared=other)
        running = here.enter("c1")
        first = there.enter("c2")  # waits on the other gateway, first
        second = here.enter("c3")  # waits here, after it
        here.leave(running)
        # The gateway that freed the slot does not hand it to its own waiting turn.
        assert not second.admitted and here.position(second) == 1
        assert there.wait(first, 3)
        assert not here.wait(second, 0.5)
        there.leave(first)
        assert here.wait(second, 3)
        here.leave(second)
        # Another gateway's Ollama at 127.0.0.1 is not this one's: a loopback upstream's
        # slots are counted under this host's name.
        lease = one.take_slot("127.0.0.1:11434", 1)
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            assert raw.zrange(f"{prefix}slots:{socket.gethostname()}/127.0.0.1:11434",
                              0, -1) == [lease]
        finally:
            raw.close()
    finally:
        one.close()
        other.close()


def test_turns_that_waited_while_redis_was_away_are_not_stuck_behind_later_ones(
    own_redis: RedisServer
) -> None:
    store = _store(own_redis, f"{uuid.uuid4().hex}:")
    try:
        admission = Admission(1, 4, upstreams=["pi:11434"], shared=store)
        running = admission.enter("c1")
        own_redis.freeze()
        try:
            early = admission.enter("c2")  # waits with no place in Redis: it is away
        finally:
            own_redis.thaw()
        assert not early.admitted and early.place == "" and admission.on_my_own
        time.sleep(SHARED_RETRY_SECONDS)  # then Redis is asked again
        late = admission.enter("c3")
        assert not late.admitted and late.place
        admission.leave(running)
        # Neither holds the other up for ever: one gets the slot (the late one, whose place
        # in Redis is older), then the other. Both wait as turns do, looking in turn.
        deadline = time.monotonic() + 10  # a place of the command that timed out may last 6 s
        while not (early.admitted or late.admitted):
            assert time.monotonic() < deadline, "both were stuck"
            admission.wait(early, 0.1)
            admission.wait(late, 0.1)
        assert early.admitted != late.admitted
        first, then = (early, late) if early.admitted else (late, early)
        admission.leave(first)
        deadline = time.monotonic() + 10
        while not admission.wait(then, 0.1):
            assert time.monotonic() < deadline, "the other one was stuck"
        admission.leave(then)
        assert admission.enter("c4").admitted  # nothing was left held
    finally:
        store.close()


def test_an_upstreams_slot_limit_holds_across_gateways_and_a_killed_worker_frees_it(
    fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = {"STORE": "redis", "REDIS_URL": redis_server.url, "MAX_CONCURRENT": "1",
                "REDIS_PREFIX": f"{uuid.uuid4().hex}:", "OLLAMA_URL": fake.url,
                "REDIS_LEASE_SECONDS": "3", "HEARTBEAT_SECONDS": "1"}
    fake.script = Script(tokens=[f"tok{i} " for i in range(100)], token_delay=0.2)
    with serving(tmp_path / "a.log", **settings) as one, \
            serving(tmp_path / "b.log", **settings) as other:
        running = RawStream(one, message="q0", conversation_id="c1")
        waiting: RawStream | None = None
        try:
            running.read_until(b"tok1 ")
            waiting = RawStream(other, message="q1", conversation_id="c2")
            waiting.read_until(b"event: queued")
            time.sleep(1)  # still queued: the one slot is the other gateway's
            assert len(fake.chat_requests()) == 1 and b"tok0" not in waiting.received
            (worker,) = child_pids(one.process.pid)
            os.kill(worker, signal.SIGKILL)
            killed = time.monotonic()
            # The dead worker's lease is renewed no more: the slot is free within it.
            waiting.read_until(b"tok0 ", seconds=10)
            assert time.monotonic() - killed < 3 + 2, "the slot outlived its lease"
            assert len(fake.chat_requests()) == 2
        finally:
            running.close()
            if waiting is not None:
                waiting.close()


def test_two_workers_share_conversations_through_redis(
    fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = {"STORE": "redis", "REDIS_URL": redis_server.url, "WORKERS": "2",
                "REDIS_PREFIX": f"{uuid.uuid4().hex}:", "OLLAMA_URL": fake.url}
    with serving(tmp_path / "server.log", **settings) as server:
        assert len(child_pids(server.process.pid)) == 2
        for i in range(6):  # whichever worker each reaches, the conversation goes on
            reply = requests.post(server.url + "/chat", timeout=10,
                                  json={"message": f"q{i}", "conversation_id": "c"})
            assert reply.json()["history"]["turns"] == i
        fake.script = Script(tokens=[f"tok{i} " for i in range(30)], token_delay=0.2)
        stream = RawStream(server, message="q6", conversation_id="c")
        try:
            stream.read_until(b"tok0 ")
            statuses = {requests.post(server.url + "/chat", timeout=10, json={
                "message": "again", "conversation_id": "c"}).status_code for _ in range(6)}
            assert statuses == {409}  # on either worker
        finally:
            stream.close()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_several_workers_without_redis_are_refused_with_one_line(
    tmp_path: Path, store: str
) -> None:
    result = subprocess.run(
        gunicorn_command(), cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_SECONDS,
        env=server_env(BIND="127.0.0.1:0", STORE=store, WORKERS="2",
                       STATE_DIR=str(tmp_path / "state")))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"pi-agent: 2 workers need PI_AGENT_STORE=redis (the {store} store is one "
        "worker's): set PI_AGENT_WORKERS=1 or use Redis"), result.stderr
    assert "Traceback" not in result.stderr and "Booting worker" not in result.stderr
