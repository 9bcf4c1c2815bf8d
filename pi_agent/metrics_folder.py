"""The folder where several workers keep their metrics (prometheus-client's multiprocess
mode), run by gunicorn's master: made fresh before the workers start, a dead worker's live
gauges taken out of it, removed when the master exits.

Standard library only: prometheus-client loads ssl, which gunicorn's master must not
import before the gevent worker patches it. ``forget_worker`` is therefore the library's
``multiprocess.mark_process_dead``, written out (tests/test_metrics.py checks that the two
agree on which files they remove).
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import MutableMapping

from .config import METRICS_FOLDER_VARIABLE

# The gauges' multiprocess modes whose values are a live process's only.
LIVE_GAUGE_MODES = ("liveall", "livemin", "livemax", "livesum", "livemostrecent")


def prepare(environ: MutableMapping[str, str], workers: int) -> str:
    """For several ``workers``, make an empty folder owned by this process (the master) and
    name it in ``environ`` for the workers it forks; return it. A folder named there before
    is not reused: values left by an earlier run would be read as this one's. One worker
    keeps its metrics in its memory: "" and no folder named."""
    environ.pop(METRICS_FOLDER_VARIABLE, None)
    if workers <= 1:
        return ""
    folder = tempfile.mkdtemp(prefix="pi-agent-metrics-")
    environ[METRICS_FOLDER_VARIABLE] = folder
    return folder


def forget_worker(folder: str, pid: int) -> None:
    """Take a dead worker's live gauges out (its counters and histograms stay counted)."""
    for mode in LIVE_GAUGE_MODES:
        for path in glob.glob(os.path.join(folder, f"gauge_{mode}_{pid}.db")):
            os.remove(path)


def remove_folder(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
