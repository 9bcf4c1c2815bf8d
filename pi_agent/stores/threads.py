"""One OS thread that runs a store's jobs one after another (the SQLite store's writer and
reader), and waits for each: the plain kind here, gevent's in app.py."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

T = TypeVar("T")


class OneThread(Protocol):
    """One OS thread that runs jobs one after another; ``run`` waits for the job."""

    def run(self, job: Callable[[], T]) -> T: ...

    def close(self) -> None: ...


class PlainThread:
    """A ``OneThread`` where nothing patched ``threading`` (the gthread and sync workers,
    other WSGI servers, tests). Under gevent, create_app passes one of gevent's pool."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    def run(self, job: Callable[[], T]) -> T:
        return self._executor.submit(job).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
