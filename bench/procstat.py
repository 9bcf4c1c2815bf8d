"""CPU time and resident memory of a process tree, read from /proc (Linux)."""
from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")
TICK_SECONDS = 1 / _TICKS  # the resolution of the CPU times in /proc
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(name))
    return tree


def tree_pids(root: int) -> list[int]:
    """Return ``root`` and all its descendants that are alive now."""
    tree = _children()
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    return pids


def _read(pid: int, name: str) -> bytes | None:
    """Return /proc/<pid>/<name>, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return None


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds of ``pids``: each one's own, not its waited-for children."""
    total = 0
    for pid in pids:
        stat = _read(pid, "stat")
        if stat is not None:
            fields = stat.rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def rss_bytes(pids: list[int]) -> int:
    """Resident set size of ``pids`` added up."""
    total = 0
    for pid in pids:
        statm = _read(pid, "statm")
        if statm is not None:
            total += int(statm.split()[1]) * _PAGE
    return total


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size of ``pids`` added up: shared pages counted once in all."""
    total = 0
    for pid in pids:
        rollup = _read(pid, "smaps_rollup")
        for line in (rollup or b"").splitlines():
            if line.startswith(b"Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total
