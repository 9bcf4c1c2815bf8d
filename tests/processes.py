"""Stopping a process that a test (or the benchmark) started, by its own pid."""
from __future__ import annotations

import subprocess


def stop_process(process: subprocess.Popen[bytes], seconds: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not ended after ``seconds``; reaped either way."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
