"""gunicorn's gevent worker, with gevent loaded in the worker process only.

gunicorn loads its worker class in the master, which only makes the worker object and forks
it. ``gunicorn.workers.ggevent`` imports gevent at its top, which would cost the master about
5 MiB that it never uses. The class here imports nothing of gevent; the forked process turns
itself into gunicorn's own gevent worker before it serves anything. (A gevent that is missing
or too old is then reported by the worker, after the master has bound its address, and
gunicorn stops with "Worker failed to boot".)
"""
from __future__ import annotations

import errno
import time
from typing import Any

from gunicorn.workers.base_async import AsyncWorker  # type: ignore[import-untyped]

from .config import ConfigError


class GeventWorker(AsyncWorker):  # type: ignore[misc]  # gunicorn has no type hints
    """``gunicorn.workers.ggevent.GeventWorker``, once forked (``worker_class`` in
    gunicorn.conf.py). Both are AsyncWorkers built by the same ``__init__``, so the object
    made in the master is a whole gevent worker once its class is swapped."""

    def init_process(self) -> None:
        # The first thing gunicorn calls in the forked process; it never returns.
        from gunicorn.workers.ggevent import GeventWorker as Real  # type: ignore[import-untyped]

        self.__class__ = _reporting_config_errors(Real)
        quiet_descriptor_errors(self.log)
        Real.init_process(self)


def _reporting_config_errors(real: type) -> type:
    """``real``, with a configuration the app refuses (an agents file it cannot use, a key
    file gone bad since the master checked it) told in one line, as gunicorn tells an app
    that cannot be imported, and gunicorn stopping with a non-zero exit, not a traceback
    and a worker restarted in a loop."""
    from gunicorn.errors import AppImportError  # type: ignore[import-untyped]

    class Worker(real):  # type: ignore[misc]
        def load_wsgi(self) -> None:
            try:
                super().load_wsgi()
            except ConfigError as exc:
                raise AppImportError(f"pi-agent: {exc}") from None

    Worker.__name__ = Worker.__qualname__ = real.__name__
    return Worker


def guard_body(req: Any, limit: int) -> None:
    """Before gunicorn acts on a request's body (any gunicorn worker's ``pre_request``).

    gunicorn answers ``Expect: 100-continue`` before the app runs, which invites a body
    that the app then refuses with 413: a body declared over ``limit`` is refused without
    the invitation. And gunicorn takes any chunk size (24 hex digits is 2**96 bytes) and
    waits for its bytes; a chunk over ``limit`` is refused at once (a 400 from the app,
    which sees the body fail to read).
    """
    declared = next((value for name, value in req.headers if name == "CONTENT-LENGTH"), "")
    if declared.isdigit() and int(declared) > limit:
        req._expected_100_continue = False
    reader: Any = getattr(req.body, "reader", None)
    parse_chunk_size = getattr(reader, "parse_chunk_size", None)
    if parse_chunk_size is None:
        return

    def parse_bounded_chunk_size(unreader: Any, data: Any = None) -> Any:
        size, rest = parse_chunk_size(unreader, data=data)
        if size > limit:
            from gunicorn.http.errors import InvalidChunkSize  # type: ignore[import-untyped]

            raise InvalidChunkSize(b"chunk over the body limit")
        return size, rest

    # Looked up on the instance by gunicorn's chunk parser each time it reads a size.
    reader.parse_chunk_size = parse_bounded_chunk_size


# How often the worker says that it ran out of descriptors, at most.
DESCRIPTOR_ERROR_SECONDS = 10.0


def quiet_descriptor_errors(log: Any) -> None:
    """Report running out of descriptors once in a while, not once per attempt.

    gevent's server tries again to accept a connection after each failure (waiting 10 ms
    to 1 s), and its hub prints a traceback for every one: ~28 a second for as long as
    the descriptors are gone. Those go through here, counted; every other error is the
    hub's as before (gevent documents replacing ``handle_error`` on the hub for this).
    """
    import gevent  # type: ignore[import-untyped]

    hub = gevent.get_hub()
    handle_error = hub.handle_error
    said = [time.monotonic() - DESCRIPTOR_ERROR_SECONDS]  # when the last line was written
    failed: list[str] = []  # the failures since, not said yet

    def say() -> None:
        log.error("pi-agent: out of file descriptors (%s): %d failures in the last "
                  "%.0f s; see docs/security.md", failed[-1], len(failed),
                  DESCRIPTOR_ERROR_SECONDS)
        said[0] = time.monotonic()
        failed.clear()

    def handle(context: Any, kind: Any, value: Any, tb: Any) -> None:
        if not (isinstance(value, OSError) and value.errno in (errno.EMFILE, errno.ENFILE)):
            handle_error(context, kind, value, tb)
            return
        if not failed:
            # The first failure in a while is said at once, the ones after it together when
            # the period is up: a count is said even if the failures stop before then.
            wait = said[0] + DESCRIPTOR_ERROR_SECONDS - time.monotonic()
            gevent.spawn_later(max(0.0, wait), say)
        failed.append(value.strerror or str(value))

    hub.handle_error = handle
