"""What a knowledge search costs: 1,000 passages (50 Markdown files of 20 sections) indexed
in SQLite FTS5 by pi_agent.core.knowledge, then questions of six words searched one after
another, as a turn of an agent with knowledge does before it calls the model. In-process:
the search is the only new work a turn does; the HTTP relay is measured by the scenarios."""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pi_agent.core.agents import Agent, Knowledge
from pi_agent.core.knowledge import Library

FILES, SECTIONS, WORDS_PER_SECTION = 50, 20, 60
QUERIES, QUICK_QUERIES = 500, 100


def _words(rng: random.Random, count: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(count)]


def measure(quick: bool = False) -> dict[str, Any]:
    rng = random.Random(14)
    vocabulary = _words(rng, 3000)
    with tempfile.TemporaryDirectory(prefix="pi-agent-knowledge-") as folder:
        docs = Path(folder, "docs")
        docs.mkdir()
        for f in range(FILES):
            sections = [f"# {' '.join(rng.sample(vocabulary, 3))}\n"
                        f"{' '.join(rng.choices(vocabulary, k=WORDS_PER_SECTION))}\n"
                        for _ in range(SECTIONS)]
            (docs / f"file{f:02d}.md").write_text("\n".join(sections))
        agent = Agent("docs", "", "Answer from the sources.",
                      knowledge=Knowledge(("docs/*.md",), 4, 2400, folder))
        library = Library(str(Path(folder, "state")))
        started = time.perf_counter()
        library.search(agent, "warm up")  # indexes every file
        index_s = time.perf_counter() - started
        times = []
        found = 0
        for _ in range(QUICK_QUERIES if quick else QUERIES):
            question = " ".join(rng.choices(vocabulary, k=6)) + "?"
            started = time.perf_counter()
            found += len(library.search(agent, question))
            times.append(time.perf_counter() - started)
    times.sort()
    row = {"passages": FILES * SECTIONS, "queries": len(times), "index_s": index_s,
           "query_p50_ms": statistics.median(times) * 1000,
           "query_p95_ms": times[int(len(times) * 0.95)] * 1000,
           "sources_per_query": found / len(times)}
    print(f"knowledge search over {row['passages']} passages: index {index_s:.2f} s, query "
          f"p50 {row['query_p50_ms']:.2f} ms, p95 {row['query_p95_ms']:.2f} ms", flush=True)
    return row


def markdown(row: dict[str, Any]) -> list[str]:
    return ["", "| knowledge search | passages | index all (s) | query p50 (ms) | query p95 (ms) "
                "| sources per query |", "|---|---|---|---|---|---|",
            f"| {row['queries']} questions of six words | {row['passages']} | "
            f"{row['index_s']:.2f} | {row['query_p50_ms']:.2f} | {row['query_p95_ms']:.2f} | "
            f"{row['sources_per_query']:.1f} |"]
