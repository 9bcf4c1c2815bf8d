"""What the fake Ollama answers to ``/api/embed`` and ``/api/embeddings``, as Ollama answers
them (``EmbedHandler`` and ``EmbeddingsHandler`` in its server/routes.go).

A text's vector is made from a hash of it, so it is the same on every call and a test can
tell which text an embedding belongs to. Its values are float32 values, as Ollama's are.
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

LENGTH = 8  # the fake model's embedding length
TOTAL_DURATION, LOAD_DURATION = 14_143_917, 1_019_500


def raw_vector(text: str) -> list[float]:
    """The fake model's output for ``text``: what ``/api/embeddings`` answers."""
    return [(2 * b - 255) / 256 for b in hashlib.shake_256(text.encode()).digest(LENGTH)]


def vector(text: str, dimensions: int = 0) -> list[float]:
    """What ``/api/embed`` answers for ``text``: normalized, and cut to ``dimensions`` (when
    shorter) and normalized again."""
    values = _normalized(raw_vector(text))
    if 0 < dimensions < len(values):
        values = _normalized(values[:dimensions])
    return values


def tokens(text: str) -> int:
    """The fake tokenizer: a token a word."""
    return len(text.split()) or 1


def answer(path: str, body: dict[str, Any], models: set[str]) -> tuple[int, dict[str, Any]]:
    """The status and body Ollama gives to ``body`` sent to ``path``."""
    model = body.get("model")
    if path == "/api/embeddings" and not model:
        return 400, {"error": "model is required"}
    if not isinstance(model, str) or (model if ":" in model else model + ":latest") not in models:
        return 404, {"error": f'model "{model}" not found, try pulling it first'}
    if path == "/api/embeddings":
        prompt = body.get("prompt") or ""
        return 200, {"embedding": raw_vector(prompt) if prompt else []}
    given = body.get("input")
    texts = [given] if isinstance(given, str) and given else given or []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return 400, {"error": "invalid input type"}
    if not texts:  # what loads a model without embedding anything
        return 200, {"model": model, "embeddings": []}
    dimensions = body.get("dimensions") or 0
    return 200, {"model": model, "embeddings": [vector(t, dimensions) for t in texts],
                 "total_duration": TOTAL_DURATION, "load_duration": LOAD_DURATION,
                 "prompt_eval_count": sum(tokens(t) for t in texts)}


def _normalized(values: list[float]) -> list[float]:
    norm = max(math.sqrt(sum(v * v for v in values)), 1e-12)
    return _float32([v / norm for v in values])


def _float32(values: list[float]) -> list[float]:
    packed = struct.pack(f"<{len(values)}f", *values)
    return list(struct.unpack(f"<{len(values)}f", packed))
