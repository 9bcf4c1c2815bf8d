"""API keys: the key file, and the key ring that a running server checks requests against.

The file (``PI_AGENT_KEYS_FILE``) is JSON and holds, for each key, only a SHA-256 hash of
it, with an id, a name, scopes and limits. A key is 256 random bits, so a fast hash is the
right one: a slow password hash on every request would block the gevent loop, and there is
nothing to brute-force. The key itself is shown once, when it is made.

Standard library only: ``gunicorn.conf.py`` reads the file in the master process.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from ..config import LOCAL_ID

# Named as before the move to security/: operators' log filters know this name.
logger = logging.getLogger("pi_agent.keys")

KEY_PREFIX = "pia_"
# A presented key longer than this is not one of ours: it is not even hashed.
MAX_KEY_CHARS = 200
# How often a running server looks at the file for changes.
RELOAD_SECONDS = 1.0
FORMAT_VERSION = 1


class KeyFileError(ValueError):
    """The key file cannot be read or is not a key file; the message says which and why."""


@dataclass(frozen=True)
class ApiKey:
    """One key's record. ``agents`` and ``models`` None mean any; limits None mean none."""

    id: str
    name: str
    hash: str
    agents: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    admin: bool = False
    rpm: int | None = None
    tokens_per_day: int | None = None
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("agents", "models"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_json(cls, data: Any) -> ApiKey:
        if not isinstance(data, dict):
            raise ValueError("a key must be an object")
        key = cls(
            id=_text(data.get("id")), name=_text(data.get("name")), hash=_text(data.get("hash")),
            agents=_names(data.get("agents")), models=_names(data.get("models")),
            admin=data.get("admin") is True, rpm=_limit(data.get("rpm")),
            tokens_per_day=_limit(data.get("tokens_per_day")), created=str(data.get("created", "")),
        )
        if not re.fullmatch(r"[0-9a-f]{64}", key.hash):
            raise ValueError(f"key {key.id}: hash must be 64 hex digits (SHA-256)")
        return key


def new_key() -> str:
    """A new key: 256 random bits, URL-safe, with a prefix that says what it is."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_id() -> str:
    return "key_" + secrets.token_hex(6)


def read_keys(path: str) -> list[ApiKey]:
    """The keys in the file at ``path``; a file that does not exist holds none.

    :raise KeyFileError: the file cannot be read or is not a key file.
    """
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyFileError(f"{path} is not a key file: it has no \"keys\" list")
    try:
        keys = [ApiKey.from_json(item) for item in data["keys"]]
    except ValueError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    # Two entries with one id would share conversations and limits; "local" is the user of
    # a server without keys.
    ids = [key.id for key in keys]
    hashes = [key.hash for key in keys]
    if len(set(ids)) != len(ids) or len(set(hashes)) != len(hashes) or LOCAL_ID in ids:
        raise KeyFileError(f"{path}: two keys share an id or a hash, or one is called "
                           f"{LOCAL_ID!r}")
    return keys


@contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold a lock beside the key file while it is read and written again, so that two
    ``keys create`` at once do not lose a key."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_keys(path: str, keys: list[ApiKey]) -> None:
    """Replace the file at once (a reader sees the old file or the new one, never half).
    A new file is readable by its owner only; a file that is there keeps its mode and group
    (a service's user reads it through its group: docs/deployment.md)."""
    body = json.dumps({"version": FORMAT_VERSION, "keys": [k.to_json() for k in keys]},
                      indent=2) + "\n"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        before: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        before = None
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".keys-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            if before is not None and before.st_gid != os.fstat(f.fileno()).st_gid:
                os.fchown(f.fileno(), -1, before.st_gid)
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(before.st_mode) if before is not None else 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def created_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Runs a function, perhaps in another OS thread, and returns what it returned or raises what
# it raised, as gevent's ``threadpool.apply`` does.
Offload = Callable[[Callable[[], Any]], Any]


class KeyRing:
    """The keys of a running server, read again when the file changes (its size, time or
    inode), looked at no more than once a second. A file that turns bad keeps the keys
    that were read last: a typo while editing must not let anybody in, or lock all out.
    After a failed read the file is read every second until a read succeeds, whatever its
    stamp says: making it readable again (chmod, chown) changes none of the three."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic,
                 offload: Offload | None = None) -> None:
        """``offload`` reads the file on reloads, so that a large one does not stall the
        server's loop; without it the file is read inline. The first read is always inline.

        :raise KeyFileError: the file cannot be read or is not a key file.
        """
        self.path = path
        self._clock = clock
        self._offload = offload
        self._lock = threading.Lock()
        self._checked = clock()
        self._reloading = False
        self._failing = False
        # A bad file at startup stops the server (KeyFileError); later, see reload().
        self._stamp = self._file_stamp()
        self._by_hash = _index(path)

    @property
    def count(self) -> int:
        return len(self._by_hash)

    def reload(self) -> None:
        """Read the file again if it changed since it was read last, or that read failed."""
        stamp = self._file_stamp()
        if stamp == self._stamp and not self._failing:
            return
        try:
            by_hash = self._read()
        except KeyFileError as exc:
            if not self._failing:  # said once, not every second until it is fixed
                logger.error("%s; the keys read before stay in use, and the file is read "
                             "again every second until it can be", exc)
            self._failing = True
            return
        if self._failing:
            logger.warning("the key file %s is read again: %d keys", self.path, len(by_hash))
        self._by_hash, self._stamp, self._failing = by_hash, stamp, False

    def find(self, presented: str) -> ApiKey | None:
        """The key whose hash is the hash of ``presented``, or None."""
        if self._claim_reload():
            try:
                self.reload()
            finally:
                with self._lock:
                    self._reloading = False
        if not presented or len(presented) > MAX_KEY_CHARS:
            return None
        # A dict lookup is not constant-time, but all its timing could tell is how the
        # hash of a guess compares with stored hashes. A key is 256 random bits, so its
        # hash gives no way back to it, nor to a guess any closer than the last.
        return self._by_hash.get(hash_key(presented))

    def _claim_reload(self) -> bool:
        """Whether this caller looks at the file now: once a second, one caller at a time.
        The others go on with the keys as they are rather than wait for a slow read."""
        with self._lock:
            now = self._clock()
            if self._reloading or now - self._checked < RELOAD_SECONDS:
                return False
            self._checked, self._reloading = now, True
            return True

    def _read(self) -> dict[str, ApiKey]:
        if self._offload is None:
            return _index(self.path)
        # The error comes back as a value: gevent's pool prints a traceback of whatever its
        # threads raise, which would put one in the log every second the file stays bad.
        found: dict[str, ApiKey] | KeyFileError = self._offload(lambda: _index_or_error(self.path))
        if isinstance(found, KeyFileError):
            raise found
        return found

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)


def _index(path: str) -> dict[str, ApiKey]:
    """The keys in the file by their hash (read_keys refuses two keys with one hash)."""
    return {key.hash: key for key in read_keys(path)}


def _index_or_error(path: str) -> dict[str, ApiKey] | KeyFileError:
    try:
        return _index(path)
    except KeyFileError as exc:
        return exc


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("id, name and hash must be text")
    return value


def _names(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("agents and models must be lists of names")
    return tuple(value)


def _limit(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("rpm and tokens_per_day must be whole numbers of 1 or more")
    return value
