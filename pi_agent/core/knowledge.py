"""Knowledge with sources: the owner's Markdown and text files, split by heading into
passages, indexed in SQLite FTS5 (standard library ``sqlite3``) and searched with BM25,
headings weighted above body text. An agent's index is a file of its own in the state
folder; it is brought up to date (changed, new and removed files) before a search, at most
once a second, and rebuilt whole by ``python -m pi_agent knowledge reindex``."""
from __future__ import annotations

import glob
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..metrics import Metrics
from .agents import Agent, Knowledge

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHECK_SECONDS = 1.0
SUFFIXES = (".md", ".markdown", ".txt")
MAX_PASSAGE_CHARS = 2000  # a longer section is cut into several passages
MAX_QUERY_WORDS = 32
SNIPPET_CHARS = 200
TITLE_WEIGHT, BODY_WEIGHT = 3.0, 1.0
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Source:
    """A passage given to the model, numbered as it is cited: [id]."""

    id: int
    title: str
    path: str  # relative to the agents file's folder
    text: str
    score: float

    @property
    def snippet(self) -> str:
        return self.text[:SNIPPET_CHARS]


class Library:
    """The knowledge indexes of the agents, one SQLite file each in ``folder``, opened
    when first searched (so after gunicorn's fork)."""

    def __init__(self, folder: str, clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        """``metrics``: told each search and its time."""
        self._folder = Path(folder)
        self._clock = clock
        self._metrics = metrics
        self._lock = threading.Lock()
        self._indexes: dict[tuple[str, Knowledge], Index] = {}

    def search(self, agent: Agent, question: str) -> tuple[Source, ...]:
        """The passages of ``agent``'s documents that best answer ``question``: at most
        ``top_k``, at most ``max_chars`` of text in all; none for an agent without
        knowledge."""
        if agent.knowledge is None:
            return ()
        started = time.perf_counter()
        found = self.index(agent.name, agent.knowledge).search(question)
        if self._metrics is not None:
            self._metrics.searched(agent.name, time.perf_counter() - started)
        return found

    def index(self, name: str, knowledge: Knowledge) -> Index:
        with self._lock:
            index = self._indexes.get((name, knowledge))
            if index is None:
                self._folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                index = Index(self._folder / f"knowledge-{name}.sqlite3", knowledge,
                              self._clock)
                self._indexes[(name, knowledge)] = index
            return index


class Index:
    """One agent's passages in an FTS5 table, kept up to date with its files."""

    def __init__(self, path: Path, knowledge: Knowledge, clock: Callable[[], float]) -> None:
        self.knowledge = knowledge
        self._clock = clock
        self._checked = -CHECK_SECONDS
        self._lock = threading.Lock()
        # One connection, used under the lock: a search is a millisecond on a Pi.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._prepare()

    def _prepare(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:  # an index is rebuilt from the files, never migrated
            self._db.executescript("DROP TABLE IF EXISTS files; DROP TABLE IF EXISTS passages;")
        self._db.executescript(f"""
            CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stamp TEXT NOT NULL);
            CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5(
                title, body, path UNINDEXED, tokenize = 'unicode61 remove_diacritics 2');
            PRAGMA user_version = {SCHEMA_VERSION};
        """)

    def search(self, question: str) -> tuple[Source, ...]:
        query = match_query(question)
        with self._lock:
            self._refresh()
            if not query:
                return ()
            rows = self._db.execute(
                "SELECT title, body, path, bm25(passages, ?, ?) AS rank FROM passages "
                "WHERE passages MATCH ? ORDER BY rank LIMIT ?",
                (TITLE_WEIGHT, BODY_WEIGHT, query, self.knowledge.top_k)).fetchall()
        sources: list[Source] = []
        room = self.knowledge.max_chars
        for title, body, path, rank in rows:
            if room <= 0:
                break
            text = body[:room]
            room -= len(text)
            sources.append(Source(len(sources) + 1, title, path, text, round(-rank, 4)))
        return tuple(sources)

    def reindex(self) -> int:
        """Index every file again; return the number of passages."""
        with self._lock:
            self._db.execute("DELETE FROM files")
            self._refresh(force=True)
            count: int = self._db.execute("SELECT count(*) FROM passages").fetchone()[0]
            return count

    def _refresh(self, force: bool = False) -> None:
        """Index the files that changed since they were indexed; forget removed ones."""
        if not force and self._clock() - self._checked < CHECK_SECONDS:
            return
        self._checked = self._clock()
        found = dict(_files(self.knowledge))
        known = dict(self._db.execute("SELECT path, stamp FROM files").fetchall())
        changed = [path for path, stamp in found.items() if known.get(path) != stamp]
        gone = [path for path in known if path not in found]
        if not changed and not gone:
            return
        base = Path(self.knowledge.base)
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            for path in gone + changed:
                self._db.execute("DELETE FROM passages WHERE path = ?", (path,))
                self._db.execute("DELETE FROM files WHERE path = ?", (path,))
            for path in changed:
                try:
                    text = (base / path).read_text(encoding="utf-8", errors="replace")
                except OSError as exc:
                    logger.warning("knowledge: cannot read %s: %s", path, exc)
                    continue
                self._db.executemany(
                    "INSERT INTO passages (title, body, path) VALUES (?, ?, ?)",
                    [(title, body, path) for title, body in split_passages(path, text)])
                self._db.execute("INSERT INTO files VALUES (?, ?)", (path, found[path]))
        logger.info("knowledge: indexed %d file(s), forgot %d", len(changed), len(gone))


def _files(knowledge: Knowledge) -> Iterator[tuple[str, str]]:
    """The files the globs name, relative to the base folder, with a stamp of each."""
    base = Path(knowledge.base)
    for pattern in knowledge.paths:
        for name in sorted(glob.glob(pattern, root_dir=base, recursive=True)):
            path = base / name
            if path.suffix.lower() in SUFFIXES and path.is_file():
                info = path.stat()
                yield Path(name).as_posix(), f"{info.st_mtime_ns}:{info.st_size}"


def split_passages(path: str, text: str) -> list[tuple[str, str]]:
    """A file's passages as (title, body): one per Markdown heading (the text before the
    first heading has the file's name as title), cut at ``MAX_PASSAGE_CHARS``."""
    title = Path(path).name
    sections: list[tuple[str, list[str]]] = [(title, [])]
    markdown = not path.lower().endswith(".txt")
    for line in text.splitlines():
        found = _HEADING.match(line) if markdown else None
        if found:
            sections.append((found.group(2), []))
        else:
            sections[-1][1].append(line)
    passages = []
    for heading, lines in sections:
        body = "\n".join(lines).strip()
        for start in range(0, len(body), MAX_PASSAGE_CHARS):
            passages.append((heading, body[start:start + MAX_PASSAGE_CHARS]))
    return passages


def match_query(question: str) -> str:
    """The question as an FTS5 query: its words, each quoted, joined with OR. Never the raw
    text: ``"``, ``*``, ``NEAR`` or ``-`` in a question are words or nothing, not syntax."""
    words = list(dict.fromkeys(word.lower() for word in _WORD.findall(question)))
    return " OR ".join(f'"{word}"' for word in words[:MAX_QUERY_WORDS])


def with_sources(system_prompt: str, sources: tuple[Source, ...]) -> str:
    """The agent's system prompt with the passages numbered as they are to be cited."""
    if not sources:
        return system_prompt + "\n\nNo source was found for this question."
    listed = "\n\n".join(f"[{s.id}] {s.title} ({s.path})\n{s.text}" for s in sources)
    return f"{system_prompt}\n\nSources:\n\n{listed}"
