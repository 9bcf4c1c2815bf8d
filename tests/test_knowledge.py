"""Knowledge with sources: documents split by heading, indexed in SQLite FTS5, searched with
BM25; the sources sent before the first token and in the JSON reply."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from pi_agent.cli import main as cli
from pi_agent.core.agent_file import load_agents
from pi_agent.core.knowledge import CHECK_SECONDS, Library, match_query, split_passages

from .fake_ollama import FakeOllama
from .live_server import serving
from .test_events import parse_ndjson, parse_sse
from .test_security import Clock

GARDEN = """Notes on the garden.

# Watering tomatoes
Tomatoes want water at the roots every second day, more in a heat wave.

# Pruning roses
Cut roses back in early spring, above an outward-facing bud.
"""
PI = """# Fan speed
The fan runs faster above 60 degrees.

# Power supply
Use the official 27 W supply; a weak one throttles the CPU and the fan.
"""
NOTES = "Tomatoes are a fruit. The shed key is under the blue pot.\n"

AGENTS = """
[agents.general]
system = "You help."

[agents.docs]
description = "Answers from the notes."
system = "Answer only from the sources."
knowledge = { paths = ["docs/**/*.md", "*.txt"], top_k = 3, max_chars = 2400 }
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "docs" / "pi").mkdir(parents=True)
    (tmp_path / "docs" / "garden.md").write_text(GARDEN)
    (tmp_path / "docs" / "pi" / "cooling.md").write_text(PI)
    (tmp_path / "notes.txt").write_text(NOTES)
    (tmp_path / "agents.toml").write_text(AGENTS)
    return tmp_path


def search(folder: Path, question: str, clock: Clock | None = None,
           library: Library | None = None) -> list[tuple[str, str]]:
    agent = load_agents(str(folder / "agents.toml"))["docs"]
    library = library or Library(str(folder / "state"), clock=clock or Clock())
    return [(s.title, s.path) for s in library.search(agent, question)]


def test_the_right_passage_ranks_first(folder: Path) -> None:
    assert search(folder, "How often should I water the tomatoes?")[0] == (
        "Watering tomatoes", "docs/garden.md")
    assert search(folder, "when do I prune roses")[0] == ("Pruning roses", "docs/garden.md")
    assert search(folder, "where is the shed key")[0] == ("notes.txt", "notes.txt")


def test_a_heading_weighs_more_than_body_text(folder: Path) -> None:
    # "fan" is the heading of one passage and a word in the body of another.
    found = search(folder, "fan")
    assert found[:2] == [("Fan speed", "docs/pi/cooling.md"),
                         ("Power supply", "docs/pi/cooling.md")]


@pytest.mark.parametrize("question", [
    '"unbalanced quote', "cool*", "NEAR(fan power)", "-fan", "fan AND OR NOT", "^fan",
    "fan:speed", "(((", "", "   ", "'; DROP TABLE passages; --", "ünïcödé tomatoes",
])
def test_query_syntax_in_a_question_is_only_words(folder: Path, question: str) -> None:
    found = search(folder, question)  # never an FTS5 syntax error
    assert all(path for _, path in found)
    assert '"' not in match_query(question).replace('" OR "', "").strip('"')


def test_a_changed_file_is_indexed_again_and_a_removed_one_forgotten(folder: Path) -> None:
    clock = Clock()
    library = Library(str(folder / "state"), clock=clock)
    assert search(folder, "courgettes", library=library) == []
    garden = folder / "docs" / "garden.md"
    garden.write_text(GARDEN + "\n# Courgettes\nPick courgettes small.\n")
    os.utime(garden, ns=(10**9, 10**9))
    assert search(folder, "courgettes", library=library) == []  # looked at once a second
    clock.now += CHECK_SECONDS
    found = search(folder, "courgettes", library=library)
    assert found == [("Courgettes", "docs/garden.md")]
    (folder / "notes.txt").unlink()
    clock.now += CHECK_SECONDS
    assert ("notes.txt", "notes.txt") not in search(folder, "shed key", library=library)


def test_passages_are_cut_at_headings_and_at_their_size() -> None:
    passages = split_passages("a.md", "intro\n# One\n" + "x" * 4500 + "\n## Two ##\nbody\n")
    assert [(title, len(body)) for title, body in passages] == [
        ("a.md", 5), ("One", 2000), ("One", 2000), ("One", 500), ("Two", 4)]
    assert split_passages("a.txt", "# not a heading\ntext") == [
        ("a.txt", "# not a heading\ntext")]


def test_max_chars_bounds_the_sources(folder: Path, tmp_path: Path) -> None:
    (folder / "agents.toml").write_text(AGENTS.replace("max_chars = 2400", "max_chars = 100"))
    agent = load_agents(str(folder / "agents.toml"))["docs"]
    found = Library(str(folder / "state")).search(agent, "tomatoes fan roses shed")
    assert sum(len(s.text) for s in found) <= 100 and found[0].id == 1


def test_the_sources_come_before_the_first_token(
    make_app: Callable[..., Flask], folder: Path, fake_ollama: FakeOllama
) -> None:
    client = make_app(AGENTS_FILE=str(folder / "agents.toml"),
                      STATE_DIR=str(folder / "state")).test_client()
    response = client.post("/chat/stream", json={"message": "water tomatoes?", "agent": "docs"})
    events = parse_sse(response.get_data(as_text=True))
    names = [name for name, _ in events]
    assert names[:2] == ["start", "sources"] and names.index("sources") < names.index("token")
    assert names.count("sources") == 1 and names[-1] == "done"
    first = events[1][1]["sources"][0]
    assert first["id"] == 1 and first["title"] == "Watering tomatoes"
    assert first["path"] == "docs/garden.md" and first["score"] > 0
    assert first["snippet"].startswith("Tomatoes want water")
    system = fake_ollama.chat_requests()[-1]["messages"][0]["content"]
    assert system.startswith("Answer only from the sources.")
    assert "[1] Watering tomatoes (docs/garden.md)\nTomatoes want water" in system
    ndjson = client.post("/chat/stream", json={"message": "roses", "agent": "docs"},
                         headers={"Accept": "application/x-ndjson"})
    assert [n for n, _ in parse_ndjson(ndjson.get_data(as_text=True))][:2] == ["start",
                                                                               "sources"]


def test_the_json_reply_lists_the_sources_and_plain_text_does_not(
    make_app: Callable[..., Flask], folder: Path, fake_ollama: FakeOllama
) -> None:
    client = make_app(AGENTS_FILE=str(folder / "agents.toml"),
                      STATE_DIR=str(folder / "state")).test_client()
    body = client.post("/chat", json={"message": "prune roses", "agent": "docs"}).get_json()
    assert body["sources"][0]["title"] == "Pruning roses"
    assert [s["id"] for s in body["sources"]] == list(range(1, len(body["sources"]) + 1))
    text = client.post("/chat", json={"message": "prune roses", "agent": "docs",
                                      "stream": True})
    assert text.get_data(as_text=True) == "Hello, world!"
    nothing = client.post("/chat", json={"message": "zzz qqq", "agent": "docs"}).get_json()
    assert nothing["sources"] == []
    assert "No source was found" in fake_ollama.chat_requests()[-1]["messages"][0]["content"]
    openai = client.post("/v1/chat/completions", json={
        "model": "agent:docs", "messages": [{"role": "user", "content": "fan speed"}]})
    assert openai.status_code == 200
    assert "[1] Fan speed" in fake_ollama.chat_requests()[-1]["messages"][0]["content"]


def test_reindex_from_the_command_line(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PI_AGENT_AGENTS_FILE", str(folder / "agents.toml"))
    monkeypatch.setenv("PI_AGENT_STATE_DIR", str(folder / "state"))
    assert cli(["knowledge", "reindex"]) == 0
    assert capsys.readouterr().out == "docs: 6 passages from docs/**/*.md, *.txt\n"
    assert (folder / "state" / "knowledge-docs.sqlite3").is_file()
    assert cli(["knowledge", "reindex", "general"]) == 1
    assert "no agent called general has knowledge" in capsys.readouterr().err


def test_sources_through_gunicorn(folder: Path, fake_ollama: FakeOllama) -> None:
    with serving(folder / "server.log", AGENTS_FILE=str(folder / "agents.toml"),
                 STATE_DIR=str(folder / "state"), OLLAMA_URL=fake_ollama.url) as server:
        response = requests.post(server.url + "/chat/stream", timeout=10,
                                 json={"message": "tomatoes", "agent": "docs"})
        events: list[tuple[str, dict[str, Any]]] = parse_sse(response.text)
    assert [name for name, _ in events][:3] == ["start", "sources", "token"]
    assert events[1][1]["sources"][0]["path"] in ("docs/garden.md", "notes.txt")
