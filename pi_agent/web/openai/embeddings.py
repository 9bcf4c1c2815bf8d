"""Embeddings requests of OpenAI's API as Ollama ``/api/embed`` calls, and Ollama's answers
in OpenAI's shape: the values as numbers (``float``), or as ``base64`` of little-endian
float32 values, which the openai SDK asks for unless told otherwise and decodes itself.
"""
from __future__ import annotations

import base64
import json
import logging
import struct
from typing import Any

from pydantic import BaseModel, ValidationError

from ...config import Settings
from ...errors import ModelNotFound, ProviderError, UpstreamError, UpstreamProtocolError
from ...providers.ollama_replies import OllamaErrorBody
from .schemas import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage

logger = logging.getLogger(__name__)


class _EmbedAnswer(BaseModel):
    """What the gateway reads of Ollama's ``/api/embed`` answer."""

    embeddings: list[list[float]]
    prompt_eval_count: int = 0


def ollama_request(body: EmbeddingRequest, settings: Settings) -> bytes:
    """The ``/api/embed`` body for a request. It gets the configured ``num_ctx`` and
    ``keep_alive``, as a generation does, and Ollama cuts a longer input to that context,
    as Ollama's own ``/v1`` lets it (OpenAI's API refuses such an input)."""
    payload: dict[str, Any] = {
        "model": body.model, "input": body.input, "options": {"num_ctx": settings.num_ctx},
        "keep_alive": settings.keep_alive,
    }
    if body.dimensions is not None:
        payload["dimensions"] = body.dimensions
    return json.dumps(payload).encode()


def embedding_list(body: EmbeddingRequest, status: int, answer: bytes) -> EmbeddingList:
    """Ollama's answer to ``ollama_request(body)`` in OpenAI's shape, with the model named
    as the client named it.

    :raise ProviderError: Ollama refused or failed (``ModelNotFound``: it has no such
        model), or its answer is not one embedding per input.
    """
    if status != 200:
        raise _failure(status, answer, body.model)
    try:
        parsed = _EmbedAnswer.model_validate_json(answer)
    except ValidationError:
        logger.warning("ollama sent an /api/embed answer that is not one: %.200r", answer)
        raise UpstreamProtocolError() from None
    if len(parsed.embeddings) != len(body.input):
        raise UpstreamProtocolError()
    as_base64 = body.encoding_format == "base64"
    data = [Embedding(object="embedding", embedding=_base64(vector) if as_base64 else vector,
                      index=index) for index, vector in enumerate(parsed.embeddings)]
    tokens = parsed.prompt_eval_count
    return EmbeddingList(object="list", data=data, model=body.model,
                         usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def _base64(vector: list[float]) -> str:
    # Ollama computes float32 values: packed as such again, nothing is lost.
    try:
        packed = struct.pack(f"<{len(vector)}f", *vector)
    except OverflowError:  # beyond float32, which no embedding model makes
        raise UpstreamProtocolError() from None
    return base64.b64encode(packed).decode("ascii")


def _failure(status: int, answer: bytes, model: str) -> ProviderError:
    try:
        text = OllamaErrorBody.model_validate_json(answer).error
    except ValidationError:
        text = ""
    logger.warning("ollama answered HTTP %d to /api/embed: %.300s", status, text)
    if status == 404 and "not found" in text:
        return ModelNotFound(model)
    return UpstreamError(f"the model server answered with an error (HTTP {status})", status, text)
