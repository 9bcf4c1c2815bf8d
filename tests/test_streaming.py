"""The client probe: says whether the client closed its connection, without writing to it."""
from __future__ import annotations

import resource
import socket
from collections.abc import Iterator

import pytest

from pi_agent.web.client_socket import client_probe


@pytest.fixture
def many_sockets() -> Iterator[None]:
    """Push the next file descriptors past 1024, where select() no longer works."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    pairs = [socket.socketpair() for _ in range(520)]
    try:
        yield
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_no_socket_no_probe() -> None:
    assert client_probe({}) is None


@pytest.mark.usefixtures("many_sockets")
def test_probe_works_past_descriptor_1024() -> None:
    server, client = socket.socketpair()
    try:
        assert server.fileno() > 1024
        probe = client_probe({"gunicorn.socket": server})
        assert probe is not None
        assert probe() is False
        client.sendall(b"pipelined")  # data to read is not a disconnect
        assert probe() is False
        client.close()
        assert server.recv(100) == b"pipelined"
        assert probe() is True
    finally:
        server.close()
        client.close()
