"""API keys, scopes, conversation ownership, limits, CORS, secure defaults and hostile input."""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from pi_agent.cli import main as cli
from pi_agent.security.keys import (
    RELOAD_SECONDS, ApiKey, KeyRing, hash_key, new_id, new_key, read_keys, write_keys,
)

from .conftest import state, unused_port
from .fake_ollama import FakeOllama, Script
from .live_server import ROOT, gunicorn_command, server_env, serving

MODEL = "llama3.2:1b"


def create_key(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Create a key with the command-line tool; return it (the last line it printed)."""
    assert cli(["keys", "--file", str(path), "create", *args]) == 0
    out = capsys.readouterr().out
    return out.splitlines()[-1]


class Keys:
    def __init__(self, path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.path = path
        self.all = create_key(path, capsys, "--name", "all")
        self.coder = create_key(path, capsys, "--name", "coder", "--agents", "coder",
                                "--models", MODEL)
        self.admin = create_key(path, capsys, "--name", "admin", "--admin")
        self.limited = create_key(path, capsys, "--name", "limited", "--rpm", "3")
        self.tokens = create_key(path, capsys, "--name", "tokens", "--tokens-per-day", "5")
        self.revoked = create_key(path, capsys, "--name", "revoked")
        revoked_id = json.loads(path.read_text())["keys"][-1]["id"]
        assert cli(["keys", "--file", str(path), "revoke", revoked_id]) == 0
        capsys.readouterr()


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Keys:
    return Keys(tmp_path / "keys.json", capsys)


@pytest.fixture
def secured(make_app: Callable[..., Flask], keys: Keys) -> Flask:
    return make_app(KEYS_FILE=str(keys.path), CORS_ORIGINS="https://app.example")


@pytest.fixture
def client(secured: Flask) -> FlaskClient:
    return secured.test_client()


def done(response: Any) -> Any:
    """Read a response whole and close it, as a WSGI server does: a relayed body gives its
    generation slot back when it is closed."""
    response.get_data()
    response.close()
    return response


def auth(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def chat(client: FlaskClient, key: str, **body: Any) -> Any:
    return client.post("/chat", json={"message": "hi", **body}, headers=auth(key))


# --- the command-line tool ---------------------------------------------------------------


def test_keys_are_shown_once_and_stored_as_hashes(
    keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    text = keys.path.read_text()
    for key in (keys.all, keys.coder, keys.admin):
        assert re.fullmatch(r"pia_[A-Za-z0-9_-]{43}", key)
        assert key not in text
    stored = json.loads(text)["keys"]
    assert [k["name"] for k in stored] == ["all", "coder", "admin", "limited", "tokens"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", k["hash"]) for k in stored)
    assert stored[1]["agents"] == ["coder"] and stored[1]["models"] == [MODEL]
    assert stat.S_IMODE(os.stat(keys.path).st_mode) == 0o600
    # A file that a service's user reads through its group keeps its mode and group when
    # a key is added or revoked (the file is replaced, so they are set again).
    own = os.stat(keys.path).st_gid
    # root may give it any group (1: daemon); another user, one of its own.
    others = [g for g in ([1] if os.geteuid() == 0 else os.getgroups()) if g != own]
    group = others[0] if others else own
    os.chown(keys.path, -1, group)
    keys.path.chmod(0o640)
    create_key(keys.path, capsys, "--name", "later")
    assert stat.S_IMODE(os.stat(keys.path).st_mode) == 0o640
    assert os.stat(keys.path).st_gid == group
    assert cli(["keys", "--file", str(keys.path), "list"]) == 0
    listing = capsys.readouterr().out
    assert len(listing.splitlines()) == 6 and "admin" in listing
    assert keys.all not in listing and stored[0]["hash"] not in listing


def test_the_tool_refuses_mistakes(keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    before = keys.path.read_bytes()
    assert cli(["keys", "--file", str(keys.path), "create", "--name", "x",
                "--agents", "wizard"]) == 1
    assert cli(["keys", "--file", str(keys.path), "create", "--name", "x", "--rpm", "0"]) == 1
    assert cli(["keys", "--file", str(keys.path), "revoke", "key_nothing"]) == 1
    assert "unknown agent wizard" in capsys.readouterr().err
    assert keys.path.read_bytes() == before


# --- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("GET", "/agents"), ("GET", "/ready"), ("POST", "/chat"), ("POST", "/chat/stream"),
    ("POST", "/chat/c1/cancel"), ("GET", "/conversations"), ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"), ("GET", "/api/tags"), ("POST", "/api/chat"),
    ("GET", "/"),
])
def test_every_route_needs_a_key(client: FlaskClient, keys: Keys, fake_ollama: FakeOllama,
                                 method: str, path: str) -> None:
    for headers in ({}, auth("pia_wrong"), auth(keys.revoked),
                    {"Authorization": f"Basic {keys.all}"}, {"Authorization": "Bearer"}):
        response = client.open(path, method=method, json={"message": "hi"}, headers=headers)
        assert response.status_code == 401, (path, headers)
        error = response.get_json()["error"]
        if path.startswith("/v1"):
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        elif path.startswith("/api") or path == "/":
            assert isinstance(error, str)
        else:
            assert error["code"] == "invalid_api_key"
    assert list(fake_ollama.requests) == []


def test_health_and_preflight_need_no_key(client: FlaskClient) -> None:
    assert client.get("/health").status_code == 200
    preflight = client.options("/chat", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-api-key"})
    assert preflight.status_code == 200


def test_both_header_forms_are_accepted(client: FlaskClient, keys: Keys) -> None:
    assert client.get("/agents", headers={"X-API-Key": keys.all}).status_code == 200
    assert client.get("/agents", headers={"Authorization": f"Bearer {keys.all}"}).status_code == 200


def test_a_key_file_change_takes_effect_without_a_restart(
    client: FlaskClient, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    new = create_key(keys.path, capsys, "--name", "new")
    time.sleep(1.1)  # the file is looked at once a second
    assert client.get("/agents", headers=auth(new)).status_code == 200
    key_id = json.loads(keys.path.read_text())["keys"][-1]["id"]
    assert cli(["keys", "--file", str(keys.path), "revoke", key_id]) == 0
    time.sleep(1.1)
    assert client.get("/agents", headers=auth(new)).status_code == 401
    # A broken file keeps the keys read last, rather than letting everybody in or nobody.
    keys.path.write_text("{broken")
    time.sleep(1.1)
    assert client.get("/agents", headers=auth(keys.all)).status_code == 200
    assert client.get("/agents", headers=auth(new)).status_code == 401


def test_an_empty_x_api_key_does_not_hide_a_bearer_key(client: FlaskClient, keys: Keys) -> None:
    both = {"X-API-Key": "", "Authorization": f"Bearer {keys.all}"}
    assert client.get("/agents", headers=both).status_code == 200
    both = {"X-API-Key": keys.all, "Authorization": "Bearer "}
    assert client.get("/agents", headers=both).status_code == 200
    # The first that is not empty counts: a wrong one is not made good by the other.
    both = {"X-API-Key": "pia_wrong", "Authorization": f"Bearer {keys.all}"}
    assert client.get("/agents", headers=both).status_code == 401


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += RELOAD_SECONDS


def key_file_bytes(folder: Path, **named: str) -> bytes:
    """The bytes of a key file holding the keys ``named``, by name."""
    path = folder / f"scratch-{new_id()}.json"
    write_keys(str(path), [ApiKey(id=f"key_{name}", name=name, hash=hash_key(key))
                           for name, key in named.items()])
    data = path.read_bytes()
    path.unlink()
    return data


def broken_like(data: bytes) -> bytes:
    """Not a key file, of the same size as ``data``."""
    return b"{" + b" " * (len(data) - 1)


def rewrite_keeping_stamp(path: Path, data: bytes) -> None:
    """Write ``data`` over the file keeping its inode, size and mtime, as chmod and chown
    do: nothing a key ring looks at says the file changed."""
    before = os.stat(path)
    assert len(data) == before.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)


def test_a_key_file_that_comes_back_is_read_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, a, b = tmp_path / "keys.json", new_key(), new_key()
    path.write_bytes(key_file_bytes(tmp_path, a=a))
    clock = Clock()
    ring = KeyRing(str(path), clock=clock)
    fixed = key_file_bytes(tmp_path, b=b, c=new_key())  # a revoked, b and c new
    caplog.set_level(logging.WARNING, logger="pi_agent.keys")
    path.write_bytes(broken_like(fixed))
    for _ in range(3):
        clock.tick()
        found = ring.find(a)
        assert found is not None and found.name == "a"  # the keys read before
    assert [r.levelname for r in caplog.records] == ["ERROR"]  # once, not every second
    assert "stay in use" in caplog.records[0].getMessage()
    rewrite_keeping_stamp(path, fixed)
    clock.tick()
    assert ring.find(a) is None
    found = ring.find(b)
    assert found is not None and found.name == "b"
    clock.tick()
    ring.find(b)
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert "is read again: 2 keys" in caplog.records[1].getMessage()


def test_keys_are_found_by_their_hash_among_many(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = [f"pia_{i:043d}" for i in range(100_000)]
    write_keys(str(path), [ApiKey(id=f"key_{i}", name=f"n{i}", hash=hash_key(key))
                           for i, key in enumerate(keys)])
    ring = KeyRing(str(path))
    assert ring.count == 100_000
    for i in (0, 54_321, 99_999):
        found = ring.find(keys[i])
        assert found is not None and found.id == f"key_{i}"
    assert ring.find(new_key()) is None
    assert ring.find(keys[7] + "x") is None


def test_a_slow_reload_does_not_hold_up_other_requests(tmp_path: Path) -> None:
    path, a, b = tmp_path / "keys.json", new_key(), new_key()
    path.write_bytes(key_file_bytes(tmp_path, a=a))
    clock, reading, release = Clock(), threading.Event(), threading.Event()

    def offload(function: Callable[[], Any]) -> Any:
        reading.set()
        assert release.wait(10)
        return function()

    ring = KeyRing(str(path), clock=clock, offload=offload)
    write_keys(str(path), [ApiKey(id="key_b", name="b", hash=hash_key(b))])
    found: dict[str, ApiKey | None] = {}
    reloading = threading.Thread(target=lambda: found.update(b=ring.find(b)))
    other = threading.Thread(target=lambda: found.update(a=ring.find(a)))
    try:
        clock.tick()
        reloading.start()
        assert reading.wait(5)
        clock.tick()  # another reload would be due: the running one holds it off
        other.start()
        other.join(timeout=2)
        assert not other.is_alive()
        assert found["a"] is not None and found["a"].name == "a"  # the keys as they were
    finally:
        release.set()
        reloading.join(timeout=5)
    assert found["b"] is not None and found["b"].name == "b"
    assert ring.find(a) is None


def test_a_key_file_that_comes_back_is_read_again_by_the_server(
    tmp_path: Path, keys: Keys, fake: FakeOllama
) -> None:
    b = new_key()
    kept = [k for k in read_keys(str(keys.path)) if k.hash != hash_key(keys.all)]
    write_keys(str(tmp_path / "fixed.json"),
               [*kept, ApiKey(id=new_id(), name="b", hash=hash_key(b))])
    fixed = (tmp_path / "fixed.json").read_bytes()

    def status(key: str) -> int:
        return requests.get(server.url + "/agents", headers=auth(key), timeout=5).status_code

    def soon(check: Callable[[], bool], seconds: float = 5) -> bool:
        deadline = time.monotonic() + seconds
        while not check():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    with serving(tmp_path / "server.log", OLLAMA_URL=fake.url, KEYS_FILE=str(keys.path)) as server:
        empty = {"X-API-Key": "", "Authorization": f"Bearer {keys.all}"}
        assert requests.get(server.url + "/agents", headers=empty, timeout=5).status_code == 200
        keys.path.write_bytes(broken_like(fixed))
        assert soon(lambda: status(keys.all) == 200 and "stay in use" in server.log.read_text())
        time.sleep(2.2)  # two more tries, and not a line more in the log
        assert status(keys.all) == 200 and status(b) == 401
        rewrite_keeping_stamp(keys.path, fixed)
        assert soon(lambda: status(keys.all) == 401 and status(b) == 200)
    log = server.log.read_text()
    assert log.count("stay in use") == 1 and log.count("is read again:") == 1
    assert keys.all not in log and b not in log and "Traceback" not in log


@pytest.mark.parametrize("keys", [
    [{"id": "k"}],
    [{"id": "k", "name": "a", "hash": "a" * 64}, {"id": "k", "name": "b", "hash": "b" * 64}],
    [{"id": "local", "name": "a", "hash": "a" * 64}],
], ids=["incomplete", "one id twice", "reserved id"])
def test_a_broken_key_file_stops_the_app(make_app: Callable[..., Flask], tmp_path: Path,
                                         keys: list[dict[str, str]]) -> None:
    from pi_agent.config import ConfigError

    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": keys}))
    with pytest.raises(ConfigError, match="PI_AGENT_KEYS_FILE"):
        make_app(KEYS_FILE=str(path))


# --- scopes --------------------------------------------------------------------------------


def test_scopes_on_every_route(client: FlaskClient, keys: Keys, fake_ollama: FakeOllama) -> None:
    coder = auth(keys.coder)
    messages = [{"role": "user", "content": "hi"}]
    allowed = [done(r) for r in (
        client.post("/chat", json={"message": "hi", "agent": "coder"}, headers=coder),
        client.post("/v1/chat/completions", json={"model": "agent:coder", "messages": messages},
                    headers=coder),
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages},
                    headers=coder),
    )]
    allowed.append(done(client.post("/api/chat", headers=coder, json={
        "model": MODEL, "messages": messages, "stream": False})))
    allowed.append(done(client.post("/api/generate", headers=coder, json={
        "model": "llama3.2:1b", "prompt": "hi", "stream": False})))
    allowed.append(done(client.post("/api/show", json={"model": MODEL}, headers=coder)))
    assert [done(r).status_code for r in allowed] == [200] * 6
    refused = [
        client.post("/chat", json={"message": "hi"}, headers=coder),  # agent general
        client.post("/chat/stream", json={"message": "hi"}, headers=coder),
        client.post("/v1/chat/completions", json={"model": "agent:general",
                                                  "messages": messages}, headers=coder),
        client.post("/v1/chat/completions", json={"model": "qwen3:0.6b", "stream": True,
                                                  "messages": messages}, headers=coder),
        client.post("/api/chat", json={"model": "qwen3:0.6b", "messages": messages},
                    headers=coder),
        client.post("/api/generate", json={"model": "qwen3:0.6b", "prompt": "x"}, headers=coder),
        client.post("/api/show", json={"name": "qwen3:0.6b"}, headers=coder),
    ]
    assert [r.status_code for r in refused] == [403] * 7
    assert refused[2].get_json()["error"]["code"] == "permission_denied"
    assert len([r for r in fake_ollama.requests if r["_path"] != "/api/tags"]) == 6
    listed = client.get("/v1/models", headers=coder).get_json()["data"]
    assert [m["id"] for m in listed] == [MODEL, "agent:coder"]
    everything = client.get("/v1/models", headers=auth(keys.all)).get_json()["data"]
    assert len(everything) == 6  # two models, four agents (routers are not /v1's)
    tags = client.get("/api/tags", headers=coder).get_json()["models"]
    assert [m["name"] for m in tags] == [MODEL]
    assert client.get("/agents", headers=coder).get_json() == {"agents": ["coder"]}
    assert client.get("/agents/general", headers=coder).status_code == 403


# --- conversations -------------------------------------------------------------------------


def test_conversations_belong_to_their_key(secured: Flask, client: FlaskClient,
                                           keys: Keys) -> None:
    assert chat(client, keys.all, conversation_id="mine").status_code == 200
    other = auth(keys.coder)
    assert chat(client, keys.coder, agent="coder", conversation_id="mine").status_code == 404
    assert client.get("/conversations/mine", headers=other).status_code == 404
    assert client.delete("/conversations/mine", headers=other).status_code == 404
    assert client.post("/chat/mine/cancel", headers=other).get_json()["error"]["code"] == (
        "turn_not_running")
    v1 = client.post("/v1/chat/completions", headers={**other, "X-Conversation-Id": "mine"},
                     json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert v1.status_code == 404
    assert client.get("/conversations", headers=other).get_json() == {"conversations": []}
    # Nothing of that changed the conversation.
    mine = client.get("/conversations/mine", headers=auth(keys.all)).get_json()
    assert [t["user"] for t in mine["turns"]] == ["hi"]
    listing = client.get("/conversations", headers=auth(keys.all)).get_json()
    assert listing == {"conversations": [{"conversation_id": "mine", "turns": 1}]}
    # The admin key sees every conversation, with its owner, and may delete it.
    admin = auth(keys.admin)
    owner_id = json.loads(keys.path.read_text())["keys"][0]["id"]
    assert client.get("/conversations", headers=admin).get_json() == {"conversations": [
        {"conversation_id": "mine", "turns": 1, "owner": owner_id}]}
    # It manages other keys' conversations without reading them, or writing into them.
    assert client.get("/conversations/mine", headers=admin).status_code == 404
    assert chat(client, keys.admin, conversation_id="mine").status_code == 404
    assert client.delete("/conversations/mine", headers=admin).status_code == 200
    assert "mine" not in state(secured).memory  # type: ignore[operator]


# --- limits --------------------------------------------------------------------------------


def test_requests_per_minute(client: FlaskClient, keys: Keys) -> None:
    seen = []
    for _ in range(3):
        response = client.get("/agents", headers=auth(keys.limited))
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        seen.append(int(response.headers["X-RateLimit-Remaining"]))
        assert int(response.headers["X-RateLimit-Reset"]) >= 1
    assert seen == [2, 1, 0]
    refused = client.get("/v1/models", headers=auth(keys.limited))
    assert refused.status_code == 429
    assert refused.get_json()["error"]["type"] == "requests"
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    # A key over its limit can still stop its turns.
    cancel = client.post("/chat/c1/cancel", headers=auth(keys.limited))
    assert cancel.get_json()["error"]["code"] == "turn_not_running"
    assert "X-RateLimit-Limit" not in client.get("/agents", headers=auth(keys.all)).headers


def test_a_turn_cut_short_counts_what_it_relayed(
    client: FlaskClient, keys: Keys, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script = Script(tokens=[f"t{i}" for i in range(10)], error_after=6)
    cut = client.post("/chat/stream", json={"message": "hi"}, headers=auth(keys.tokens))
    assert b"event: error" in done(cut).get_data()
    refused = chat(client, keys.tokens)  # six tokens relayed: more than the five a day
    assert refused.status_code == 429


def test_a_non_stream_turn_cut_short_counts_what_it_received(
    client: FlaskClient, keys: Keys, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script = Script(tokens=[f"t{i}" for i in range(10)], error_after=6)
    cut = chat(client, keys.tokens)
    assert cut.status_code == 502
    refused = chat(client, keys.tokens)  # six tokens generated: more than the five a day
    assert refused.status_code == 429


def test_completion_tokens_per_day(client: FlaskClient, keys: Keys) -> None:
    # The fake answers with four tokens; the key may use five a day.
    first = chat(client, keys.tokens)
    assert first.status_code == 200 and first.headers["X-RateLimit-Remaining-Tokens"] == "5"
    streamed = chat(client, keys.tokens, stream=True)
    assert streamed.get_data(as_text=True) == "Hello, world!"  # read: the stream counts at its end
    refused = chat(client, keys.tokens)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "rate_limited"
    assert refused.headers["X-RateLimit-Remaining-Tokens"] == "0"
    assert int(refused.headers["Retry-After"]) <= 86_400


# --- CORS ----------------------------------------------------------------------------------


def test_cors_for_an_allowed_and_a_refused_origin(client: FlaskClient, keys: Keys) -> None:
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type,x-api-key,x-conversation-id"}
    allowed = client.options("/chat", headers={"Origin": "https://app.example", **ask})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "x-api-key" in allowed.headers["Access-Control-Allow-Headers"].lower()
    assert "Access-Control-Allow-Credentials" not in allowed.headers
    response = client.post("/chat", json={"message": "hi"},
                           headers={"Origin": "https://app.example", **auth(keys.all)})
    exposed = {h.strip().lower() for h in
               response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-conversation-id", "x-request-id", "retry-after", "x-ratelimit-limit",
            "x-ratelimit-remaining", "x-ratelimit-reset"} <= exposed
    refused = client.options("/chat", headers={"Origin": "https://evil.example", **ask})
    assert "Access-Control-Allow-Origin" not in refused.headers
    other = client.get("/agents", headers={"Origin": "https://evil.example", **auth(keys.all)})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_no_origin_is_allowed_by_default(app: Flask) -> None:
    response = app.test_client().options("/chat", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in response.headers


# --- secure by default ---------------------------------------------------------------------


@pytest.mark.parametrize("args, settings", [
    ((), {"BIND": "0.0.0.0:0"}),
    (("-b", "0.0.0.0:0"), {}),
    (("-b", "127.0.0.1:0", "-b", "[::]:0"), {}),
])
def test_a_public_bind_without_keys_refuses_to_start(args: tuple[str, ...],
                                                     settings: dict[str, str]) -> None:
    env = server_env(**settings)
    result = subprocess.run(gunicorn_command(*args), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    assert "refusing to listen on" in result.stderr and "without API keys" in result.stderr


def test_settings_given_to_gunicorn_with_e_are_checked(keys: Keys) -> None:
    env = server_env(KEYS_FILE=str(keys.path))
    command = gunicorn_command("-b", "0.0.0.0:0", "-e", "PI_AGENT_KEYS_FILE=")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0 and "without API keys" in result.stderr


def test_without_keys_only_this_machine_is_served(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/agents").status_code == 200
    remote = client.get("/agents", environ_base={"REMOTE_ADDR": "192.168.1.20"})
    assert remote.status_code == 403 and remote.get_json()["error"]["code"] == "local_only"
    # A reverse proxy on this machine forwards for somebody else.
    proxied = client.get("/agents", headers={"X-Forwarded-For": "203.0.113.9"})
    assert proxied.status_code == 403
    assert client.get("/health", environ_base={"REMOTE_ADDR": "192.168.1.20"}).status_code == 200


def test_keys_or_auth_off_allow_a_public_bind(tmp_path: Path, keys: Keys,
                                              fake: FakeOllama) -> None:
    port = unused_port()
    for settings in ({"KEYS_FILE": str(keys.path)}, {"AUTH": "off"}):
        with serving(tmp_path / "server.log", "-b", f"0.0.0.0:{port}",
                     OLLAMA_URL=fake.url, **settings) as server:
            # The helper found the server on 127.0.0.1 and /health answered.
            assert server.url == f"http://127.0.0.1:{port}"
            agents = requests.get(server.url + "/agents", timeout=5)
            assert agents.status_code == (401 if "KEYS_FILE" in settings else 200)
        if "AUTH" in settings:
            assert "every request is served without a key" in server.log.read_text()


# --- hostile and broken input --------------------------------------------------------------

DEEP = b'{"message": ' + b"[" * 5000 + b"]" * 5000 + b"}"
USER = [{"role": "user", "content": "hi"}]
ALL, CODER, NONE, REVOKED = "all", "coder", "none", "revoked"

# (what, key, method, path, extra headers, body: JSON value or raw bytes, status)
HOSTILE: list[tuple[str, str, str, str, dict[str, str], Any, int]] = [
    ("message of the wrong type", ALL, "POST", "/chat", {}, {"message": 5}, 422),
    ("message as a list", ALL, "POST", "/chat", {}, {"message": ["a"]}, 422),
    ("stream as text", ALL, "POST", "/chat", {}, {"message": "a", "stream": "yes"}, 422),
    ("unknown field", ALL, "POST", "/chat", {}, {"message": "a", "strem": True}, 422),
    ("huge body", ALL, "POST", "/chat", {}, {"message": "a" * 70_000}, 413),
    ("deep JSON", ALL, "POST", "/chat", {}, DEEP, 400),
    ("invalid UTF-8", ALL, "POST", "/chat", {}, b'{"message": "\xff\xfe"}', 400),
    ("wrong content type", ALL, "POST", "/chat", {"Content-Type": "text/plain"},
     b'{"message": "a"}', 400),
    ("empty body", ALL, "POST", "/chat", {}, b"", 400),
    ("JSON array", ALL, "POST", "/chat", {}, ["message"], 422),
    ("control characters in an id", ALL, "POST", "/chat", {},
     {"message": "a", "conversation_id": "a\nb\x00"}, 422),
    ("path trick in an id", ALL, "POST", "/chat", {},
     {"message": "a", "conversation_id": "../../etc/passwd"}, 422),
    ("id too long", ALL, "POST", "/chat", {}, {"message": "a", "conversation_id": "c" * 200},
     422),
    ("path trick in an agent", ALL, "POST", "/chat", {}, {"message": "a", "agent": "../x"},
     422),
    ("unknown agent", ALL, "POST", "/chat", {}, {"message": "a", "agent": "wizard"}, 404),
    ("message too long", ALL, "POST", "/chat", {}, {"message": "a" * 5000}, 422),
    ("empty message", ALL, "POST", "/chat", {}, {"message": ""}, 422),
    ("lone surrogate", ALL, "POST", "/chat", {}, b'{"message": "\\ud800"}', 422),
    ("cancel of a malformed id", ALL, "POST", "/chat/a%0Ab/cancel", {}, None, 404),
    ("cancel by a path trick", ALL, "POST", "/chat/..%2F..%2Fetc/cancel", {}, None, 404),
    ("read by a path trick", ALL, "GET", "/conversations/..%2Fkeys", {}, None, 404),
    ("delete of an unknown conversation", ALL, "DELETE", "/conversations/nope", {}, None, 404),
    ("wrong method", ALL, "GET", "/chat", {}, None, 405),
    ("no key", NONE, "POST", "/chat", {}, {"message": "a"}, 401),
    ("revoked key", REVOKED, "GET", "/agents", {}, None, 401),
    ("key for another agent", CODER, "POST", "/chat", {}, {"message": "a"}, 403),
    ("n above 1", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "n": 3}, 400),
    ("negative temperature", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "temperature": -1}, 400),
    ("zero max_tokens", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "max_tokens": 0}, 400),
    ("negative max_completion_tokens", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "max_completion_tokens": -5}, 400),
    ("enormous seed", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "seed": 10**30}, 400),
    ("enormous penalty", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "presence_penalty": 1e308}, 400),
    ("too many messages", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER * 100}, 400),
    ("too many tools", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "tools": [
         {"type": "function", "function": {"name": f"f{i}"}} for i in range(40)]}, 400),
    ("messages not a list", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": "hi"}, 400),
    ("empty model", ALL, "POST", "/v1/chat/completions", {}, {"model": "", "messages": USER},
     400),
    ("model name too long", ALL, "POST", "/v1/chat/completions", {},
     {"model": "m" * 300, "messages": USER}, 400),
    ("stream as text", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "stream": "true"}, 400),
    ("header with a path trick", ALL, "POST", "/v1/chat/completions",
     {"X-Conversation-Id": "../x"}, {"model": MODEL, "messages": USER}, 400),
    ("no key on /v1", NONE, "GET", "/v1/models", {}, None, 401),
    ("revoked key on /v1", REVOKED, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER}, 401),
    ("agent out of scope on /v1", CODER, "POST", "/v1/chat/completions", {},
     {"model": "agent:general", "messages": USER}, 403),
    ("num_ctx beyond 64 bits", ALL, "POST", "/api/chat", {},
     {"model": MODEL, "messages": USER, "options": {"num_ctx": 10**30}}, 400),
    ("num_predict beyond 64 bits", ALL, "POST", "/api/chat", {},
     {"model": MODEL, "messages": USER, "options": {"num_predict": 10**30}}, 400),
    ("an infinite option", ALL, "POST", "/api/chat", {},
     {"model": MODEL, "messages": USER, "options": {"mirostat_tau": float("inf")}}, 400),
    ("max_completion_tokens beyond 64 bits", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "max_completion_tokens": 10**30}, 400),
    ("max_tokens beyond 64 bits", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": USER, "max_tokens": 10**30}, 400),
    ("num_predict as text", ALL, "POST", "/api/chat", {},
     {"model": MODEL, "messages": USER, "options": {"num_predict": "lots"}}, 400),
    ("temperature out of range", ALL, "POST", "/api/chat", {},
     {"model": MODEL, "messages": USER, "options": {"temperature": 99}}, 400),
    ("load-time option", ALL, "POST", "/api/generate", {},
     {"model": MODEL, "prompt": "a", "options": {"num_gpu": 99}}, 400),
    ("prompt beyond the context", ALL, "POST", "/api/generate", {},
     {"model": MODEL, "prompt": "a" * 20_000}, 400),
    ("system prompt beyond the context", ALL, "POST", "/api/generate", {},
     {"model": MODEL, "prompt": "a", "system": "s" * 20_000}, 400),
    ("message beyond the context on /api", ALL, "POST", "/api/chat", {},
     {"model": MODEL, "messages": [{"role": "user", "content": "a" * 20_000}]}, 400),
    ("message beyond the context on /v1", ALL, "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": [{"role": "user", "content": [
         {"type": "text", "text": "a" * 6000}, {"type": "text", "text": "b" * 6000}]}]}, 400),
    ("too many Ollama messages", ALL, "POST", "/api/chat", {},
     {"model": MODEL, "messages": USER * 100}, 400),
    ("options not an object", ALL, "POST", "/api/chat", {},
     {"model": MODEL, "messages": USER, "options": [1]}, 400),
    ("model pull", ALL, "POST", "/api/pull", {}, {"model": MODEL}, 403),
    ("model delete", ALL, "DELETE", "/api/delete", {}, {"model": MODEL}, 403),
    ("model out of scope on /api", CODER, "POST", "/api/generate", {},
     {"model": "qwen3:0.6b", "prompt": "a"}, 403),
    ("no key on /api", NONE, "GET", "/api/tags", {}, None, 401),
]


def test_hostile_input_gets_its_4xx_and_changes_nothing(
    secured: Flask, client: FlaskClient, keys: Keys, fake_ollama: FakeOllama
) -> None:
    assert len(HOSTILE) >= 40
    key_of = {ALL: keys.all, CODER: keys.coder, REVOKED: keys.revoked}
    assert chat(client, keys.all, conversation_id="keep").status_code == 200
    memory = state(secured).memory
    assert memory is not None
    before = (memory.conversations(), memory.history("keep"))
    key_file = keys.path.read_bytes()
    calls = len(fake_ollama.requests)
    for what, key, method, path, headers, body, status in HOSTILE:
        headers = {**({"X-API-Key": key_of[key]} if key in key_of else {}), **headers}
        if isinstance(body, bytes):
            headers.setdefault("Content-Type", "application/json")
            response = client.open(path, method=method, data=body, headers=headers)
        else:
            response = client.open(path, method=method, json=body, headers=headers)
        assert response.status_code == status, (what, response.get_data()[:300])
        error = response.get_json()["error"]
        if path.startswith("/v1"):
            assert set(error) == {"message", "type", "param", "code"}, what
        elif path.startswith("/api"):
            assert isinstance(error, str) and error, what
        else:
            assert set(error) >= {"code", "message"}, what
        assert "Traceback" not in response.get_data(as_text=True)
    assert len(fake_ollama.requests) == calls  # nothing reached Ollama
    assert (memory.conversations(), memory.history("keep")) == before
    assert keys.path.read_bytes() == key_file
    assert client.get("/health").status_code == 200
    assert chat(client, keys.all, conversation_id="keep").status_code == 200


def test_a_bad_request_id_is_replaced(client: FlaskClient, keys: Keys) -> None:
    given = client.get("/agents", headers={**auth(keys.all), "X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    bad = client.get("/agents", headers={**auth(keys.all), "X-Request-ID": "x y<script>"})
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["X-Request-ID"])


def test_openai_and_ollama_clients_with_keys(tmp_path: Path, keys: Keys, fake: FakeOllama) -> None:
    import ollama
    import openai

    with serving(tmp_path / "server.log", OLLAMA_URL=fake.url, KEYS_FILE=str(keys.path)) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key=keys.all, max_retries=0) as good:
            reply = good.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "Hello, world!"
        with openai.OpenAI(base_url=server.url + "/v1", api_key=keys.revoked,
                           max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                bad.models.list()
            assert info.value.code == "invalid_api_key"
        client = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {keys.coder}"})
        try:
            assert [m.model for m in client.list().models] == [MODEL]  # its scope only
            with pytest.raises(ollama.ResponseError) as refused:
                client.generate(model="qwen3:0.6b", prompt="hi")
            assert refused.value.status_code == 403
        finally:
            client._client.close()
        anonymous = requests.get(server.url + "/api/tags", timeout=5)
        assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"


def test_only_the_owner_or_an_admin_cancels_a_running_turn(
    tmp_path: Path, keys: Keys, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=[f"t{i} " for i in range(200)], token_delay=0.05)
    with serving(tmp_path / "server.log", OLLAMA_URL=fake.url, KEYS_FILE=str(keys.path)) as server:
        with requests.post(server.url + "/chat/stream", stream=True, timeout=10,
                           headers=auth(keys.all),
                           json={"message": "hi", "conversation_id": "run1"}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith(b"event: start")
            other = requests.post(server.url + "/chat/run1/cancel", headers=auth(keys.coder),
                                  timeout=5)
            assert other.status_code == 404  # as if no turn were running
            admin = requests.post(server.url + "/chat/run1/cancel", headers=auth(keys.admin),
                                  timeout=5)
            assert admin.status_code == 200
            rest = b"\n".join(lines)
        assert b'"code":"cancelled"' in rest
