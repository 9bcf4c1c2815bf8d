"""A fast fake Ollama for the benchmark: asyncio protocols, frames built once, one timer.

It answers ``/api/chat`` and ``/api/generate`` the way Ollama does (chunked NDJSON, one JSON
object per chunk frame, headers together with the first token), for any model. All streams
that wait for their next token share one ticker per token delay, so a thousand streams cost
one timer, not a thousand. ``POST /_bench/config`` sets the reply: tokens, the delay between
them and the delay before the first.

With ``prefill`` in the configuration it also models what matters on a Pi, the time to read
a prompt: each of its ``slots`` (Ollama's ``OLLAMA_NUM_PARALLEL``) keeps its last prompt and
reply as tokens (a piece of a word of at most 4 letters, or a message's role marker), a new
prompt goes to the slot that shares the longest prefix with it and only the rest is read
(Ollama's runner cache), a prompt longer than the request's ``num_ctx`` loses its oldest
messages but the system ones and the last (Ollama's ``chatPrompt``), and the reply waits
for the tokens read at ``prompt_rate`` and those made at ``gen_rate``, both sped up by
``speedup``.
``prompt_eval_count`` is the tokens read; ``GET /_bench/stats`` hands over (and forgets)
what each chat call read.

Run: ``python -m bench.fake_ollama --port 0``; it prints ``listening on PORT`` when ready.
"""
from __future__ import annotations

import argparse
import asyncio

import uvloop
import json
import signal
from dataclasses import dataclass
from typing import Any

TOKEN = "tok "
CREATED_AT = "2026-01-01T00:00:00.000000Z"


@dataclass
class Reply:
    tokens: int = 200
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    prefill: dict[str, float] | None = None  # prompt_rate, gen_rate, speedup, slots


def tokenize(messages: list[dict[str, Any]], generate: bool = False) -> list[str]:
    """A chat prompt as tokens: each message's role marker, then its words cut in pieces of
    at most 4 letters (about what tokenizers make of English); ``generate`` ends it with
    the marker the reply follows, as a chat template does."""
    tokens: list[str] = []
    for message in messages:
        tokens.append(f"<{message.get('role')}>")
        for word in str(message.get("content") or "").split():
            tokens += [word[i:i + 4] for i in range(0, len(word), 4)]
    return tokens + ["<assistant>"] if generate else tokens


def fit_context(messages: list[dict[str, Any]], num_ctx: int) -> tuple[list[dict[str, Any]], bool]:
    """Ollama's cut of a prompt past ``num_ctx``: the oldest messages go, but never the
    system ones or the last one; whether anything was cut."""
    kept = list(messages)
    cut = False
    while len(tokenize(kept, generate=True)) > num_ctx:
        oldest = next((i for i, m in enumerate(kept[:-1]) if m.get("role") != "system"), None)
        if oldest is None:
            break
        del kept[oldest]
        cut = True
    return kept, cut


class Prefill:
    """The slots of a model runner and what each has in its cache. With more than one
    slot, a prompt that would cut a slot's cache short goes to the least recently used
    slot instead, with the shared prefix copied there (Ollama's multi-user cache)."""

    def __init__(self, slots: int) -> None:
        self.slots: list[list[str]] = [[] for _ in range(max(1, slots))]
        self.used = list(range(len(self.slots)))  # least recently used first
        self.stats: list[dict[str, Any]] = []

    def read(self, request: dict[str, Any], reply_tokens: int) -> int:
        """The tokens of the request's prompt that must be read (not in a slot's cache)."""
        num_ctx = int((request.get("options") or {}).get("num_ctx") or 2048)
        messages, cut = fit_context(list(request.get("messages") or []), num_ctx)
        prompt = tokenize(messages, generate=True)
        shared = [_common(slot, prompt) for slot in self.slots]
        best = max(range(len(self.slots)), key=lambda i: (shared[i], -self.used.index(i)))
        cached = shared[best]
        if cached == 0 or (len(self.slots) > 1 and cached < len(self.slots[best])):
            best = self.used[0]
        self.used.remove(best)
        self.used.append(best)
        self.slots[best] = prompt + ["tok"] * reply_tokens
        read = len(prompt) - cached
        self.stats.append({"prompt": len(prompt), "read": read, "cut": cut})
        return read


def _common(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
        self.prefill: Prefill | None = None
        self.configure(Reply())

    def configure(self, reply: Reply) -> None:
        self.reply = reply
        self._frames = {kind: _Frames(kind, reply) for kind in ("chat", "generate")}
        self.prefill = Prefill(int(reply.prefill.get("slots", 1))) if reply.prefill else None

    def answer_prefilled(self, transport: asyncio.Transport, request: dict[str, Any],
                         stream: bool) -> None:
        """A chat reply after the time the model would take to read the prompt and write."""
        assert self.prefill is not None and self.reply.prefill is not None
        reply, rates = self.reply, self.reply.prefill
        read = self.prefill.read(request, reply.tokens)
        delay = (read / rates["prompt_rate"] + reply.tokens / rates["gen_rate"]) \
            / rates["speedup"]
        message = {"role": "assistant", "content": TOKEN * reply.tokens}
        final = {"model": "m", "created_at": CREATED_AT, "message": message, "done": True,
                 "done_reason": "stop", "total_duration": 1, "prompt_eval_count": read,
                 "eval_count": reply.tokens}
        if stream:
            frames = self._frames["chat"]
            final["message"] = {"role": "assistant", "content": ""}
            data = frames.head + frames.token * reply.tokens + _frame(_line(final)) \
                + b"0\r\n\r\n"
        else:
            body = json.dumps(final, separators=(",", ":")).encode()
            data = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        asyncio.get_running_loop().call_later(delay, _write, transport, data)

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
            stream = request.get("stream", True) is not False
            if self.fake.prefill is not None and kind == "chat":
                self.fake.answer_prefilled(self.transport, request, stream)
            else:
                self.fake.answer(self.transport, kind, stream)
        elif path == "/_bench/stats":
            stats = self.fake.prefill.stats if self.fake.prefill is not None else []
            self._send(json.dumps(stats).encode())
            stats.clear()
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
