"""gunicorn with the project's gunicorn.conf.py and the gevent worker, in a subprocess on
127.0.0.1 port 0, for full-stack tests; started and stopped by its own pid."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import requests

from .processes import stop_process

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 30


def gunicorn_command(*extra: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "gunicorn", "-c", "gunicorn.conf.py", *extra, "wsgi:app"]


def server_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PI_AGENT_")}
    env.update({f"PI_AGENT_{k}": v for k, v in settings.items()})
    return env


def wait_ready(process: subprocess.Popen[bytes], log: Path, listening: str) -> str:
    """Wait until the server's log names its port (group 1 of ``listening``) and /health
    answers there; return its URL."""
    deadline = time.monotonic() + STARTUP_SECONDS
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{log.read_text()}")
        if url is None:
            found = re.search(listening, log.read_text())
            url = f"http://127.0.0.1:{found.group(1)}" if found else None
        if url is not None:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    return url
            except requests.RequestException:
                pass  # not listening yet, or the worker is still booting
        time.sleep(0.05)
    raise RuntimeError(f"the server was not ready in {STARTUP_SECONDS} s:\n{log.read_text()}")


class Gunicorn:
    """A gunicorn master and its worker, started on 127.0.0.1 port 0 and stopped by pid."""

    def __init__(self, log: Path, *args: str, python: str = sys.executable, cwd: Path = ROOT,
                 nofile: int | tuple[int, int] | None = None, **settings: str) -> None:
        """``args`` go to gunicorn, ``settings`` become PI_AGENT_* variables; ``python`` and
        ``cwd`` are another installation's interpreter and checkout; ``nofile`` is the
        server's limit on open files: one number for soft and hard, or (soft, hard)."""
        self.log = log

        def limit() -> None:
            if nofile is not None:
                pair = (nofile, nofile) if isinstance(nofile, int) else nofile
                resource.setrlimit(resource.RLIMIT_NOFILE, pair)

        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                gunicorn_command(*args, python=python), cwd=cwd, stdout=out,
                stderr=subprocess.STDOUT, env=server_env(BIND="127.0.0.1:0", **settings),
                preexec_fn=limit,
            )
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> str:
        # A server bound to every address is reached on loopback too.
        return wait_ready(self.process, self.log,
                          r"Listening at: http://(?:127\.0\.0\.1|0\.0\.0\.0):(\d+)")

    def stop(self) -> None:
        stop_process(self.process, 15)


def serving(log: Path, *args: str, **options: Any) -> AbstractContextManager[Gunicorn]:
    """A ``Gunicorn`` for a ``with`` block, stopped after it; it must exit cleanly."""
    return _stopped_after(Gunicorn(log, *args, **options))


def _hear_sigint() -> None:
    """Let the child hear SIGINT, which stops waitress: a test run started in the background
    of a script (a CI job, ``nohup``) has it ignored, and the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Waitress:
    """waitress-serve with ``wsgi:app``, started on 127.0.0.1 port 0 and stopped by pid."""

    def __init__(self, log: Path, *args: str, app: str = "wsgi:app", **settings: str) -> None:
        """``args`` go to waitress-serve, ``settings`` become PI_AGENT_* variables."""
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "waitress", "--listen=127.0.0.1:0", *args, app],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=server_env(**settings),
                preexec_fn=_hear_sigint,
            )
        try:
            # waitress logs the port it was given for port 0.
            self.url = wait_ready(self.process, log, r"Serving on http://127\.0\.0\.1:(\d+)")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            # waitress has no SIGTERM handler; on SIGINT it closes its sockets and exits 0.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serving_waitress(log: Path, *args: str, **options: str) -> AbstractContextManager[Waitress]:
    """A ``Waitress`` for a ``with`` block, stopped after it; it must exit cleanly."""
    return _stopped_after(Waitress(log, *args, **options))


ServerT = TypeVar("ServerT", Gunicorn, Waitress)


@contextmanager
def _stopped_after(server: ServerT) -> Iterator[ServerT]:
    try:
        yield server
    finally:
        server.stop()
    # -9: it did not end within its stop's wait and was killed.
    assert server.process.returncode == 0, (
        f"exit code {server.process.returncode}\n" + server.log.read_text())


class RawStream:
    """A POST answered over a plain socket, so that a test can drop it at any point."""

    def __init__(self, server: Gunicorn | Waitress, path: str = "/chat/stream",
                 headers: dict[str, str] | None = None, **body: Any) -> None:
        port = int(server.url.rsplit(":", 1)[1])
        payload = json.dumps({"message": "hello", **body}).encode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                          b"application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                          % (path.encode(), extra.encode(), len(payload), payload))
        self.received = b""

    def read_until(self, marker: bytes, seconds: float = 10) -> bytes:
        deadline = time.monotonic() + seconds
        while marker not in self.received and time.monotonic() < deadline:
            data = self.sock.recv(65536)
            if not data:
                break
            self.received += data
        assert marker in self.received, self.received
        return self.received

    def close(self) -> float:
        self.sock.close()
        return time.monotonic()
