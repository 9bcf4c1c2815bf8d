"""How much of a model's context (``num_ctx``) a request's messages take, told before any call,
and which remembered turns go into a call.

The gateway has no tokenizer. To refuse a request, it counts characters low (5 a token):
Ollama keeps a chat within ``num_ctx`` itself by dropping the oldest messages, but never the
system messages or the last one (``chatPrompt`` in Ollama's server/prompt.go), so a request
is refused only when those alone cannot fit. To budget the history, it counts high (a token
per 3 UTF-8 bytes, the model's own count of an answer when it is known): the remembered
turns must fit beside the prompt and the reply, so that Ollama never cuts the prompt itself.

Ollama keeps each slot's last prompt and reply in its cache and reads again only what
differs from them; so the history is dropped in one block, not a turn at a time: for most
turns the new prompt begins with the whole previous prompt and its reply, and only the new
message is read (``history_start``).
"""
from __future__ import annotations

import json
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
# The high estimate of the history budget: UTF-8 bytes per token. English takes about 4
# bytes a token, code and other scripts fewer (a CJK character is 3 bytes, about a token).
BYTES_PER_TOKEN = 3
# Room left over in every budgeted call, for the template and the estimate's misses.
HISTORY_MARGIN = 32
# What an image takes in a prompt, at most, in the vision models small enough for a Pi.
IMAGE_TOKENS = 768


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


def high_estimate(text: str) -> int:
    """A high estimate of the tokens of ``text``."""
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / BYTES_PER_TOKEN)


def turn_tokens(user: str, answer: str, answer_tokens: int = 0) -> int:
    """What a remembered turn takes in a prompt: its two messages, the answer counted by the
    model when it is known (``answer_tokens``), else estimated high. A thinking model's
    count includes its thinking, which is not remembered: a count above the answer's high
    estimate gives way to the estimate."""
    estimate = high_estimate(answer)
    counted = min(answer_tokens, estimate) if answer_tokens > 0 else estimate
    return high_estimate(user) + counted + 2 * TOKENS_PER_MESSAGE


def history_budget(messages: Sequence[dict[str, Any]], num_ctx: int, num_predict: int,
                   tools: Sequence[dict[str, Any]] | None = None) -> int:
    """The tokens left for remembered turns in a call of ``messages`` (the system prompt
    with its sources, the new message) and ``tools``, with room for the reply."""
    used = TOKENS_PER_MESSAGE * len(messages)
    for message in messages:
        content = message.get("content")
        used += high_estimate(content) if isinstance(content, str) else 0
        used += IMAGE_TOKENS * len(message.get("images") or ())
        if message.get("tool_calls"):
            used += high_estimate(json.dumps(message["tool_calls"], default=str))
    if tools:
        used += high_estimate(json.dumps(tools))
    # num_predict -1 (no limit) or -2 (fill the context): a quarter of it for the reply.
    reply = num_predict if num_predict > 0 else num_ctx // 4
    return num_ctx - reply - used - HISTORY_MARGIN


def history_start(costs: Sequence[int], budget: int, keep: int) -> int:
    """How many of the oldest remembered turns (their ``costs`` in tokens, oldest first) to
    leave out of a call whose history may take ``budget`` tokens: none while they all fit;
    else all but the newest ``keep``, and fewer kept if even those do not fit. A pure
    function of the turns and the budget, so the same turns always give the same prompt."""
    if sum(costs) <= budget:
        return 0
    start = max(0, len(costs) - keep)
    while start < len(costs) and sum(costs[start:]) > budget:
        start += 1
    return start
