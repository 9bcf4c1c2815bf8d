"""What conversation memory costs the worker when it is full: fill it to its byte budget
(PI_AGENT_MEMORY_MAX_BYTES, 32 MiB by default) through /chat, and read the worker's RSS.

Two fills, each on a fresh gateway: ASCII messages of 4,000 characters (4,000 bytes), and
messages of 1,000 emoji (4,000 bytes of UTF-8, which Python also holds in 4 bytes each),
both with replies of 4,000 ASCII characters, 10 turns per conversation. What the store
kept is read back from /conversations: the turns kept times the bytes of one.
"""
from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from typing import Any

from . import procstat

BUDGET = 32 * 1024 * 1024  # the default
QUICK_BUDGET = 8 * 1024 * 1024
REPLY_TOKENS = 1000  # "tok " each: 4,000 bytes
MESSAGES = {"ascii": "m" * 4000, "emoji": "😀" * 1000}
THREADS = 8


def fill(port: int, http_call: Callable[..., tuple[int, bytes]], message: str,
         budget: int) -> dict[str, Any]:
    """Send turns until 1.25 times the budget has been sent; what the store then holds."""
    turn_bytes = len(message.encode()) + REPLY_TOKENS * 4
    turns = int(budget * 1.25 / turn_bytes)

    def one(i: int) -> int:
        body = json.dumps({"message": message, "conversation_id": f"fill-{i // 10:05d}"})
        return http_call(port, "POST", "/chat", body.encode())[0]

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        # Ten turns of a conversation run one after the other: a conversation takes one
        # turn at a time (409 otherwise).
        statuses = list(pool.map(lambda c: [one(c * 10 + t) for t in range(10)],
                                 range(turns // 10)))
    errors = sum(status != 200 for batch in statuses for status in batch)
    status, body = http_call(port, "GET", "/conversations")
    listed = json.loads(body)["conversations"] if status == 200 else []
    kept_turns = sum(c["turns"] for c in listed)
    kept = kept_turns * turn_bytes + sum(len(c["conversation_id"]) for c in listed)
    return {"turns_sent": turns // 10 * 10, "errors": errors, "turns_kept": kept_turns,
            "conversations_kept": len(listed), "kept_mib": kept / 2**20}


def measure(start: Callable[..., Any], configure: Callable[[int, float], None],
            http_call: Callable[..., tuple[int, bytes]], budget: int = 0) -> list[dict[str, Any]]:
    """Fill a fresh gateway's memory with each kind of message; ``budget`` 0 is the
    default one (``--quick`` uses a smaller one, set through the environment)."""
    # A context that holds ten such turns: the history's token budget (core/context.py)
    # would otherwise keep one turn of 8,000 bytes a conversation, and memory never fill.
    settings = {"PI_AGENT_NUM_CTX": "65536"}
    if budget:
        settings["PI_AGENT_MEMORY_MAX_BYTES"] = str(budget)
    budget = budget or BUDGET
    rows = []
    for kind, message in MESSAGES.items():
        server = start(**settings)
        try:
            configure(REPLY_TOKENS, 0.0)
            http_call(server.port, "POST", "/chat", b'{"message": "warm up"}')
            idle = procstat.rss_bytes(server.pids()) / 2**20
            row = {"fill": kind, "budget_mib": budget / 2**20, "idle_rss_mib": idle}
            row.update(fill(server.port, http_call, message, budget))
            row["full_rss_mib"] = procstat.rss_bytes(server.pids()) / 2**20
        finally:
            server.stop()
        print(f"memory filled with {kind:5}: kept {row['kept_mib']:.1f} MiB of "
              f"{row['budget_mib']:.0f}, RSS {idle:.0f} -> {row['full_rss_mib']:.0f} MiB, "
              f"errors {row['errors']}", flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "| memory filled to its budget | budget (MiB) | kept (MiB) | turns kept "
                 "| RSS idle (MiB) | RSS full (MiB) | errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fill']} messages | {r['budget_mib']:.0f} | {r['kept_mib']:.1f} "
                     f"| {r['turns_kept']} | {r['idle_rss_mib']:.0f} | {r['full_rss_mib']:.0f} "
                     f"| {r['errors']} |")
    return lines
