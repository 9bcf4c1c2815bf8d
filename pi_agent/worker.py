"""gunicorn's gevent worker, with gevent loaded in the worker process only.

gunicorn loads its worker class in the master, which only makes the worker object and forks
it. ``gunicorn.workers.ggevent`` imports gevent at its top, which would cost the master about
5 MiB that it never uses. The class here imports nothing of gevent; the forked process turns
itself into gunicorn's own gevent worker before it serves anything. (A gevent that is missing
or too old is then reported by the worker, after the master has bound its address, and
gunicorn stops with "Worker failed to boot".)
"""
from __future__ import annotations

from gunicorn.workers.base_async import AsyncWorker  # type: ignore[import-untyped]


class GeventWorker(AsyncWorker):  # type: ignore[misc]  # gunicorn has no type hints
    """``gunicorn.workers.ggevent.GeventWorker``, once forked (``worker_class`` in
    gunicorn.conf.py). Both are AsyncWorkers built by the same ``__init__``, so the object
    made in the master is a whole gevent worker once its class is swapped."""

    def init_process(self) -> None:
        # The first thing gunicorn calls in the forked process; it never returns.
        from gunicorn.workers.ggevent import GeventWorker as Real  # type: ignore[import-untyped]

        self.__class__ = Real
        Real.init_process(self)
