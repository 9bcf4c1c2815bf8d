"""File descriptors that run out are not clients that left (issue 13): the server fits
its connections to its limit on open files, a probe that cannot look says so, and running
out is logged once in a while."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import requests

from pi_agent.hosts import DESCRIPTOR_RESERVE, connections_allowed

from .fake_ollama import FakeOllama, Script
from .live_server import ROOT, Gunicorn, serving

MODEL = "llama3.2:1b"
TOKENS = [f"w{i} " for i in range(8)]
REPLY = "".join(TOKENS)


def test_connections_fit_the_descriptor_limit() -> None:
    assert connections_allowed(1024, 2000) == (1024 - DESCRIPTOR_RESERVE) // 2 == 480
    assert connections_allowed(1 << 20, 2000) == 2000  # a high limit keeps the setting
    assert connections_allowed(70, 2000) == 3
    assert connections_allowed(10, 2000) == 1


def run_child(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_probe_out_of_descriptors_does_not_call_the_client_gone() -> None:
    out = run_child("""
        import errno, os, resource, socket
        from pi_agent.web.client_socket import client_probe

        ours, theirs = socket.socketpair()
        probe = client_probe({"gunicorn.socket": ours})
        print(probe())  # the peer is there
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            for _ in range(100):
                held.append(open(os.devnull))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        print(probe())  # cannot look: not gone
        for f in held:
            f.close()
        theirs.close()
        print(probe())  # the peer left
        ours.close()
        print(probe())  # the request is over
    """)
    assert out.split() == ["False", "False", "True", "True"]


def test_running_out_is_said_once_in_a_while() -> None:
    out = run_child("""
        import errno
        import gevent
        from pi_agent import worker

        worker.DESCRIPTOR_ERROR_SECONDS = 2.0
        hub = gevent.get_hub()
        passed = []
        hub.handle_error = lambda *args: passed.append(args[2])

        class Log:
            lines = []
            def error(self, *args):
                self.lines.append(args[0] % args[1:])

        def fail():
            hub.handle_error(None, OSError, OSError(errno.EMFILE, "Too many open files"), None)

        log = Log()
        worker.quiet_descriptor_errors(log)
        fail()
        gevent.sleep(0.1)
        for _ in range(99):
            fail()
        hub.handle_error(None, ValueError, ValueError("other"), None)
        gevent.sleep(0.1)
        print(len(log.lines), [str(v) for v in passed])
        gevent.sleep(2.5)  # the period is up, with no failure after the 99
        for line in log.lines:
            print(line)
    """)
    counts, *lines = out.splitlines()
    assert counts == "1 ['other']"
    assert lines == [
        "pi-agent: out of file descriptors (Too many open files): 1 failures in the last 2 s; "
        "see docs/security.md",
        "pi-agent: out of file descriptors (Too many open files): 99 failures in the last 2 s; "
        "see docs/security.md",
    ]


def run_turns_among_idle_connections(server: Gunicorn, fake: FakeOllama,
                                     idle: int) -> list[requests.Response]:
    """Start a turn of each kind; once all of them are in Ollama, open ``idle`` connections
    that send nothing, and hold them until every turn has ended. Return the answers."""
    calls = [("/chat/stream", {"message": "a"}), ("/chat", {"message": "b", "stream": True}),
             ("/chat", {"message": "c"}),
             ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "d"}]})]
    port = int(server.url.rsplit(":", 1)[1])
    sockets: list[socket.socket] = []
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        answers = [pool.submit(requests.post, server.url + path, json=body, timeout=60)
                   for path, body in calls]
        try:
            deadline = time.monotonic() + 10
            while len(fake.chat_requests()) < len(calls) and time.monotonic() < deadline:
                time.sleep(0.05)
            for _ in range(idle):
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            return [answer.result(timeout=90) for answer in answers]
        finally:
            for sock in sockets:
                sock.close()


def assert_whole(answers: list[requests.Response]) -> None:
    sse, plain, whole, api = answers
    assert [answer.status_code for answer in answers] == [200] * 4
    assert "event: done" in sse.text and "event: error" not in sse.text
    assert plain.text == REPLY
    assert whole.json()["reply"] == REPLY
    lines = [json.loads(line) for line in api.text.splitlines()]
    assert lines[-1]["done"] is True
    assert "".join(line["message"]["content"] for line in lines) == REPLY


def test_turns_run_on_while_idle_connections_pile_up(
        upstream: FakeOllama, fake: FakeOllama, tmp_path: Path) -> None:
    # Slower than the client probe's period, so that each turn looks at its client.
    fake.script = Script(tokens=TOKENS, token_delay=0.7)
    with serving(tmp_path / "server.log", nofile=(128, 256), OLLAMA_URL=upstream.url,
                 MAX_CONCURRENT="4", ENABLE_MEMORY="false") as server:
        answers = run_turns_among_idle_connections(server, fake, 400)  # more than 256 fit
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        log = server.log.read_text()
    assert_whole(answers)
    assert "pi-agent: descriptors: soft limit 256 (raised from 128); worker_connections 96 " \
        "(lowered from 2000 to fit)" in log
    assert "Traceback" not in log and "Too many open files" not in log


def test_a_worker_out_of_descriptors_cuts_no_turn(
        upstream: FakeOllama, fake: FakeOllama, tmp_path: Path) -> None:
    # The project's settings with worker_connections left as they are, so that the worker
    # takes connections until its descriptors run out, as it would for a limit it cannot
    # see coming (ENFILE, descriptors held elsewhere in the process).
    unfitted = tmp_path / "unfitted.conf.py"
    unfitted.write_text(f"from pathlib import Path\n"
                        f"exec(Path({str(ROOT / 'gunicorn.conf.py')!r}).read_text())\n"
                        f"_fit_descriptors = lambda server: None\n")
    fake.script = Script(tokens=TOKENS, token_delay=0.7)
    with serving(tmp_path / "server.log", "-c", str(unfitted), nofile=128,
                 OLLAMA_URL=upstream.url, MAX_CONCURRENT="4", ENABLE_MEMORY="false") as server:
        answers = run_turns_among_idle_connections(server, fake, 200)
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        log = server.log.read_text()
    assert_whole(answers)
    said = log.count("pi-agent: out of file descriptors (Too many open files): ")
    assert "pi-agent: descriptors:" not in log
    assert 1 <= said <= 2 and log.count("Too many open files") == said
    assert "Traceback" not in log
