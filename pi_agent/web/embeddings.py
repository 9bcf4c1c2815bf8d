"""Embedding requests, sent to the model server in a generation slot of their own.

An embedding model takes the Pi's memory and cores as a chat model does (and is often the
chat model itself), so a request waits for a slot like a generation, can be cancelled, and
is watched: the total timeout, a shutdown or a client that leaves shuts its upstream call.
Ollama answers only once every input is embedded, in one piece, so the first-token and idle
timeouts do not apply to it.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..core.prompt import Client
from ..core.turn import Turns
from ..core.watch import TurnWatch
from ..providers.base import Forwarded
from ..security.keys import ApiKey


@dataclass(frozen=True, slots=True)
class Answer:
    """The model server's answer as it came: its status, content type and body."""

    status: int
    content_type: str
    body: bytes


def fetch_embeddings(turns: Turns, path: str, data: bytes, model: str, key: ApiKey,
                     client: Client) -> Answer:
    """POST ``data`` to the model server's ``path`` (``/api/embed`` or ``/api/embeddings``)
    once a generation slot is free; return the answer, error statuses included.

    :raise QueueFull: 429 if every slot is taken and the queue is full.
    :raise ProviderError: the call failed, or was stopped (a subclass that says why).
    """
    turn = turns.open("embed-" + uuid.uuid4().hex, key, client, model=model, embedding=True)
    try:
        watch = turn.begin()
        upstream = turn.forward("POST", path, data, wait="whole")
        body = turn.run(lambda abort: _read(upstream, watch))
        turn.log.relayed(upstream.status)
    finally:
        turn.release()
    return Answer(upstream.status, upstream.content_type, body)


def _read(upstream: Forwarded, watch: TurnWatch) -> bytes:
    pieces = []
    for piece in upstream:
        watch.last_chunk = time.monotonic()  # a large answer comes in pieces: each is news
        pieces.append(piece)
    return b"".join(pieces)
