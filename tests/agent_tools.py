"""Tools of the tests' own, named in agents files as ``tests.agent_tools:<function>``."""
from __future__ import annotations


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
