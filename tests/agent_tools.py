"""Tools of the tests' own, named in agents files as ``tests.agent_tools:<function>``."""
from __future__ import annotations

import itertools
import time


def add(a: int, b: int = 1) -> int:
    """Add two whole numbers.

    The model sees only the first paragraph.
    """
    return a + b


def fails(reason: str) -> str:
    """Always fails, with the reason given."""
    raise RuntimeError(reason)


NOT_A_FUNCTION = 42


class Opaque:
    """A type pydantic cannot describe."""


def takes_opaque(thing: Opaque) -> str:
    """Cannot be offered to a model."""
    return str(thing)


def slow(seconds: float) -> str:
    """Sleep, then say so: a tool that takes its time."""
    time.sleep(seconds)
    return f"slept {seconds:g} s"


_calls = itertools.count(1)


def counter() -> int:
    """How many times this tool ran in this process: a repeated call that ran again shows."""
    return next(_calls)


def repeat(text: str, times: int) -> str:
    """Say ``text`` ``times`` times: a tool with a long answer."""
    return text * times
