"""Agents: a system prompt, a model and Ollama options laid over the configured ones, and
what an agent may use beyond the model (tools, knowledge) or, for a router, where it sends
each message. They come from an agents file (agent_file.py); ``AgentBook`` holds the
current ones and reads the file again when it changes."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from .tools import Tool, Toolbox

logger = logging.getLogger(__name__)

# How often the agents file is looked at for a change (a stat, at most once a second).
CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class Knowledge:
    """Documents an agent answers from: globs of Markdown and text files (relative to the
    agents file's folder), the passages to take per question and their size in all."""

    paths: tuple[str, ...]
    top_k: int = 4
    max_chars: int = 2400
    base: str = "."  # the folder the paths are relative to: the agents file's


@dataclass(frozen=True)
class Route:
    """Where a router sends a message: to ``agent``, or a fixed ``reply`` with no model call."""

    name: str
    agent: str | None = None
    reply: str | None = None
    keywords: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Agent:
    """An agent. ``model`` None means the configured default model; ``options`` are Ollama
    options laid over the configured ones (never ``num_ctx``)."""

    name: str
    description: str
    system_prompt: str
    model: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "chat"  # or "router"
    think: bool | None = None  # sent as Ollama's think when set
    tools: tuple[Tool, ...] = ()
    knowledge: Knowledge | None = None
    routes: tuple[Route, ...] = ()
    fallback: str | None = None
    max_steps: int = 4  # model calls per turn that offer tools
    tool_timeout: float = 10.0  # seconds per tool call

    def resolve_model(self, settings: Settings) -> str:
        return self.model or settings.model

    def resolve_options(self, settings: Settings) -> dict[str, Any]:
        """Return the Ollama options for a call: configuration, then the agent's own, with
        ``num_predict`` never above the configured cap."""
        options = base_options(settings)
        options.update(self.options)
        options["num_predict"] = min(options["num_predict"], settings.num_predict)
        return options

    def toolbox(self) -> Toolbox | None:
        """What the gateway's tool loop runs for this agent; None for an agent without tools."""
        if not self.tools:
            return None
        return Toolbox(self.tools, self.max_steps, self.tool_timeout)


def base_options(settings: Settings) -> dict[str, Any]:
    """The configured Ollama options, which every call starts from."""
    return {
        "temperature": settings.temperature,
        "num_ctx": settings.num_ctx,
        "num_predict": settings.num_predict,
    }


class AgentBook(Mapping[str, Agent]):
    """The agents by name, as ``read`` gives them. With a ``path``, the file is looked at
    at most every ``CHECK_SECONDS`` and read again when it changed; a change that cannot be
    read keeps the agents read before, and says why in the log once."""

    def __init__(self, read: Callable[[], dict[str, Agent]], path: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._agents = read()  # a bad file at startup raises: the server does not start
        self._checked = clock()

    def _stat(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            info = os.stat(self._path)
        except OSError:
            return (0, 0, 0)
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _current(self) -> dict[str, Agent]:
        if self._path is None or self._clock() - self._checked < CHECK_SECONDS:
            return self._agents
        with self._lock:
            if self._clock() - self._checked < CHECK_SECONDS:
                return self._agents
            self._checked = self._clock()
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                self._reload()
        return self._agents

    def _reload(self) -> None:
        try:
            self._agents = self._read()
        except ValueError as exc:  # AgentsFileError: it names the file and the problem
            logger.error("%s; the agents read before stay in use", exc)
            return
        except Exception:  # whatever else a tool module does on import: requests go on
            logger.exception("%s could not be read; the agents read before stay in use",
                             self._path)
            return
        logger.info("agents read again from %s: %s", self._path, ", ".join(self._agents))

    def __getitem__(self, name: str) -> Agent:
        return self._current()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())
