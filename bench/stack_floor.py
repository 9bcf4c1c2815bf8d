"""The smallest proxy on the project's stack, measured by the benchmark as a floor.

Flask, one pooled ``requests`` session and gunicorn's stock gevent worker, started like the
naive proxy (``gunicorn -k gevent -w 1``, gunicorn's defaults: no access log, no
gunicorn.conf.py) but with gunicorn.conf.py's 2,000 connections per worker.
``POST /chat`` relays Ollama's ``/api/chat``, each token as plain text as it comes, or the
whole reply as JSON. It has none of Pi Agent Server's features (no validation, memory,
agents, admission, timeouts, keys, limits, logging or error handling), so what Pi Agent
Server costs above it is the price of those features, and what it costs above the direct
run is the price of the stack itself.

Run from this folder: ``UPSTREAM_URL=http://127.0.0.1:11434 gunicorn -k gevent -w 1
--worker-connections 2000 stack_floor:app``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import requests
from flask import Flask, Response, jsonify, request

UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:11434").rstrip("/")

app = Flask(__name__)
session = requests.Session()
session.trust_env = False  # as Pi Agent Server: no proxy lookup on every call
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=2000))


@app.get("/health")
def health() -> Response:
    return jsonify(status="ok")


@app.post("/chat")
def chat() -> Response:
    body = request.get_json()
    stream = bool(body.get("stream"))
    upstream = session.post(
        UPSTREAM_URL + "/api/chat",
        json={"model": "m", "stream": stream,
              "messages": [{"role": "user", "content": body["message"]}]},
        stream=stream, timeout=(5, 60),
    )
    if not stream:
        with upstream:
            return jsonify(reply=upstream.json()["message"]["content"])

    def relay() -> Iterator[bytes]:
        try:
            # One chunk frame of Ollama's holds one NDJSON line: one token.
            for frame in upstream.iter_content(chunk_size=None):
                token = json.loads(frame)["message"]["content"]
                if token:
                    yield token.encode()
        finally:
            upstream.close()

    return Response(relay(), content_type="text/plain; charset=utf-8")
