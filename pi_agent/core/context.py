"""How much of a model's context (``num_ctx``) a request's messages take, told before any call.

The gateway has no tokenizer: it counts characters. Ollama keeps a chat within ``num_ctx``
itself by dropping the oldest messages, but never the system messages or the last one
(``chatPrompt`` in Ollama's server/prompt.go); so a request is refused only when those alone
cannot fit, and memory's remembered turns are trimmed here, oldest first, to what fits.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ContextTooLong

# Characters per token of the estimate. Tokenizers make about 4 characters of English a
# token, fewer of code and other scripts: 5 errs on the side of fitting, so the gateway
# refuses only what cannot fit, and leaves the finer cut to Ollama.
CHARS_PER_TOKEN = 5
# What a message costs beyond its text: the chat template's role markers.
TOKENS_PER_MESSAGE = 4


def estimate_tokens(messages: Iterable[dict[str, Any]]) -> int:
    """Return a low estimate of the tokens that ``messages`` (Ollama's form) take."""
    chars = 0
    count = 0
    for message in messages:
        count += 1
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * count


def check_fits(messages: Sequence[dict[str, Any]], num_ctx: int, param: str = "messages") -> None:
    """Refuse messages whose system messages and last message cannot fit in ``num_ctx``.

    :raise ContextTooLong: 400, with the estimate and the context size.
    """
    kept = [m for m in messages[:-1] if m.get("role") == "system"] + list(messages[-1:])
    need = estimate_tokens(kept)
    if need > num_ctx:
        raise ContextTooLong(need, num_ctx, param)


def check_text_fits(text: str, num_ctx: int, param: str) -> None:
    """Refuse a prompt (``/api/generate``) that cannot fit in ``num_ctx`` on its own.

    :raise ContextTooLong: 400, with the estimate and the context size.
    """
    check_fits([{"role": "user", "content": text}], num_ctx, param)


def trim_history(history: list[dict[str, Any]], messages: Sequence[dict[str, Any]],
                 num_ctx: int) -> list[dict[str, Any]]:
    """Keep the newest remembered messages (user and answer pairs) that fit in ``num_ctx``
    beside ``messages``; an answer is never kept without the question it answers."""
    room = num_ctx - estimate_tokens(messages)
    start = len(history)
    while start >= 2:
        room -= estimate_tokens(history[start - 2:start])
        if room < 0:
            break
        start -= 2
    return history[start:]
