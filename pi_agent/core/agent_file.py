"""The agents file: TOML (standard library ``tomllib``), checked by pydantic models that
reject unknown keys, made into ``Agent`` objects. Without ``PI_AGENT_AGENTS_FILE`` the
package's own agents.toml is read: the built-in agents, and the documented example."""
from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .agents import Agent, Knowledge, Route
from .tools import ToolSpecError, resolve_tools

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
BUILTIN_FILE = "agents.toml"


class AgentsFileError(ValueError):
    """The agents file cannot be used; the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KnowledgeEntry(_Strict):
    paths: list[str] = Field(min_length=1)
    top_k: int = Field(default=4, ge=1, le=50)
    max_chars: int = Field(default=2400, ge=100, le=100_000)


class RouteEntry(_Strict):
    name: str = Field(pattern=NAME.pattern)
    agent: str | None = None
    reply: str | None = Field(default=None, min_length=1, max_length=4000)
    keywords: list[str] = []
    examples: list[str] = []

    @model_validator(mode="after")
    def _agent_or_reply(self) -> RouteEntry:
        if (self.agent is None) == (self.reply is None):
            raise ValueError(f"route {self.name!r} needs either agent or reply, not both")
        return self


class AgentEntry(_Strict):
    kind: Literal["chat", "router"] = "chat"
    description: str = Field(default="", max_length=1000)
    system: str = Field(default="", max_length=20_000)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    think: bool | None = None
    options: dict[str, Any] = {}
    tools: list[str] = []
    knowledge: KnowledgeEntry | None = None
    fallback: str | None = None
    routes: list[RouteEntry] = []

    @model_validator(mode="after")
    def _fits_its_kind(self) -> AgentEntry:
        if "num_ctx" in self.options:
            raise ValueError("options.num_ctx: every agent uses PI_AGENT_NUM_CTX (another "
                             "value would reload the model, minutes on a Pi)")
        if self.kind == "router" and (not self.routes or self.fallback is None):
            raise ValueError("a router needs routes and a fallback agent")
        if self.kind == "chat" and (self.routes or self.fallback is not None):
            raise ValueError("routes and fallback are for kind = \"router\"")
        return self


class Defaults(_Strict):
    model: str | None = Field(default=None, min_length=1, max_length=200)
    max_steps: int = Field(default=4, ge=1, le=32)
    tool_timeout: float = Field(default=10.0, gt=0, le=600)


class AgentsFile(_Strict):
    defaults: Defaults = Defaults()
    agents: dict[str, AgentEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _routes_lead_somewhere(self) -> AgentsFile:
        for name, entry in self.agents.items():
            if not NAME.fullmatch(name):
                raise ValueError(f"agents.{name}: a name is 1 to 64 letters, digits, - or _")
            targets = [route.agent for route in entry.routes if route.agent is not None]
            for target in targets + ([entry.fallback] if entry.fallback else []):
                found = self.agents.get(target)
                if found is None or found.kind == "router":
                    raise ValueError(f"agents.{name}: {target!r} is not a chat agent of "
                                     "this file")
        return self


def load_agents(path: str = "") -> dict[str, Agent]:
    """The agents of the file at ``path``, or the built-in ones.

    :raise AgentsFileError: the file cannot be read or is not a valid agents file.
    """
    where = path or f"pi_agent/core/{BUILTIN_FILE}"
    try:
        if path:
            raw = Path(path).read_bytes()
        else:
            raw = resources.files(__package__).joinpath(BUILTIN_FILE).read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AgentsFileError(f"{where}: {exc}") from None
    try:
        parsed = AgentsFile.model_validate(data)
    except ValidationError as exc:
        raise AgentsFileError(f"{where}: {_first_problem(exc)}") from None
    try:
        base = str(Path(path).resolve().parent) if path else "."
        return {name: _agent(name, entry, parsed.defaults, base) for name, entry in
                parsed.agents.items()}
    except ToolSpecError as exc:
        raise AgentsFileError(f"{where}: {exc}") from None


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    problem = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
    problem = problem.removeprefix("Value error, ")
    return f"{where}: {problem}" if where else problem


def _agent(name: str, entry: AgentEntry, defaults: Defaults, base: str) -> Agent:
    knowledge = None
    if entry.knowledge is not None:
        k = entry.knowledge
        knowledge = Knowledge(tuple(k.paths), k.top_k, k.max_chars, base)
    try:
        tools = resolve_tools(entry.tools)
    except ToolSpecError as exc:
        raise ToolSpecError(f"agents.{name}.tools: {exc}") from None
    return Agent(
        name=name, description=entry.description, system_prompt=entry.system,
        model=entry.model or defaults.model, options=dict(entry.options), kind=entry.kind,
        think=entry.think, tools=tools, knowledge=knowledge,
        routes=tuple(Route(r.name, r.agent, r.reply, tuple(r.keywords), tuple(r.examples))
                     for r in entry.routes),
        fallback=entry.fallback, max_steps=defaults.max_steps,
        tool_timeout=defaults.tool_timeout,
    )
