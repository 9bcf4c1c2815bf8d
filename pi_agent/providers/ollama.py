"""Ollama's ``/api/chat``, behind the ``Provider`` interface.

This module is the seam to the outside world: nothing from ``requests`` or ``json`` leaves it.
Every transport failure, also one that happens while a stream is being read, is translated
into a ``ProviderError`` subclass that knows its HTTP status.
"""
from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import MaxRetryError, NewConnectionError, ReadTimeoutError

from ..config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_FIRST_TOKEN_TIMEOUT
from ..errors import (
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    UpstreamError,
    UpstreamProtocolError,
)
from .base import Abort, ChatCall, ChatChunk, ModelInfo
from .ollama_replies import parse_line, unix_seconds

logger = logging.getLogger(__name__)

# Connections kept open to Ollama for reuse: one per concurrent stream, up to about
# gunicorn's worker_connections, so that a burst does not open and drop connections (and log
# a warning for each) once requests' default of 10 is passed.
POOL_SIZE = 1024
# /api/tags, /api/show, /api/ps and /api/version only read what Ollama has on disk or in
# memory; a slow answer means Ollama is not well.
QUICK_READ_TIMEOUT = 10.0
# One NDJSON line is one token's object; a "line" this long means the stream is not NDJSON.
MAX_LINE_BYTES = 1024 * 1024


# The Abort of the call that the current thread (greenlet, under gevent) is making.
_current = threading.local()


class _AbortableMixin:
    """A urllib3 connection whose socket the call using it can shut from another thread:
    shutting a socket wakes a thread blocked on it, and tells Ollama to stop generating.
    It is the only way to stop a call that still waits for its first byte."""

    sock: socket.socket | None

    def request(self, *args: Any, **kwargs: Any) -> None:
        abort: Abort | None = getattr(_current, "abort", None)
        if abort is not None:
            abort.set_handler(self._shut)
        super().request(*args, **kwargs)  # type: ignore[misc]
        # A new connection has a socket only now; an abort that came while it connected
        # found none to shut.
        if abort is not None and abort.requested:
            self._shut()

    def _shut(self) -> None:
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _AbortableHTTPConnection(_AbortableMixin, HTTPConnection):
    pass


class _AbortableHTTPSConnection(_AbortableMixin, HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _AbortableHTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _AbortableHTTPSConnection


class OllamaProvider:
    """A client of one Ollama server that owns one ``requests.Session``, so connections are
    reused, and gives every call a ``(connect, read)`` timeout."""

    name = "ollama"

    def __init__(
        self,
        base_url: str,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_FIRST_TOKEN_TIMEOUT,
        session: requests.Session | None = None,
        whole_reply_timeout: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout, read_timeout)
        # A relayed /api generation with "stream": false comes only once it is whole, so its
        # one wait is longer.
        self.whole_reply_timeout = (connect_timeout, whole_reply_timeout or read_timeout)
        if session is None:
            session = requests.Session()
            # Ollama is a local server: proxy variables meant for the internet must not
            # reroute it, and reading them (and .netrc) on every call doubles requests' cost.
            session.trust_env = False
            adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=POOL_SIZE)
            adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        # The session's headers are merged into the request once, not on every call, and
        # calls go to the adapter: Ollama sets no cookies and sends no redirects, so the
        # session's per-call cookie and redirect handling is work for nothing.
        self._chat_request = session.prepare_request(requests.Request(
            "POST", self.base_url + "/api/chat", headers={"Content-Type": "application/json"}
        ))
        self._adapter = session.get_adapter(self.base_url)

    def stream_chat(self, call: ChatCall, abort: Abort | None = None) -> OllamaStream:
        """Start a streamed reply; returns once Ollama has sent its headers and first token.

        ``abort``, requested from another thread, shuts the call's connection at any time,
        also while it waits for the first token; the call then fails.

        :raise ProviderError: before anything is streamed, e.g. for an unknown model.
        """
        _current.abort = abort
        try:
            response = self._post_chat(call)
        finally:
            _current.abort = None
        return OllamaStream(response)

    def list_models(self) -> list[ModelInfo]:
        """Return the models installed in Ollama (``/api/tags``).

        :raise ProviderError: a subclass for each way the call can fail.
        """
        return [ModelInfo(m["name"], unix_seconds(m.get("modified_at")))
                for m in self._listing("/api/tags")]

    def list_running(self) -> list[str]:
        """Return the names of the models Ollama has loaded (``/api/ps``).

        :raise ProviderError: a subclass for each way the call can fail.
        """
        return [m["name"] for m in self._listing("/api/ps")]

    def _listing(self, path: str) -> list[dict[str, Any]]:
        """The ``models`` of a listing, those with a name."""
        try:
            response = self.session.get(
                self.base_url + path, timeout=(self.timeout[0], QUICK_READ_TIMEOUT)
            )
            with response:
                if response.status_code != 200:
                    raise _status_error(response, "")
                data = response.json()
        except requests.RequestException as exc:
            raise _translate(exc) from exc
        except ValueError as exc:
            raise UpstreamProtocolError() from exc
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise UpstreamProtocolError()
        return [m for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)]

    def forward(
        self, method: str, path: str, body: bytes | None = None, *,
        wait: Literal["quick", "stream", "whole"] = "quick", abort: Abort | None = None,
    ) -> OllamaForwarded:
        """Send a request of Ollama's own API to it and return its answer unread.

        ``wait`` says how long a read may take: "quick" for the model list and the like,
        "stream" for a streamed generation (the first-token timeout, per read), "whole" for
        a generation answered at once. The client's headers are not sent, its ``Host``
        above all: Ollama refuses a Host that is not local.

        :raise ProviderError: the request could not be sent or got no answer.
        """
        read_timeout = {"quick": QUICK_READ_TIMEOUT, "stream": self.timeout[1],
                        "whole": self.whole_reply_timeout[1]}[wait]
        request = requests.Request(
            method, self.base_url + path, data=body,
            headers={"Content-Type": "application/json"} if body is not None else {},
        )
        _current.abort = abort
        started = time.perf_counter()
        try:
            response = self._adapter.send(self.session.prepare_request(request), stream=True,
                                          timeout=(self.timeout[0], read_timeout))
        except requests.RequestException as exc:
            raise _translate(exc) from exc
        finally:
            _current.abort = None
        logger.info("ollama %s %s (forwarded) status=%d after %.0f ms", method, path,
                    response.status_code, (time.perf_counter() - started) * 1000)
        return OllamaForwarded(response)

    def close(self) -> None:
        self.session.close()

    def _post_chat(self, call: ChatCall) -> requests.Response:
        payload: dict[str, Any] = {
            "model": call.model,
            "messages": call.messages,
            # Streamed also for a client that wants the reply whole: the timeouts, a cancel
            # and a client that leaves can then stop it before its end.
            "stream": True,
            "options": call.options,
            "keep_alive": call.keep_alive,
        }
        # Left out unless asked for: "think" absent lets a thinking model think, and
        # "tools" sent to a model without the capability is a 400.
        for name in ("tools", "format", "think"):
            value = getattr(call, name)
            if value is not None:
                payload[name] = value
        request = self._chat_request.copy()
        request.prepare_body(json.dumps(payload).encode(), None)
        started = time.perf_counter()
        try:
            response = self._adapter.send(request, stream=True, timeout=self.timeout)
        except requests.RequestException as exc:
            raise _translate(exc) from exc
        logger.info(
            "ollama /api/chat model=%s status=%d after %.0f ms",
            call.model, response.status_code, (time.perf_counter() - started) * 1000,
        )
        if response.status_code != 200:
            try:
                raise _status_error(response, call.model)
            finally:
                response.close()
        return response


class OllamaStream:
    """The chunks of one streamed ``/api/chat`` reply, read line by line.

    The first chunk is read when the stream is made, so an error that Ollama sends as its
    first line still gets an HTTP status. A TCP read can hold half a JSON line or several,
    so lines are split here rather than per read. A stream that ends without ``done:true``
    is an error: Ollama cuts the body short when its runner crashes.
    """

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self._chunks = self._read_chunks()
        try:
            self._first = next(self._chunks)
        except BaseException:
            response.close()
            raise

    def __iter__(self) -> Iterator[ChatChunk]:
        # chain, not a generator that yields from the other: one Python frame less per token.
        return itertools.chain((self._first,), self._chunks)

    def _read_chunks(self) -> Iterator[ChatChunk]:
        pending = b""
        finished = False
        try:
            # chunk_size=None yields each chunk frame as it arrives: one token per frame.
            for data in self._response.iter_content(chunk_size=None):
                lines = (pending + data).split(b"\n") if pending else data.split(b"\n")
                pending = lines.pop()
                if len(pending) > MAX_LINE_BYTES:
                    logger.warning("ollama sent a line of more than %d bytes", MAX_LINE_BYTES)
                    raise UpstreamProtocolError()
                for line in lines:
                    if not finished and line.strip():
                        chunk = parse_line(line)
                        finished = chunk.done
                        yield chunk
        except requests.RequestException as exc:
            if finished:
                # The answer is whole; only the end of the body failed. close() drops the
                # connection instead of reusing it.
                logger.warning("ollama failed after done:true: %s", exc)
                return
            raise _translate(exc) from exc
        if not finished and pending.strip():
            chunk = parse_line(pending)
            finished = chunk.done
            yield chunk
        if not finished:
            logger.warning("ollama stream ended before done:true")
            raise UpstreamProtocolError()

    def close(self) -> None:
        """Close the upstream response; an unfinished one drops its connection, which is
        how Ollama learns to stop generating."""
        self._response.close()


class OllamaForwarded:
    """Ollama's answer to a forwarded request: its status, content type and body pieces."""

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.content_type = response.headers.get("Content-Type", "application/json")

    def __iter__(self) -> Iterator[bytes]:
        try:
            # One piece per chunk frame as it arrives: Ollama puts one NDJSON line in each.
            yield from self._response.iter_content(chunk_size=None)
        except requests.RequestException as exc:
            raise _translate(exc) from exc

    def close(self) -> None:
        self._response.close()


def _status_error(response: requests.Response, model: str) -> ProviderError:
    try:
        text = str(response.json().get("error", ""))
    except (requests.RequestException, ValueError, AttributeError):
        text = ""
    logger.warning("ollama answered HTTP %d: %.300s", response.status_code, text)
    if response.status_code == 404 and "not found" in text:
        return ModelNotFound(model)
    return UpstreamError(f"the model server answered with an error (HTTP {response.status_code})",
                         response.status_code, text)


def _translate(exc: requests.RequestException) -> ProviderError:
    """Map a ``requests`` error to the most specific provider error."""
    logger.warning("ollama request failed: %s", exc)
    if isinstance(exc, requests.ConnectTimeout):
        return ProviderUnavailable()
    if isinstance(exc, requests.ReadTimeout):
        return ProviderTimeout()
    reason = exc.args[0] if exc.args else None
    # iter_content wraps a read timeout in the middle of a body as a ConnectionError.
    if isinstance(reason, ReadTimeoutError):
        return ProviderTimeout()
    if isinstance(reason, MaxRetryError) and isinstance(reason.reason, NewConnectionError):
        return ProviderUnavailable()
    return UpstreamProtocolError()
