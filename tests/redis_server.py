"""A real redis-server (Debian's package) for the tests: on a Unix socket in a temporary
folder, no TCP port, persistence off; started and stopped by its own pid."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .processes import stop_process

STARTUP_SECONDS = 10


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: apt-get install -y redis-server "
                               "(.ci/run installs it)")
        self.folder = Path(tempfile.mkdtemp(prefix="pi-agent-redis-"))
        self.socket = self.folder / "redis.sock"
        self.log = self.folder / "redis.log"
        self.process = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder),
             "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("redis-server exited:\n" + self.log.read_text())
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(self.socket))
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass  # not listening yet
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer in time")

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.thaw()
        stop_process(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)
