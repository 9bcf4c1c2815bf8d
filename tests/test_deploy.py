"""The files to run the server as a service (deploy/): the systemd unit passes
``systemd-analyze verify``; Debian's nginx with deploy/nginx.conf in front of gunicorn passes
a stream on token by token and a client that leaves on to Ollama."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from .conftest import unused_port
from .fake_ollama import FakeOllama, Script
from .live_server import ROOT, Gunicorn, RawStream, serving
from .processes import stop_process
from .test_security import create_key

DEPLOY = ROOT / "deploy"


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit as shipped, but for its install folder (/opt/pi-agent), which is this
    checkout's virtual environment here: systemd-analyze checks that ExecStart exists."""
    unit = (DEPLOY / "pi-agent.service").read_text()
    prefix = tmp_path / "opt"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    (prefix / ".venv" / "bin" / "gunicorn").symlink_to(Path(sys.executable).with_name("gunicorn"))
    shutil.copy(ROOT / "gunicorn.conf.py", prefix / "gunicorn.conf.py")
    tried = tmp_path / "pi-agent.service"
    tried.write_text(unit.replace("/opt/pi-agent", str(prefix)))
    result = subprocess.run(["systemd-analyze", "verify", str(tried)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr

    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.MULTILINE))
    graceful = int(re.search(r"^graceful_timeout = (\d+)$",
                             (ROOT / "gunicorn.conf.py").read_text(), re.MULTILINE)[1])
    assert int(settings["TimeoutStopSec"]) > graceful
    assert settings["User"] == "pi-agent" and settings["StateDirectory"] == "pi-agent"
    assert settings["EnvironmentFile"] == "-/etc/pi-agent/pi-agent.env"
    assert settings["Restart"] == "on-failure" and settings["Type"] == "notify"
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert settings[hardening] == "yes"
    assert settings["ProtectSystem"] == "strict"
    # The memory that survives a restart, in the state folder systemd makes.
    assert "Environment=PI_AGENT_STORE=sqlite" in unit
    assert "Environment=PI_AGENT_STATE_DIR=/var/lib/pi-agent" in unit


class Nginx:
    """Debian's nginx with deploy/nginx.conf (its upstream and port set to the test's) in a
    folder of its own, in the foreground; stopped by its pid."""

    def __init__(self, folder: Path, gateway: str) -> None:
        self.port = unused_port()
        site = (DEPLOY / "nginx.conf").read_text()
        site = site.replace("server 127.0.0.1:8000;", f"server {gateway};")
        site = re.sub(r"^\s*listen \[::\]:80;\n", "", site, flags=re.MULTILINE)
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        (folder / "pi-agent.conf").write_text(site)
        user = pwd.getpwuid(os.geteuid()).pw_name
        temp = "\n".join(f"    {kind}_temp_path {folder / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(f"""\
{"user " + user + ";" if os.geteuid() == 0 else ""}
daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} info;
events {{ worker_connections 64; }}
http {{
    access_log {folder / "access.log"};
{temp}
    include {folder / "pi-agent.conf"};
}}
""")
        self.folder = folder
        self.process = subprocess.Popen(
            [shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(folder),
             "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError((folder / "error.log").read_text()) from None
                time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.process)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def behind_nginx(fake: FakeOllama, tmp_path: Path,
                 capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[Gunicorn, Nginx, str]]:
    keys = tmp_path / "keys.json"
    key = create_key(keys, capsys, "--name", "through-nginx")
    with serving(tmp_path / "server.log", OLLAMA_URL=fake.url, KEYS_FILE=str(keys)) as server:
        nginx = Nginx(tmp_path, server.url.removeprefix("http://"))
        try:
            yield server, nginx, key
        finally:
            nginx.stop()


def test_nginx_passes_a_stream_on_token_by_token(
    fake: FakeOllama, behind_nginx: tuple[Gunicorn, Nginx, str]
) -> None:
    _, nginx, key = behind_nginx
    fake.script = Script(tokens=[f"tok{i} " for i in range(6)], token_delay=0.3)
    with requests.post(nginx.url + "/chat/stream", json={"message": "hi"}, stream=True,
                       headers={"X-API-Key": key}, timeout=30) as response:
        assert response.status_code == 200
        seen = b""
        pieces = response.iter_content(chunk_size=None)
        for piece in pieces:
            seen += piece
            if b"tok0" in seen:
                # The first token came through while Ollama still had five to send.
                assert not fake.stream_finished.is_set()
                assert b"tok5" not in seen
                break
        else:
            pytest.fail("no token came through nginx")
        rest = b"".join(pieces)
    assert b"tok5" in rest and b"event: done" in rest
    # Through nginx, not local: without a key the gateway would answer 403.
    assert requests.get(nginx.url + "/agents", timeout=10).status_code == 401


def test_a_client_that_leaves_nginx_stops_the_generation_in_ollama(
    fake: FakeOllama, behind_nginx: tuple[Gunicorn, Nginx, str]
) -> None:
    _, nginx, key = behind_nginx
    fake.script = Script(tokens=[f"tok{i} " for i in range(100)], token_delay=0.1)
    stream = RawStream(SimpleNamespace(url=nginx.url),  # type: ignore[arg-type]
                       headers={"X-API-Key": key}, message="hi")
    try:
        stream.read_until(b"tok1 ")
    finally:
        stream.close()
    assert fake.client_closed.wait(5), "Ollama's connection stayed open"
    assert fake.tokens_sent < 100
