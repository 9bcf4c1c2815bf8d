"""The SQLite store's file: made with its folder, checked, its schema created or checked.

Standard library only: gunicorn's master calls ``prepare`` before it binds, so that a state
file the server cannot use stops it with one line instead of a worker that fails to boot.
"""
from __future__ import annotations

import os
import sqlite3
import time

FILE_NAME = "store.sqlite3"
# The schema's version, kept in the file's user_version: a later release that changes the
# tables migrates a file of an older version, and a file of a newer one is refused.
SCHEMA_VERSION = 1
# How long a connection waits for another process's write lock (a second server on the
# same file, sqlite3 at the shell) before it gives up.
BUSY_SECONDS = 5.0

# Texts are kept as UTF-8 bytes written with "surrogatepass": JSON lets a message carry a
# lone surrogate, which sqlite3 cannot write as TEXT.
SCHEMA = """
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,         -- the id of the API key that made it
    last_used REAL NOT NULL,     -- the wall clock (seconds since 1970, UTC): idle time
    used INTEGER NOT NULL,       -- a count that orders its uses: the least recently used
    bytes INTEGER NOT NULL       -- its id's and its turns' UTF-8 bytes, for the budget
) WITHOUT ROWID;
CREATE INDEX conversations_by_use ON conversations (used);
CREATE INDEX conversations_by_idle ON conversations (last_used);
CREATE INDEX conversations_by_owner ON conversations (owner, used);
CREATE TABLE turns (
    conversation TEXT NOT NULL,
    number INTEGER NOT NULL,     -- ascending within the conversation
    user BLOB NOT NULL,
    assistant BLOB NOT NULL,
    partial INTEGER NOT NULL,    -- 1: cut short (the client left, a cancel, a shutdown)
    done_reason TEXT NOT NULL,
    tokens INTEGER NOT NULL,     -- what the turn takes in a prompt (0: not known)
    bytes INTEGER NOT NULL,
    PRIMARY KEY (conversation, number)
) WITHOUT ROWID;
CREATE TABLE token_days (
    key TEXT NOT NULL,
    day TEXT NOT NULL,           -- the UTC day, YYYY-MM-DD
    tokens INTEGER NOT NULL,     -- completion tokens counted against the key's quota
    PRIMARY KEY (key, day)
) WITHOUT ROWID;
"""


class StoreFileError(Exception):
    """The state file or its folder cannot be used; the message says which and why."""


def state_file(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def prepare(path: str) -> None:
    """Make the file's folder (0700) and the file (0600) if they are missing, and check
    that the file is a store of a known schema that this process can read and write:
    creates the schema in a new file, and writes when it was last opened.

    :raise StoreFileError: one line that names the file or folder and the problem.
    """
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StoreFileError(f"cannot create the folder {folder}: {exc.strerror}") from None
    # SQLite writes its journal (the WAL and its index) beside the file.
    probe = os.path.join(folder, f".{FILE_NAME}-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise StoreFileError(f"cannot write in the folder {folder}: {exc.strerror}") from None
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as exc:
        raise StoreFileError(f"cannot open {path} to read and write: {exc.strerror}") from None
    try:
        db = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreFileError(f"cannot open {path}: {exc}") from None
    try:
        _check(db, path)
    except sqlite3.DatabaseError as exc:
        # "file is not a database", "database disk image is malformed", "unable to open
        # database file" (a folder where the journal cannot be made), "readonly database"
        raise StoreFileError(f"cannot use {path}: {exc}") from None
    finally:
        db.close()


def _check(db: sqlite3.Connection, path: str) -> None:
    # Read first, and write nothing to a file that is not ours or is of a newer schema.
    problem = db.execute("PRAGMA quick_check").fetchone()[0]
    if problem != "ok":
        raise StoreFileError(f"cannot use {path}: it is damaged ({problem})")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreFileError(f"cannot use {path}: its schema version {version} is of a "
                             f"newer release (this one knows {SCHEMA_VERSION})")
    if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise StoreFileError(f"cannot use {path}: it is not a Pi Agent Server store")
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise StoreFileError(f"cannot use {path}: its journal cannot be a WAL ({mode})")
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # A write, so that a file or folder that cannot be written is found now.
        db.execute("INSERT OR REPLACE INTO meta VALUES ('opened', ?)", (str(time.time()),))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled back itself (a full disk)
            db.execute("ROLLBACK")
        raise
