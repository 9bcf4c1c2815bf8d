"""Memory that survives restarts: the ``Store`` of memory.py in a SQLite file.

Bounded as ``MemoryStore`` is (see its docstring), with the same rules, so that the same
tests hold for both. One finished turn is one transaction: the turns its call left out,
the new turn, what the bounds evict and the tokens it spent. The file is a WAL
(``synchronous=NORMAL``: a committed turn survives the process being killed; ``FULL``
also a power cut, at an fsync per turn).

Writes run on one thread of their own and reads on another, each with its own connection:
a commit, an fsync or a wait for another process's lock never stalls the gevent loop, and
a read never waits behind a commit (a WAL lets readers read while a writer writes). The
caller waits for its job (a greenlet cooperatively), so a turn's answer is on disk before
its turn ends, and the conversation's next turn reads it. Threads and connections are
made on first use in the process that uses them: after gunicorn's fork, never before.
Idle conversations, the conversation cap and the byte budget are also enforced by a sweep
every ``sweep_seconds``, so that a file does not keep what nobody reads again.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TypeVar, cast

from ..config import LOCAL_ID
from ..errors import StoreUnavailable
from ..memory import Bounded, OneProcess, Spent, Turn, turn_size
from .sqlite_file import BUSY_SECONDS, prepare
from .threads import OneThread, PlainThread

logger = logging.getLogger(__name__)

T = TypeVar("T")
Db = sqlite3.Connection

# Token days older than this are swept: the quota needs today's only.
TOKEN_DAYS_KEPT = 31


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _read_text(value: bytes) -> str:
    return value.decode("utf-8", "surrogatepass")


def _plain(value: str) -> str:
    """A short text kept as TEXT (the model's done reason), without lone surrogates."""
    return value.encode("utf-8", "replace").decode("utf-8")


class SqliteStore(Bounded, OneProcess):
    """A ``memory.Store`` in the SQLite file at ``path``, made if missing.

    :raise StoreFileError: the file or its folder cannot be used (from ``prepare``).
    """

    def __init__(
        self,
        path: str,
        max_turns: int,
        ttl_seconds: float,
        max_conversations: int,
        max_bytes: int = 32 * 1024 * 1024,
        max_per_key: int = 100,
        keep_on_drop: int = 1,
        synchronous: str = "normal",
        busy_seconds: float = BUSY_SECONDS,
        clock: Callable[[], float] = time.time,
        one_thread: Callable[[str], OneThread] = PlainThread,
        sweep_seconds: float = 60.0,
    ) -> None:
        prepare(path)
        self.path = path
        self._bound(max_turns, ttl_seconds, max_conversations, max_bytes, max_per_key,
                    keep_on_drop)
        self.sweep_seconds = sweep_seconds
        self._synchronous = "FULL" if synchronous == "full" else "NORMAL"
        self._busy_seconds = busy_seconds
        self._clock = clock
        self._one_thread = one_thread
        self._opening = threading.Lock()
        self._pid = 0  # the process whose threads and connections these are
        self._reader: OneThread | None = None
        self._writer: OneThread | None = None
        self._read_db: Db | None = None
        self._write_db: Db | None = None
        self._closed = threading.Event()

    # -- reads

    def history(self, conversation_id: str) -> list[Turn]:
        """Reading does not count as use (as in ``MemoryStore``)."""
        rows = self._read(lambda db: db.execute(
            "SELECT t.user, t.assistant, t.partial, t.done_reason, t.tokens FROM turns t "
            "JOIN conversations c ON c.id = t.conversation "
            "WHERE c.id = ? AND c.last_used > ? ORDER BY t.number",
            (conversation_id, self._idle_since())).fetchall())
        return [Turn(_read_text(user), _read_text(assistant), bool(partial), reason, tokens)
                for user, assistant, partial, reason, tokens in rows]

    def owner(self, conversation_id: str) -> str | None:
        row = self._read(lambda db: db.execute(
            "SELECT owner FROM conversations WHERE id = ? AND last_used > ?",
            (conversation_id, self._idle_since())).fetchone())
        return row[0] if row is not None else None

    def conversations(self) -> list[tuple[str, str, int]]:
        rows = self._read(lambda db: db.execute(
            "SELECT c.id, c.owner, (SELECT count(*) FROM turns t WHERE t.conversation = c.id) "
            "FROM conversations c WHERE c.last_used > ? ORDER BY c.used DESC",
            (self._idle_since(),)).fetchall())
        return [(cid, owner, count) for cid, owner, count in rows]

    def tokens_used(self, key_id: str, day: str) -> int:
        row = self._read(lambda db: db.execute(
            "SELECT tokens FROM token_days WHERE key = ? AND day = ?", (key_id, day)).fetchone())
        return int(row[0]) if row is not None else 0

    @property
    def bytes_used(self) -> int:
        """The UTF-8 bytes of everything kept, as the budget counts them."""
        return int(self._read(lambda db: db.execute(
            "SELECT coalesce(sum(bytes), 0) FROM conversations WHERE last_used > ?",
            (self._idle_since(),)).fetchone()[0]))

    def __len__(self) -> int:
        return len(self.conversations())

    def __contains__(self, conversation_id: object) -> bool:
        return isinstance(conversation_id, str) and self.owner(conversation_id) is not None

    # -- writes

    def append(self, conversation_id: str, turn: Turn, owner: str = LOCAL_ID,
               drop: int = 0, spent: Spent | None = None, claim: str = "") -> None:
        """One transaction: see ``MemoryStore.append`` for what it does."""
        def change(db: Db) -> None:
            now = self._clock()
            self._expire(db, now)
            row = db.execute("SELECT owner FROM conversations WHERE id = ?",
                             (conversation_id,)).fetchone()
            if row is None:
                self._start(db, conversation_id, owner, now)
            else:
                db.execute("UPDATE conversations SET last_used = ?, used = ? WHERE id = ?",
                           (now, _next_use(db), conversation_id))
            if drop:
                self._drop_oldest(db, conversation_id, drop)
            size = turn_size(turn)
            db.execute(
                "INSERT INTO turns VALUES (?, (SELECT coalesce(max(number), 0) + 1 FROM turns "
                "WHERE conversation = ?), ?, ?, ?, ?, ?, ?)",
                (conversation_id, conversation_id, _text(turn.user), _text(turn.assistant),
                 int(turn.partial), _plain(turn.done_reason), turn.tokens, size))
            db.execute("UPDATE conversations SET bytes = bytes + ? WHERE id = ?",
                       (size, conversation_id))
            count = _turn_count(db, conversation_id)
            if count > self.max_turns:
                self._drop_oldest(db, conversation_id, count - self.keep_on_drop)
            self._fit_budget(db, conversation_id, row[0] if row is not None else owner)
            _spend(db, spent or {})

        self._write(change)

    def spend(self, spent: Spent) -> None:
        if spent:
            self._write(lambda db: _spend(db, spent))

    def forget(self, conversation_id: str) -> bool:
        def change(db: Db) -> bool:
            found = db.execute("SELECT 1 FROM conversations WHERE id = ?",
                               (conversation_id,)).fetchone() is not None
            _remove(db, conversation_id)
            return found

        return self._write(change)

    def sweep(self) -> None:
        """Apply the bounds to what the file holds, as the settings say now (they may have
        been lowered since it was written): forget idle conversations, the least recently
        used beyond the cap and each key's cap, turns beyond the turn bound (in one block,
        as an append drops them) and beyond the budget; and old token days."""
        def change(db: Db) -> None:
            self._expire(db, self._clock())
            count = db.execute("SELECT count(*) FROM conversations").fetchone()[0]
            for (cid,) in db.execute("SELECT id FROM conversations ORDER BY used LIMIT ?",
                                     (max(0, count - self.max_conversations),)).fetchall():
                _remove(db, cid)
            for owner, mine in db.execute(
                    "SELECT owner, count(*) FROM conversations WHERE owner != ? "
                    "GROUP BY owner HAVING count(*) > ?",
                    (LOCAL_ID, self.max_per_key)).fetchall():
                for (cid,) in db.execute("SELECT id FROM conversations WHERE owner = ? "
                                         "ORDER BY used LIMIT ?",
                                         (owner, mine - self.max_per_key)).fetchall():
                    _remove(db, cid)
            for cid, turns in db.execute("SELECT conversation, count(*) FROM turns "
                                         "GROUP BY conversation HAVING count(*) > ?",
                                         (self.max_turns,)).fetchall():
                self._drop_oldest(db, cid, turns - self.keep_on_drop)
            newest = db.execute("SELECT id, owner FROM conversations ORDER BY used DESC "
                                "LIMIT 1").fetchone()
            if newest is not None:  # it keeps its newest turn, as after an append
                self._fit_budget(db, newest[0], newest[1])
            oldest = datetime.now(timezone.utc).date() - timedelta(days=TOKEN_DAYS_KEPT)
            db.execute("DELETE FROM token_days WHERE day < ?", (oldest.isoformat(),))

        self._write(change)

    def close(self) -> None:
        """Stop the sweep, close the connections and end the threads."""
        self._closed.set()
        if self._pid != os.getpid():
            return  # nothing was opened in this process
        for thread, attribute in ((self._reader, "_read_db"), (self._writer, "_write_db")):
            if thread is None:
                continue
            db = getattr(self, attribute)
            if db is not None:
                thread.run(db.close)
                setattr(self, attribute, None)
            thread.close()
        self._pid = 0

    # -- the rules, in SQL (MemoryStore's, one for one)

    def _start(self, db: Db, conversation_id: str, owner: str, now: float) -> None:
        if owner != LOCAL_ID:
            mine = db.execute("SELECT count(*) FROM conversations WHERE owner = ?",
                              (owner,)).fetchone()[0]
            if mine >= self.max_per_key:
                _remove(db, db.execute("SELECT id FROM conversations WHERE owner = ? "
                                       "ORDER BY used LIMIT 1", (owner,)).fetchone()[0])
        db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                   (conversation_id, owner, now, _next_use(db), len(_text(conversation_id))))
        count = db.execute("SELECT count(*) FROM conversations").fetchone()[0]
        for (cid,) in db.execute("SELECT id FROM conversations ORDER BY used LIMIT ?",
                                 (max(0, count - self.max_conversations),)).fetchall():
            _remove(db, cid)

    def _fit_budget(self, db: Db, newest_id: str, newest_owner: str) -> None:
        """Over the budget, the key that keeps the most gives way (``MemoryStore``)."""
        while db.execute("SELECT coalesce(sum(bytes), 0) FROM conversations"
                         ).fetchone()[0] > self.max_bytes:
            heavy = db.execute("SELECT owner FROM conversations GROUP BY owner "
                               "ORDER BY sum(bytes) DESC, min(used) LIMIT 1").fetchone()[0]
            victim = db.execute("SELECT id FROM conversations WHERE owner = ? AND id != ? "
                                "ORDER BY used LIMIT 1", (heavy, newest_id)).fetchone()
            if victim is not None:
                _remove(db, victim[0])
            elif heavy == newest_owner and _turn_count(db, newest_id) > 1:
                self._drop_oldest(db, newest_id, 1)
            else:
                other = db.execute("SELECT id FROM conversations WHERE id != ? "
                                   "ORDER BY used LIMIT 1", (newest_id,)).fetchone()
                if other is None:
                    return  # one turn alone over the budget: it is kept until the next one
                _remove(db, other[0])

    def _drop_oldest(self, db: Db, conversation_id: str, count: int) -> None:
        rows = db.execute("SELECT number, bytes FROM turns WHERE conversation = ? "
                          "ORDER BY number LIMIT ?", (conversation_id, count)).fetchall()
        if not rows:
            return
        db.execute("DELETE FROM turns WHERE conversation = ? AND number <= ?",
                   (conversation_id, rows[-1][0]))
        db.execute("UPDATE conversations SET bytes = bytes - ? WHERE id = ?",
                   (sum(size for _, size in rows), conversation_id))

    def _expire(self, db: Db, now: float) -> None:
        for (cid,) in db.execute("SELECT id FROM conversations WHERE last_used <= ?",
                                 (now - self.ttl_seconds,)).fetchall():
            _remove(db, cid)

    def _idle_since(self) -> float:
        return self._clock() - self.ttl_seconds

    # -- threads and connections

    def _read(self, query: Callable[[Db], T]) -> T:
        reader, _ = self._threads()

        def job() -> T:
            if self._read_db is None:
                db = self._connect()
                db.execute("PRAGMA query_only = ON")  # no lock: it cannot fail for one
                self._read_db = db
            return query(self._read_db)

        return self._run(reader, job)

    def _write(self, change: Callable[[Db], T]) -> T:
        _, writer = self._threads()

        def job() -> T:
            if self._write_db is None:
                self._write_db = self._connect()
            db = self._write_db
            db.execute("BEGIN IMMEDIATE")
            try:
                result = change(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

        return self._run(writer, job)

    def _run(self, thread: OneThread, job: Callable[[], T]) -> T:
        def guarded() -> tuple[T | None, sqlite3.Error | None]:
            # Caught in the thread: gevent's pool would print a traceback for it.
            try:
                return job(), None
            except sqlite3.Error as exc:
                return None, exc

        result, error = thread.run(guarded)
        if error is not None:
            logger.error("the store %s failed: %s", self.path, error)
            raise StoreUnavailable()
        return cast(T, result)

    def _connect(self) -> Db:
        # Made in the thread that uses it; check_same_thread is off because a pool may
        # replace a thread, not because two threads share a connection.
        db = sqlite3.connect(self.path, timeout=self._busy_seconds, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _threads(self) -> tuple[OneThread, OneThread]:
        """The reader and the writer of this process, made on first use (also after a
        fork: a thread does not survive one, and a connection must not cross one)."""
        if self._pid != os.getpid():
            with self._opening:
                if self._pid != os.getpid():
                    self._read_db = self._write_db = None  # a parent's: left alone
                    self._reader = self._one_thread("pi-agent-store-read")
                    self._writer = self._one_thread("pi-agent-store-write")
                    self._pid = os.getpid()
                    if self.sweep_seconds > 0:
                        threading.Thread(target=self._sweep_every, name="pi-agent-store-sweep",
                                         daemon=True).start()
        assert self._reader is not None and self._writer is not None
        return self._reader, self._writer

    def _sweep_every(self) -> None:
        # A greenlet under gevent (threading is patched), else a thread; either way it
        # waits for the writer thread like any caller.
        while not self._closed.wait(self.sweep_seconds):
            try:
                self.sweep()
            except StoreUnavailable:
                pass  # logged; the next sweep tries again


def _next_use(db: Db) -> int:
    return int(db.execute("SELECT coalesce(max(used), 0) + 1 FROM conversations").fetchone()[0])


def _turn_count(db: Db, conversation_id: str) -> int:
    return int(db.execute("SELECT count(*) FROM turns WHERE conversation = ?",
                          (conversation_id,)).fetchone()[0])


def _remove(db: Db, conversation_id: str) -> None:
    db.execute("DELETE FROM turns WHERE conversation = ?", (conversation_id,))
    db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))


def _spend(db: Db, spent: Spent) -> None:
    db.executemany(
        "INSERT INTO token_days VALUES (?, ?, ?) "
        "ON CONFLICT (key, day) DO UPDATE SET tokens = tokens + excluded.tokens",
        [(key_id, day, count) for (key_id, day), count in spent.items() if count > 0])
