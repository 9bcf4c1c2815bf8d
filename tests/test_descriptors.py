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
from .live_server import ROOT, serving

TOKENS = [f"w{i} " for i in range(20)]


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
        from pi_agent.streaming import client_probe

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
        from pi_agent.worker import quiet_descriptor_errors

        hub = gevent.get_hub()
        passed = []
        hub.handle_error = lambda *args: passed.append(args[2])

        class Log:
            lines = []
            def error(self, *args):
                self.lines.append(args[0] % args[1:])

        log = Log()
        quiet_descriptor_errors(log)
        for _ in range(100):
            hub.handle_error(None, OSError, OSError(errno.EMFILE, "Too many open files"), None)
        hub.handle_error(None, ValueError, ValueError("other"), None)
        print(len(log.lines), [str(v) for v in passed])
        print(log.lines[0])
    """)
    counts, line = out.splitlines()
    assert counts == "1 ['other']"
    assert line.startswith("pi-agent: out of file descriptors (Too many open files): 1 ")


def test_turns_run_on_while_idle_connections_pile_up(
        upstream: FakeOllama, fake: FakeOllama, tmp_path: Path) -> None:
    fake.script = Script(tokens=TOKENS, token_delay=0.1)
    with serving(tmp_path / "server.log", nofile=256, OLLAMA_URL=upstream.url,
                 MAX_CONCURRENT="4", ENABLE_MEMORY="false") as server:
        port = int(server.url.rsplit(":", 1)[1])

        def sse() -> str:
            return requests.post(server.url + "/chat/stream", json={"message": "a"},
                                 timeout=30).text

        def plain() -> str:
            return requests.post(server.url + "/chat", json={"message": "b", "stream": True},
                                 timeout=30).text

        def whole() -> tuple[int, str]:
            response = requests.post(server.url + "/chat", json={"message": "c"}, timeout=30)
            return response.status_code, response.text

        idle: list[socket.socket] = []
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            turns = [pool.submit(sse), pool.submit(plain), pool.submit(whole)]
            try:
                deadline = time.monotonic() + 10
                while len(fake.chat_requests()) < 3 and time.monotonic() < deadline:
                    time.sleep(0.05)
                for _ in range(400):  # more than 256 descriptors could hold
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                sse_text, plain_text, (status, body) = [t.result(timeout=40) for t in turns]
            finally:
                for sock in idle:
                    sock.close()
        assert "event: done" in sse_text and "event: error" not in sse_text
        assert plain_text == "".join(TOKENS)
        assert status == 200 and json.loads(body)["reply"] == "".join(TOKENS)
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        log = server.log.read_text()
    assert "pi-agent: descriptors: soft limit 256; worker_connections 96 (lowered from " \
        "2000 to fit)" in log
    assert "Traceback" not in log and "Too many open files" not in log
