"""The SQLite store (PI_AGENT_STORE=sqlite) in a running server: a killed worker and a
restart lose no completed turn and no daily token count; a state file or folder the server
cannot use stops it at startup with one line and is left as it was; a store locked by
another process neither stalls the server nor fails the turn; idle conversations are swept
from the file without anybody reading them."""
from __future__ import annotations

import ctypes
import os
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from pi_agent.memory import Turn
from pi_agent.stores.sqlite import SqliteStore
from pi_agent.stores.sqlite_file import FILE_NAME, SCHEMA_VERSION, prepare

from .conftest import state
from .fake_ollama import FakeOllama
from .live_server import ROOT, STARTUP_SECONDS, Gunicorn, gunicorn_command, server_env, serving
from .test_gunicorn import child_pids
from .test_security import create_key

# The fake's reply: four tokens.
ANSWER, TOKENS = "Hello, world!", 4


def chat(url: str, key: str, conversation: str, message: str, **body: Any) -> requests.Response:
    return requests.post(url + "/chat", timeout=30, headers={"X-API-Key": key} if key else {},
                         json={"message": message, "conversation_id": conversation, **body})


def remembered(url: str, key: str, conversation: str) -> list[str]:
    response = requests.get(f"{url}/conversations/{conversation}", timeout=10,
                            headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    return [turn["user"] for turn in response.json()["turns"]]


def tokens_left(url: str, key: str) -> int:
    response = requests.get(url + "/conversations", headers={"X-API-Key": key}, timeout=10)
    assert response.status_code == 200
    return int(response.headers["X-RateLimit-Remaining-Tokens"])


def test_a_killed_worker_and_a_restart_lose_no_turn_and_no_token(
    fake: FakeOllama, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.json"
    key = create_key(keys, capsys, "--name", "counted", "--tokens-per-day", "100")
    state_dir = tmp_path / "made" / "state"  # missing: the server makes it
    settings = {"STORE": "sqlite", "STATE_DIR": str(state_dir), "KEYS_FILE": str(keys),
                "OLLAMA_URL": fake.url}
    with serving(tmp_path / "first.log", **settings) as server:
        for i in range(3):
            assert chat(server.url, key, "kept", f"q{i}").json()["reply"] == ANSWER
        streamed = chat(server.url, key, "kept", "q3", stream=True)
        assert streamed.text == ANSWER
        # A turn that remembers nothing: its tokens are written alone.
        assert requests.post(server.url + "/api/chat", headers={"X-API-Key": key}, timeout=30,
                             json={"model": "llama3.2:1b", "stream": False, "messages": [
                                 {"role": "user", "content": "hi"}]}).status_code == 200
        assert tokens_left(server.url, key) == 100 - 5 * TOKENS
        assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state_dir / FILE_NAME).st_mode) == 0o600

        master = server.process.pid
        (worker,) = child_pids(master)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + STARTUP_SECONDS
        while child_pids(master) in ([], [worker]) and time.monotonic() < deadline:
            time.sleep(0.05)
        (reborn,) = child_pids(master)
        assert reborn != worker
        _wait_healthy(server)
        assert remembered(server.url, key, "kept") == ["q0", "q1", "q2", "q3"]
        assert tokens_left(server.url, key) == 100 - 5 * TOKENS

    with serving(tmp_path / "second.log", **settings) as server:
        assert remembered(server.url, key, "kept") == ["q0", "q1", "q2", "q3"]
        assert tokens_left(server.url, key) == 100 - 5 * TOKENS
        assert chat(server.url, key, "kept", "q4").status_code == 200
        sent = fake.chat_requests()[-1]["messages"]
        assert [m["content"] for m in sent if m["role"] == "user"] == [
            "q0", "q1", "q2", "q3", "q4"]
        assert tokens_left(server.url, key) == 100 - 6 * TOKENS


def _wait_healthy(server: Gunicorn) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        try:
            if requests.get(server.url + "/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass  # the new worker is booting
        time.sleep(0.05)
    raise AssertionError("the new worker did not answer:\n" + server.log.read_text())


def _owner_only() -> None:
    """Let file permissions hold for this process even as root: without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH in its bounding set, root is refused a file's write bit like its
    owner (prctl PR_CAPBSET_DROP). Anyone else is refused anyway."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _corrupt(folder: Path) -> None:
    folder.mkdir()
    (folder / FILE_NAME).write_bytes(b"not a database, whatever its name says\n" * 200)


def _unwritable_file(folder: Path) -> None:
    prepare(str(folder / FILE_NAME))
    (folder / FILE_NAME).chmod(0o400)


def _unwritable_folder(folder: Path) -> None:
    prepare(str(folder / FILE_NAME))
    folder.chmod(0o500)


def _empty_unwritable_folder(folder: Path) -> None:
    folder.mkdir(mode=0o500)


def _newer(folder: Path) -> None:
    prepare(str(folder / FILE_NAME))
    with sqlite3.connect(folder / FILE_NAME) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()


def _not_ours(folder: Path) -> None:
    folder.mkdir()
    with sqlite3.connect(folder / FILE_NAME) as db:
        db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    db.close()


def _folder_is_a_file(folder: Path) -> None:
    folder.write_text("a file where the folder should be\n")


@pytest.mark.parametrize("make, problem", [
    (_corrupt, "cannot use {file}: file is not a database"),
    (_unwritable_file, "cannot open {file} to read and write: Permission denied"),
    (_unwritable_folder, "cannot write in the folder {folder}: Permission denied"),
    (_empty_unwritable_folder, "cannot write in the folder {folder}: Permission denied"),
    (_newer, f"cannot use {{file}}: its schema version {SCHEMA_VERSION + 1} is of a newer"),
    (_not_ours, "cannot use {file}: it is not a Pi Agent Server store"),
    (_folder_is_a_file, "cannot create the folder {folder}: File exists"),
], ids=["corrupt", "unwritable file", "unwritable folder", "unwritable empty folder",
        "newer schema", "another program's", "folder is a file"])
def test_a_state_file_the_server_cannot_use_stops_it_with_one_line(
    tmp_path: Path, make: Callable[[Path], None], problem: str
) -> None:
    folder = tmp_path / "state"
    make(folder)
    before = _contents(folder)
    result = subprocess.run(
        gunicorn_command(), cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_SECONDS,
        env=server_env(BIND="127.0.0.1:0", STORE="sqlite", STATE_DIR=str(folder)),
        preexec_fn=_owner_only)
    if folder.is_dir():
        folder.chmod(0o700)  # for the checks below, and for pytest to clean up
    assert result.returncode != 0
    line = "pi-agent: PI_AGENT_STORE=sqlite: " + problem.format(
        file=folder / FILE_NAME, folder=folder)
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr
    assert "Traceback" not in result.stderr and "Booting worker" not in result.stderr
    assert _contents(folder) == before  # nothing was changed


def _contents(folder: Path) -> dict[str, bytes] | bytes:
    if folder.is_file():
        return folder.read_bytes()
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_locked_store_stalls_neither_the_server_nor_the_turn(
    fake: FakeOllama, tmp_path: Path
) -> None:
    """Another process holds the file's write lock longer than the server waits for it: the
    server answers other requests meanwhile, the turn gets its answer, and the log says the
    answer was not remembered; the next turn is remembered once the lock is let go."""
    with serving(tmp_path / "server.log", STORE="sqlite", STATE_DIR=str(tmp_path),
                 OLLAMA_URL=fake.url) as server:
        holder = sqlite3.connect(tmp_path / FILE_NAME, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        replies: list[requests.Response] = []
        turn = threading.Thread(target=lambda: replies.append(chat(server.url, "", "c", "q0")))
        try:
            turn.start()
            _wait_for(lambda: len(fake.chat_requests()) == 1)
            # The writer thread waits for the lock; the loop serves on.
            assert requests.get(server.url + "/health", timeout=10).status_code == 200
            assert turn.is_alive(), "the turn ended before the health check was answered"
            turn.join(timeout=30)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert replies[0].status_code == 200 and replies[0].json()["reply"] == ANSWER
        assert "the answer of conversation c was not remembered" in server.log.read_text()
        assert chat(server.url, "", "c", "q1").status_code == 200
        assert [m["content"] for m in fake.chat_requests()[-1]["messages"]
                if m["role"] == "user"] == ["q1"]
        assert remembered(server.url, "", "c") == ["q1"]


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_idle_conversations_are_swept_from_the_file(tmp_path: Path) -> None:
    now = [1000.0]
    store = SqliteStore(str(tmp_path / FILE_NAME), max_turns=5, ttl_seconds=60,
                        max_conversations=10, clock=lambda: now[0], sweep_seconds=0.05)
    try:
        store.append("idle", Turn("q", "a"))
        now[0] += 30
        store.append("busy", Turn("q", "a"))
        now[0] += 31  # "idle" is past its TTL; nobody reads or writes

        def left() -> list[str]:
            with sqlite3.connect(tmp_path / FILE_NAME) as db:
                rows = db.execute("SELECT id FROM conversations").fetchall()
            db.close()
            return [cid for (cid,) in rows]

        _wait_for(lambda: left() == ["busy"])
    finally:
        store.close()


def test_the_app_remembers_in_the_file(make_app: Callable[..., Flask], tmp_path: Path,
                                       fake_ollama: FakeOllama) -> None:
    """The threads of the store in a server without gevent (here, Flask's test client); the
    local user's tokens are counted too (a key without a daily quota may get one)."""
    settings = {"STORE": "sqlite", "STATE_DIR": str(tmp_path)}
    client = make_app(**settings).test_client()
    for message in ("q0", "q1"):
        assert client.post("/chat", json={"message": message,
                                          "conversation_id": "c"}).status_code == 200
    app = make_app(**settings)  # a second app on the same file
    turns = app.test_client().get("/conversations/c").get_json()["turns"]
    assert [(t["user"], t["assistant"]) for t in turns] == [("q0", ANSWER), ("q1", ANSWER)]
    today = datetime.now(timezone.utc).date().isoformat()
    assert state(app).store.tokens_used("local", today) == 2 * TOKENS


def test_a_sweep_applies_lowered_bounds(tmp_path: Path) -> None:
    path = str(tmp_path / FILE_NAME)
    wide = SqliteStore(path, max_turns=10, ttl_seconds=600, max_conversations=100,
                       max_per_key=10, sweep_seconds=0)
    try:
        for i in range(6):
            wide.append(f"a-{i}", Turn("q", "a"), owner="key_a")
        for i in range(6):
            wide.append("long", Turn(f"q{i}", "a"), owner="key_b")
        wide.append("huge", Turn("q", "x" * 2000), owner="key_c")
    finally:
        wide.close()
    narrow = SqliteStore(path, max_turns=3, ttl_seconds=600, max_conversations=5,
                         max_per_key=2, keep_on_drop=1, sweep_seconds=0)
    try:
        narrow.sweep()
        # The cap (the least recently used go), each key's cap, the turn bound (in one
        # block: the newest turn stays).
        assert narrow.conversations() == [("huge", "key_c", 1), ("long", "key_b", 1),
                                          ("a-5", "key_a", 1), ("a-4", "key_a", 1)]
        assert [t.user for t in narrow.history("long")] == ["q5"]
    finally:
        narrow.close()
    small = SqliteStore(path, max_turns=3, ttl_seconds=600, max_conversations=5,
                        max_bytes=1000, sweep_seconds=0)
    try:
        small.sweep()
        # Over the budget, the others go first; the newest turn alone over it stays, as
        # MemoryStore keeps it until the next one.
        assert small.conversations() == [("huge", "key_c", 1)]
    finally:
        small.close()


def test_a_store_that_is_down_is_503_in_each_fronts_shape(
    fake: FakeOllama, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process holds the file in exclusive locking mode (nobody else may read it)
    for longer than PI_AGENT_SQLITE_BUSY_SECONDS: what needs the store answers 503
    store_unavailable, the /api front (which remembers nothing) still answers, and all
    answer again once the lock is gone."""
    keys = tmp_path / "keys.json"
    key = create_key(keys, capsys, "--name", "counted", "--tokens-per-day", "100")
    headers = {"X-API-Key": key}
    with serving(tmp_path / "server.log", STORE="sqlite", STATE_DIR=str(tmp_path),
                 SQLITE_BUSY_SECONDS="0.2", KEYS_FILE=str(keys), OLLAMA_URL=fake.url) as server:
        holder = sqlite3.connect(tmp_path / FILE_NAME, isolation_level=None)
        try:
            holder.execute("PRAGMA locking_mode = EXCLUSIVE")
            holder.execute("BEGIN EXCLUSIVE")
            holder.execute("INSERT OR REPLACE INTO meta VALUES ('held', 'by the test')")
            holder.execute("COMMIT")  # the lock stays: exclusive locking mode
            native = requests.post(server.url + "/chat", json={"message": "hi"},
                                   headers=headers, timeout=30)
            assert native.status_code == 503
            assert native.json()["error"]["code"] == "store_unavailable"
            listed = requests.get(server.url + "/conversations", headers=headers, timeout=30)
            assert listed.status_code == 503
            openai = requests.post(server.url + "/v1/chat/completions", headers=headers,
                                   timeout=30, json={"model": "llama3.2:1b", "messages": [
                                       {"role": "user", "content": "hi"}]})
            assert openai.status_code == 503
            assert openai.json()["error"]["code"] == "store_unavailable"
        finally:
            holder.close()
        assert "Traceback" not in server.log.read_text()
        assert chat(server.url, key, "c", "q0").status_code == 200
        assert remembered(server.url, key, "c") == ["q0"]
