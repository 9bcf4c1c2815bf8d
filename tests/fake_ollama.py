"""A fake Ollama for the tests: a real HTTP server on 127.0.0.1, one thread per connection.

It speaks Ollama's exact framing: a streamed reply is chunked NDJSON, one JSON object per
chunk frame, and the status line and headers go out together with the first token. A
``Script`` tells it how to answer and how to misbehave. The fake records every request body
and when a client closed a stream on it.
"""
from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import fake_embeddings

DEFAULT_MODELS = ("llama3.2:1b", "qwen3:0.6b")
MODIFIED_AT = "2025-05-04T17:37:44.706015396-07:00"  # Go's format: nine digits and an offset


@dataclass
class Script:
    """How the fake answers ``/api/chat``. The misbehaviours count tokens already sent.
    The embeddings routes heed ``first_token_delay``, ``status`` and ``drop_before_headers``."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    thinking: list[str] = field(default_factory=list)
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    done_reason: str = "stop"
    prompt_eval_count: int = 12
    status: int = 200
    error_text: str = "llama runner process has terminated: exit status 2"
    error_after: int | None = None  # an {"error": ...} line after N tokens, then a clean end
    # Close the socket after N lines (the final one counts too: N past the tokens drops
    # the connection after done:true, before the body's end).
    drop_after: int | None = None
    garbage_after: int | None = None  # garbage_line after N tokens
    garbage_line: bytes = b"this is not json\n"
    end_without_done: bool = False  # end the body cleanly but leave out the done:true line
    drop_before_headers: bool = False  # read the request, then close without answering
    split_frames: bool = False  # each JSON line in two chunk frames, cut inside a character
    one_frame: bool = False  # all lines of the reply in a single chunk frame
    # Tool calls as Ollama sends them ({"id"?, "function": {"name", "arguments": {...}}}):
    # whole, in one chunk after the tokens; only to a request that offers tools, as a
    # model's template shows it none otherwise.
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    # To try an agent with tools by hand: a request that offers tools and ends with the
    # user's message is answered with a call to the last tool that needs no arguments.
    demo_tools: bool = False


class FakeOllama:
    """Start with ``start()``, stop with ``stop()``; ``url`` is its base URL."""

    def __init__(self, models: tuple[str, ...] = DEFAULT_MODELS, port: int = 0) -> None:
        self.models = set(models)
        self.script = Script()
        # Scripts for particular requests, by the content of their last message.
        self.scripts: dict[str, Script] = {}
        # The script of a router's classifier call (a format schema with a "route"), if set.
        self.classifier_script: Script | None = None
        # Scripts for the next chat calls, one each, in order (a tool loop's steps); the
        # classifier's call takes none. Once they are used up, the scripts above answer.
        self.steps: deque[Script] = deque()
        self.requests: deque[dict[str, Any]] = deque(maxlen=10_000)
        self.tokens_sent = 0
        self.connections_accepted = 0
        self.tags_status = 200
        # The models /api/ps names as loaded; None: the first installed one.
        self.loaded: set[str] | None = None
        self.stream_finished = threading.Event()
        self.client_closed = threading.Event()
        self.client_closed_at: float | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.handler_errors: list[BaseException] = []
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.daemon_threads = False
        self._server.block_on_close = True
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeOllama:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()  # joins the handler threads
        self._thread.join()

    def reset(self) -> None:
        """Answer with the default script again and forget what the last test saw."""
        self.script = Script()
        self.scripts.clear()
        self.classifier_script = None
        self.steps.clear()
        with self._lock:
            self.requests.clear()
        self.tokens_sent = 0
        self.stream_finished.clear()
        self.client_closed.clear()
        self.client_closed_at = None
        self.loaded = None

    def chat_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r.get("_path") == "/api/chat"]

    def wait(self, seconds: float) -> bool:
        """Sleep, unless the fake is stopping; return False if it is."""
        return not self._stopping.wait(seconds)

    def note_client_closed(self) -> None:
        with self._lock:
            if self.client_closed_at is None:
                self.client_closed_at = time.monotonic()
        self.client_closed.set()

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
                self.connections_accepted += 1
            else:
                self._connections.discard(conn)


class _Server(ThreadingHTTPServer):
    fake: FakeOllama

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client resetting an idle keep-alive connection is normal; anything else is a
        # bug in the fake, which the fixture reports instead of printing it.
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, ConnectionError):
            self.fake.handler_errors.append(error)


def encode(obj: dict[str, Any]) -> bytes:
    """Encode like Go's encoding/json: compact, UTF-8, and <, >, & escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode() + b"\n"


def _classifies(body: dict[str, Any]) -> bool:
    """Whether a chat request is a router's classifier call: a format schema with "route"."""
    schema = body.get("format")
    return isinstance(schema, dict) and "route" in schema.get("properties", {})


def _demo_call(script: Script, tools: list[dict[str, Any]]) -> Script:
    """The script that calls the last offered tool that needs no arguments, if any."""
    free = [tool["function"]["name"] for tool in tools
            if not tool.get("function", {}).get("parameters", {}).get("required")]
    if not free:
        return script
    return replace(script, tokens=[], tool_calls=[
        {"function": {"name": free[-1], "arguments": {}}}])


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOllama"

    @property
    def fake(self) -> FakeOllama:
        return self.server.fake  # type: ignore[attr-defined, no-any-return]

    def setup(self) -> None:
        super().setup()
        self.fake.track(self.connection, True)

    def finish(self) -> None:
        self.fake.track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # --- routes -----------------------------------------------------------------------

    def do_HEAD(self) -> None:
        if self.path == "/":
            self._send(200, b"", "text/plain; charset=utf-8", length=len(b"Ollama is running"))
        else:
            self._send(404, b"", "text/plain", length=len(b"404 page not found"))

    def do_GET(self) -> None:
        with self.fake._lock:
            self.fake.requests.append({"_path": self.path, "_method": "GET",
                                       "_host": self.headers.get("Host")})
        if self.path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif self.path == "/api/version":
            self._send_json(200, {"version": "0.33.0"})
        elif self.path == "/api/tags" and self.fake.tags_status != 200:
            self._send_json(self.fake.tags_status, {"error": "could not read the models"})
        elif self.path == "/api/tags":
            names = sorted(self.fake.models)
            models = [{"name": m, "model": m, "modified_at": MODIFIED_AT, "size": 1,
                       "details": {"family": "llama"}} for m in names]
            self._send_json(200, {"models": models})
        elif self.path == "/api/ps":
            models = [{"name": m, "model": m, "size": 1, "details": {"family": "llama"},
                       "expires_at": MODIFIED_AT, "size_vram": 0, "context_length": 2048}
                      for m in (sorted(self.fake.models)[:1] if self.fake.loaded is None
                                else sorted(self.fake.loaded))]
            self._send_json(200, {"models": models})
        else:
            self._send(404, b"404 page not found", "text/plain")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        body["_path"] = self.path
        body["_host"] = self.headers.get("Host")
        with self.fake._lock:
            self.fake.requests.append(body)
        if self.path == "/api/show":
            self._show(str(body.get("model") or body.get("name") or ""))
            return
        if self.path in ("/api/embed", "/api/embeddings"):
            self._embed(body)
            return
        if self.path not in ("/api/chat", "/api/generate"):
            self._send(404, b"404 page not found", "text/plain")
            return
        self.generate = self.path == "/api/generate"
        messages = body.get("messages") or [{}]
        prompt = body.get("prompt") if self.generate else messages[-1].get("content")
        script = self.fake.scripts.get(prompt, self.fake.script)
        if self.fake.classifier_script is not None and _classifies(body):
            script = self.fake.classifier_script
        elif self.path == "/api/chat" and not _classifies(body) and self.fake.steps:
            script = self.fake.steps.popleft()
        self.offers_tools = bool(body.get("tools"))
        if script.demo_tools and self.offers_tools and messages[-1].get("role") == "user":
            script = _demo_call(script, body["tools"])
        if script.drop_before_headers:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        model = body.get("model", "")
        if model not in self.fake.models:
            self._send_json(404, {"error": f"model '{model}' not found"})
        elif script.status != 200:
            self._send_json(script.status, {"error": script.error_text})
        elif body.get("stream", True):
            self._stream_chat(model, script)
        else:
            self._answer_chat(model, script)

    def _show(self, model: str) -> None:
        full = model if ":" in model else model + ":latest"
        if full not in self.fake.models:
            self._send_json(404, {"error": f"model '{full}' not found"})
            return
        self._send_json(200, {
            "modelfile": f"FROM {full}", "parameters": "", "template": "{{ .Prompt }}",
            "details": {"family": "llama", "parameter_size": "1B"},
            "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
            "capabilities": ["completion", "tools"], "modified_at": MODIFIED_AT,
        })

    def _embed(self, body: dict[str, Any]) -> None:
        """Answer as fake_embeddings says, after the script's delay; or fail as scripted."""
        script = self.fake.script
        if script.drop_before_headers:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if script.first_token_delay and not self._wait_watching(script.first_token_delay):
            return
        status, answer = fake_embeddings.answer(self.path, body, self.fake.models)
        if status == 200 and script.status != 200:
            status, answer = script.status, {"error": script.error_text}
        self._send_json(status, answer)

    # --- chat and generate --------------------------------------------------------------

    generate = False
    offers_tools = False

    def _chunk(
        self, model: str, content: str = "", thinking: str = "",
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if self.generate:
            chunk: dict[str, Any] = {"model": model, "created_at": _now(), "response": content}
            if thinking:
                chunk["thinking"] = thinking
            chunk["done"] = False
            return chunk
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"model": model, "created_at": _now(), "message": message, "done": False}

    def _final(
        self, model: str, script: Script, content: str = "", thinking: str = ""
    ) -> dict[str, Any]:
        final = self._chunk(model, content, thinking)
        final.update(
            done=True,
            done_reason=script.done_reason,
            total_duration=1_000_000,
            prompt_eval_count=script.prompt_eval_count,
            eval_count=len(script.tokens) + len(script.thinking),
        )
        return final

    def _answer_chat(self, model: str, script: Script) -> None:
        if script.first_token_delay and not self._wait_watching(script.first_token_delay):
            return
        final = self._final(model, script, "".join(script.tokens), "".join(script.thinking))
        if script.tool_calls and not self.generate and self.offers_tools:
            final["message"]["tool_calls"] = script.tool_calls
        self._send_json(200, final)

    def _stream_chat(self, model: str, script: Script) -> None:
        lines = [encode(self._chunk(model, thinking=t)) for t in script.thinking]
        lines += [encode(self._chunk(model, content=t)) for t in script.tokens]
        if script.tool_calls and not self.generate and self.offers_tools:
            lines.append(encode(self._chunk(model, tool_calls=script.tool_calls)))
        if script.end_without_done:
            lines.append(b"")
        else:
            lines.append(encode(self._final(model, script)))
        if script.first_token_delay and not self._wait_watching(script.first_token_delay):
            return
        # A reply that ends whole and then closes says so, as Go's net/http would: a
        # client must not reuse the connection in the moment before the close arrives.
        whole_then_closed = script.one_frame or (script.error_after is not None
                                                 and script.error_after < len(lines))
        head = self._head(200, "application/x-ndjson", chunked=True, close=whole_then_closed)
        self.close_connection = True
        try:
            if script.one_frame:
                self._write(head + _frame(b"".join(lines)) + b"0\r\n\r\n")
                self.fake.stream_finished.set()
                return
            for sent, line in enumerate(lines):
                if sent == script.error_after:
                    line = encode({"error": script.error_text})
                    self._write(head + _frame(line) + b"0\r\n\r\n")
                    return
                if sent == script.garbage_after:
                    line = script.garbage_line
                if sent == script.drop_after:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if line:
                    self._write_line(head, line, script.split_frames)
                    head = b""
                    self.fake.tokens_sent = sent + 1
                last = sent == len(lines) - 1
                if script.token_delay and not last and not self._wait_watching(script.token_delay):
                    return
            if script.drop_after == len(lines):
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._write(head + b"0\r\n\r\n")
            self.close_connection = False
            self.fake.stream_finished.set()
        except (BrokenPipeError, ConnectionResetError):
            self.fake.note_client_closed()

    def _wait_watching(self, seconds: float) -> bool:
        """Hold back the first token like a loading model, but notice a client that leaves
        meanwhile (as Ollama does); return False if it left or the fake is stopping."""
        deadline = time.monotonic() + seconds
        poller = select.poll()  # not select(): descriptors may be past 1024
        poller.register(self.connection, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            readable = poller.poll(min(left, 0.02) * 1000)
            if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                self.fake.note_client_closed()
                return False
            if not self.fake.wait(0):
                return False
        return True

    def _write_line(self, head: bytes, line: bytes, split: bool) -> None:
        if not split:
            self._write(head + _frame(line))
            return
        # Cut inside the first multi-byte character, or in the middle of an ASCII line.
        cut = next((i + 1 for i, b in enumerate(line) if b >= 0x80), len(line) // 2)
        self._write(head + _frame(line[:cut]))
        time.sleep(0.005)  # so the two halves arrive in separate reads
        self._write(_frame(line[cut:]))

    # --- plumbing ---------------------------------------------------------------------

    def _head(
        self, status: int, content_type: str, chunked: bool = False, length: int = 0,
        close: bool = False,
    ) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}",
            f"Content-Type: {content_type}",
            f"Date: {self.date_time_string()}",
            "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}",
        ] + (["Connection: close"] if close else [])
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _send(self, status: int, body: bytes, content_type: str, length: int | None = None) -> None:
        length = len(body) if length is None else length
        self._write(self._head(status, content_type, length=length) + body)

    def _send_json(self, status: int, obj: dict[str, Any]) -> None:
        body = encode(obj).rstrip(b"\n")
        if len(body) > 2048:  # Go's net/http switches to chunked encoding for larger bodies
            self._write(self._head(status, "application/json; charset=utf-8", chunked=True)
                        + _frame(body) + b"0\r\n\r\n")
        else:
            self._send(status, body, "application/json; charset=utf-8")


def main() -> None:
    """Serve the fake on a fixed port, to try the server and its curl examples without a model."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--token-delay", type=float, default=0.15, help="seconds between tokens")
    args = parser.parse_args()
    fake = FakeOllama(port=args.port)
    words = "Hello! I am the fake Ollama of the test suite, answering one word at a time."
    fake.script = Script(tokens=[" " + w for w in words.split()], token_delay=args.token_delay,
                         demo_tools=True)
    fake.start()
    print(f"fake Ollama at {fake.url} with models {', '.join(sorted(fake.models))}; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
