"""The load generator: one keep-alive connection per client, HTTP/1.1 responses parsed here.

Each client sends its requests one after another on its own connection and decodes the
response itself (status line, headers, Content-Length or chunked body), so it can record
per request: status, time to first byte, time to first token, total time, tokens and
chunk frames. A token is one occurrence of the fake's token text in the body.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .fake_ollama import TOKEN

TOKEN_BYTES = TOKEN.encode()


@dataclass(slots=True)
class Result:
    status: int = 0
    ttfb: float = 0.0  # seconds from sending to the first response byte
    ttft: float = 0.0  # ... to the first body byte that holds a token
    total: float = 0.0  # ... to the end of the body
    tokens: int = 0
    frames: int = 0  # chunk frames with data (the terminating empty frame not counted)
    token_reads: int = 0  # socket reads that brought at least one token
    sent_at: float = 0.0  # perf_counter when the request was sent
    error: str = ""


@dataclass
class Target:
    host: str
    port: int
    path: str
    body: bytes

    def request(self) -> bytes:
        return (
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (self.path.encode(), self.host.encode(), self.port, len(self.body), self.body)
        )


class _Client(asyncio.Protocol):
    """One connection; ``send`` returns a future that resolves to the request's Result.

    To cost little per chunk frame, a read only stores the bytes and their arrival time; the
    body is parsed once it is complete, and the arrival times then date its first token.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self.keep_alive = True
        self._reset(None)

    def _reset(self, future: asyncio.Future[Result] | None) -> None:
        self.future = future
        self.started = 0.0
        self.received = bytearray()
        self.arrivals: list[tuple[float, int]] = []  # (time, bytes received until then)
        self.status = 0
        self.body_start = -1
        self.chunked = False
        self.length = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.future is not None:
            self._finish(Result(status=self.status, error="connection closed mid-response",
                                sent_at=self.started))
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, request: bytes) -> asyncio.Future[Result]:
        assert self.transport is not None
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._reset(future)
        self.started = time.perf_counter()
        self.transport.write(request)
        return future

    def data_received(self, data: bytes) -> None:
        if self.future is None:
            return
        received = self.received
        received += data
        self.arrivals.append((time.perf_counter(), len(received)))
        if self.body_start < 0 and not self._read_head():
            return
        if self.chunked:
            # Cheap test first; the full parse confirms that 0-frame is really the last.
            if received.endswith(b"0\r\n\r\n"):
                self._complete_chunked()
        elif len(received) - self.body_start >= self.length:
            body = bytes(received[self.body_start:self.body_start + self.length])
            self._complete(body, frames=0)

    def _read_head(self) -> bool:
        end = self.received.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = self.received[:end].decode("latin-1").split("\r\n")
        self.body_start = end + 4
        self.status = int(lines[0].split(" ")[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding" and value == "chunked":
                self.chunked = True
            elif name == "content-length":
                self.length = int(value)
            elif name == "connection" and value == "close":
                self.keep_alive = False
        return True

    def _complete_chunked(self) -> None:
        data = self.received
        pos = self.body_start
        pieces = []
        while True:
            end = data.find(b"\r\n", pos)
            if end < 0:
                return  # not complete after all
            size = int(bytes(data[pos:end]).split(b";")[0], 16)
            if size == 0:
                if len(data) < end + 4:
                    return
                break
            if len(data) < end + 2 + size + 2:
                return
            pieces.append((end + 2, size))
            pos = end + 2 + size + 2
        body = b"".join(bytes(data[start:start + size]) for start, size in pieces)
        first = next((start + bytes(data[start:start + size]).find(TOKEN_BYTES)
                      for start, size in pieces if TOKEN_BYTES in data[start:start + size]), -1)
        self._complete(body, frames=len(pieces), first_token_at=first)

    def _complete(self, body: bytes, frames: int, first_token_at: int | None = None) -> None:
        now = time.perf_counter()
        if first_token_at is None:
            found = body.find(TOKEN_BYTES)
            first_token_at = self.body_start + found if found >= 0 else -1
        result = Result(status=self.status, frames=frames, tokens=body.count(TOKEN_BYTES),
                        total=now - self.started, sent_at=self.started)
        result.token_reads = self._count_token_reads()
        result.ttfb = self.arrivals[0][0] - self.started
        if first_token_at >= 0:
            arrived = next(t for t, size in self.arrivals if size > first_token_at)
            result.ttft = arrived - self.started
        if b"[error]" in body or b'"error"' in body:
            result.error = "error in the body"
        elif self.status != 200:
            result.error = f"HTTP {self.status}"
        self._finish(result)

    def _count_token_reads(self) -> int:
        received = self.received
        reads = 0
        start = self.body_start
        for _, end in self.arrivals:
            if end > start and received.find(TOKEN_BYTES, start, end) >= 0:
                reads += 1
            start = max(start, end)
        return reads

    def _finish(self, result: Result) -> None:
        future = self.future
        self.future = None
        if future is not None and not future.done():
            if not result.total:
                result.total = time.perf_counter() - self.started
            future.set_result(result)


async def run_client(target: Target, requests: int, timeout: float, results: list[Result]) -> None:
    """Send ``requests`` requests one after another, reconnecting only when the server closes."""
    loop = asyncio.get_running_loop()
    request = target.request()
    client: _Client | None = None
    try:
        for _ in range(requests):
            if client is None or client.lost.done() or not client.keep_alive:
                if client is not None and client.transport is not None:
                    client.transport.close()
                client = None
                try:
                    _, fresh = await asyncio.wait_for(
                        loop.create_connection(_Client, target.host, target.port), timeout
                    )
                except (OSError, asyncio.TimeoutError) as exc:
                    results.append(Result(error=f"connect: {type(exc).__name__}"))
                    continue
                client = fresh
            try:
                result = await asyncio.wait_for(client.send(request), timeout)
            except asyncio.TimeoutError:
                result = Result(error="timeout", sent_at=client.started, total=timeout)
                if client.transport is not None:
                    client.transport.abort()
                client = None
            results.append(result)
    finally:
        if client is not None and client.transport is not None:
            client.transport.close()


@dataclass
class Load:
    clients: int
    requests_per_client: int
    timeout: float = 60.0
    results: list[Result] = field(default_factory=list)


async def run_load(target: Target, load: Load) -> float:
    """Run ``load`` against ``target``; return the wall time in seconds."""
    started = time.perf_counter()
    await asyncio.gather(
        *(run_client(target, load.requests_per_client, load.timeout, load.results)
          for _ in range(load.clients))
    )
    return time.perf_counter() - started
