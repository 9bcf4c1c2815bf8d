"""A fast fake Ollama for the benchmark: asyncio protocols, frames built once, one timer.

It answers ``/api/chat`` and ``/api/generate`` the way Ollama does (chunked NDJSON, one JSON
object per chunk frame, headers together with the first token), for any model. All streams
that wait for their next token share one ticker per token delay, so a thousand streams cost
one timer, not a thousand. ``POST /_bench/config`` sets the reply: tokens, the delay between
them and the delay before the first.

Run: ``python -m bench.fake_ollama --port 0``; it prints ``listening on PORT`` when ready.
"""
from __future__ import annotations

import argparse
import asyncio

import uvloop
import json
import signal
from dataclasses import dataclass

TOKEN = "tok "
CREATED_AT = "2026-01-01T00:00:00.000000Z"


@dataclass
class Reply:
    tokens: int = 200
    token_delay: float = 0.0
    first_token_delay: float = 0.0


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _line(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class _Frames:
    """The bytes of one kind of reply (chat or generate), built once per configuration."""

    def __init__(self, kind: str, reply: Reply) -> None:
        def body(text: str, done: bool) -> dict[str, object]:
            obj: dict[str, object] = {"model": "m", "created_at": CREATED_AT}
            if kind == "chat":
                obj["message"] = {"role": "assistant", "content": text}
            else:
                obj["response"] = text
            obj["done"] = done
            if done:
                obj.update(done_reason="stop", total_duration=1, prompt_eval_count=8,
                           eval_count=reply.tokens)
            return obj

        self.head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.token = _frame(_line(body(TOKEN, False)))
        self.end = _frame(_line(body("", True))) + b"0\r\n\r\n"
        whole = json.dumps(body(TOKEN * reply.tokens, True), separators=(",", ":")).encode()
        self.whole = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nContent-Length: %d\r\n\r\n%s"
            % (len(whole), whole)
        )


class _Stream:
    __slots__ = ("transport", "frames", "left")

    def __init__(self, transport: asyncio.Transport, frames: _Frames, left: int) -> None:
        self.transport = transport
        self.frames = frames
        self.left = left


class FakeOllama:
    def __init__(self) -> None:
        self.reply = Reply()
        self._frames: dict[str, _Frames] = {}
        self._tickers: dict[float, list[_Stream]] = {}
        self.configure(Reply())

    def configure(self, reply: Reply) -> None:
        self.reply = reply
        self._frames = {kind: _Frames(kind, reply) for kind in ("chat", "generate")}

    def answer(self, transport: asyncio.Transport, kind: str, stream: bool) -> None:
        frames = self._frames[kind]
        reply = self.reply
        loop = asyncio.get_running_loop()
        if not stream:
            delay = reply.first_token_delay + reply.tokens * reply.token_delay
            if delay:
                loop.call_later(delay, _write, transport, frames.whole)
            else:
                transport.write(frames.whole)
            return
        if reply.first_token_delay:
            loop.call_later(reply.first_token_delay, self._start, transport, frames, reply)
        else:
            self._start(transport, frames, reply)

    def _start(self, transport: asyncio.Transport, frames: _Frames, reply: Reply) -> None:
        if transport.is_closing():
            return
        if reply.tokens == 0 or not reply.token_delay:
            transport.write(frames.head + frames.token * reply.tokens + frames.end)
            return
        transport.write(frames.head + frames.token)
        streams = self._tickers.get(reply.token_delay)
        if streams is None:
            streams = self._tickers[reply.token_delay] = []
            asyncio.get_running_loop().create_task(self._tick(reply.token_delay, streams))
        streams.append(_Stream(transport, frames, reply.tokens - 1))

    async def _tick(self, delay: float, streams: list[_Stream]) -> None:
        while streams:
            await asyncio.sleep(delay)
            still: list[_Stream] = []
            for s in streams:
                if s.transport.is_closing():
                    continue
                s.left -= 1
                if s.left <= 0:
                    s.transport.write(s.frames.token + s.frames.end)
                else:
                    s.transport.write(s.frames.token)
                    still.append(s)
            streams[:] = still
        del self._tickers[delay]


def _write(transport: asyncio.Transport, data: bytes) -> None:
    if not transport.is_closing():
        transport.write(data)


class _Connection(asyncio.Protocol):
    def __init__(self, fake: FakeOllama) -> None:
        self.fake = fake
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            method, path = head[0].split(" ")[:2]
            self._handle(method, path, body)

    def _handle(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "POST" and path in ("/api/chat", "/api/generate"):
            request = json.loads(body or b"{}")
            kind = "chat" if path == "/api/chat" else "generate"
            self.fake.answer(self.transport, kind, request.get("stream", True) is not False)
        elif method == "POST" and path == "/_bench/config":
            self.fake.configure(Reply(**json.loads(body)))
            self._send(b"{}")
        elif path == "/api/tags":
            self._send(b'{"models":[{"name":"m:latest","model":"m:latest"}]}')
        else:
            self._send(b"Ollama is running", "text/plain; charset=utf-8")

    def _send(self, body: bytes, content_type: str = "application/json; charset=utf-8") -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (content_type.encode(), len(body), body)
        )


async def serve(port: int) -> None:
    fake = FakeOllama()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(fake), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fast fake Ollama for the benchmark.")
    parser.add_argument("--port", type=int, default=0)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
