"""Conversations shaped like a Pi's: what memory's history costs in prompt reading.

On a Pi a 1B model reads a prompt at very roughly 20-100 tokens a second, so the wait for a
turn's first token is mostly the reading of its prompt; Ollama reads again only what
differs from what a slot has in its cache. The fake Ollama models that (``prefill`` in
fake_ollama.py: one slot, a token per 4 letters of a word, the longest shared prefix reused,
a prompt past ``num_ctx`` cut as Ollama cuts it). Conversations of 30 turns (the general
agent's system prompt, 68 tokens; each message 24 words, 47 tokens; each reply 150) go
through each gateway with its default settings (``num_ctx`` 2048, ``num_predict`` 512, 10
turns of memory): one conversation at a time, three interleaved on one slot, and three
interleaved on three slots (Ollama's ``OLLAMA_NUM_PARALLEL=3`` with
``OLLAMA_MULTIUSER_CACHE=1``). The modelled time to first
token is the tokens read at 50 a second; the ideal reads only the new message.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from typing import Any

from .fake_ollama import tokenize

PROMPT_RATE = 50.0  # tokens a second read on a Pi (1B model): the modelled first token
GEN_RATE = 5.0
SPEEDUP = 200.0  # the fake waits this many times less than a Pi would
TURNS = 30
QUICK_TURNS = 6
REPLY_TOKENS = 150
WORDS = ("garden tomato water light window morning battery kettle bread river forest "
         "music letter bicycle pocket candle mirror ladder pillow button").split()
MESSAGE_WORDS = 24
# (name, conversations, slots)
RUNS = [("one conversation at a time", 1, 1), ("three interleaved, one slot", 3, 1),
        ("three interleaved, three slots", 3, 3)]


def message(conversation: int, turn: int) -> str:
    """The user's message of a turn: 24 words (about 40 tokens), different each turn."""
    words = [WORDS[(conversation * 7 + turn * 3 + k) % len(WORDS)] for k in range(MESSAGE_WORDS)]
    return f"conversation {conversation} turn {turn}: " + " ".join(words[4:])


def ideal(conversation: int, turn: int) -> int:
    """What a perfect cache reads: the new message alone (and its role marker)."""
    return len(tokenize([{"role": "user", "content": message(conversation, turn)}]))


def converse(port: int, http_call: Callable[..., tuple[int, bytes]], conversations: int,
             turns: int, tag: str) -> list[tuple[int, int]]:
    """Send the turns, conversations taking turns; each turn's (conversation, turn)."""
    order = []
    for turn in range(turns):
        for conversation in range(conversations):
            body = json.dumps({"message": message(conversation, turn),
                               "conversation_id": f"{tag}-{conversation}"})
            status, answer = http_call(port, "POST", "/chat", body.encode())
            if status != 200:
                raise RuntimeError(f"/chat answered {status}: {answer[:200]!r}")
            order.append((conversation, turn))
    return order


def measure(starters: dict[str, Callable[..., Any]], configure: Callable[[dict[str, Any]], None],
            stats: Callable[[], list[dict[str, Any]]],
            http_call: Callable[..., tuple[int, bytes]], quick: bool) -> list[dict[str, Any]]:
    """Each run on a fresh gateway of each kind; per gateway and run, the tokens read."""
    turns = QUICK_TURNS if quick else TURNS
    rows = []
    for run, conversations, slots in RUNS:
        for name, start in starters.items():
            configure({"tokens": REPLY_TOKENS, "prefill": {
                "prompt_rate": PROMPT_RATE, "gen_rate": GEN_RATE, "speedup": SPEEDUP,
                "slots": slots}})
            server = start()  # the defaults: num_ctx 2048, num_predict 512, 10 turns
            try:
                order = converse(server.port, http_call, conversations, turns, "pi")
                read = stats()
            finally:
                server.stop()
            rows.append(summarize(run, name, order, read, turns))
            row = rows[-1]
            print(f"prefill, {run:32} {name:18} read {row['read_mean']:7.1f} tokens a turn, "
                  f"modelled TTFT {row['ttft_mean_s']:5.2f} s ({row['vs_ideal']:.1f}x ideal), "
                  f"{row['cut']} prompts cut", flush=True)
    return rows


def summarize(run: str, gateway: str, order: list[tuple[int, int]],
              read: list[dict[str, Any]], turns: int) -> dict[str, Any]:
    ideal_mean = statistics.mean(ideal(c, t) for c, t in order)
    read_mean = statistics.mean(r["read"] for r in read)
    return {"run": run, "gateway": gateway, "turns": len(order), "per_conversation": turns,
            "prompt_mean": statistics.mean(r["prompt"] for r in read),
            "read_mean": read_mean, "ideal_mean": ideal_mean,
            "ttft_mean_s": read_mean / PROMPT_RATE, "ideal_ttft_s": ideal_mean / PROMPT_RATE,
            "vs_ideal": read_mean / ideal_mean, "cut": sum(r["cut"] for r in read)}


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", f"| conversations of {rows[0]['per_conversation']} turns | gateway "
             "| prompt tokens a turn | tokens read a turn "
             f"| modelled TTFT at {PROMPT_RATE:.0f} tok/s (s) | ideal (s) | vs ideal "
             "| prompts cut by Ollama |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['gateway']} | {r['prompt_mean']:.0f} "
                     f"| {r['read_mean']:.0f} | {r['ttft_mean_s']:.2f} | {r['ideal_ttft_s']:.2f} "
                     f"| {r['vs_ideal']:.2f}x | {r['cut']} of {r['turns']} |")
    return lines
