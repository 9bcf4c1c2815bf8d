"""Tools an agent may call: the built-in ones (builtin_tools.py) and the owner's own, named
``"package.module:function"``. Each is a function with the JSON schema the model sees (made
from its signature and type hints, by pydantic) and its description (its docstring); the
arguments the model sends are checked against the signature before the function runs."""
from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from . import builtin_tools

# What the model gets back from a tool, at most.
MAX_OUTPUT_CHARS = 2000
_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class ToolSpecError(ValueError):
    """A tool named in the agents file cannot be used; the message says why, in one line."""


class ToolError(Exception):
    """A tool call failed; the model is told ``error: <message>``."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call by ``name``."""

    name: str
    description: str
    parameters: dict[str, Any]  # the JSON schema of the arguments object
    function: Callable[..., Any]
    arguments: type[BaseModel]  # checks the arguments the model sends

    def definition(self) -> dict[str, Any]:
        """The tool as Ollama's ``tools`` list takes it."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}

    def call(self, arguments: dict[str, Any]) -> str:
        """Run the tool with the model's arguments; its result as text for the model.

        :raise ToolError: the arguments do not fit the signature, or the tool raised.
        """
        try:
            checked = self.arguments.model_validate(arguments)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "arguments"
            raise ToolError(f"bad arguments: {where}: {first['msg']}") from None
        try:
            result = self.function(**{name: getattr(checked, name)
                                      for name in self.arguments.model_fields})
        except Exception as exc:  # a tool's failure is the model's to read, not the turn's end
            raise ToolError(f"{type(exc).__name__}: {_line(exc)}"[:200]) from None
        return as_text(result)[:MAX_OUTPUT_CHARS]


@dataclass(frozen=True)
class Toolbox:
    """What an agent's turn runs its tool loop with (steps.py): its tools, its cap on the
    model calls that offer them, and the time one tool call may take."""

    tools: tuple[Tool, ...]
    max_steps: int
    timeout: float

    def definitions(self) -> list[dict[str, Any]]:
        return [tool.definition() for tool in self.tools]


def as_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    if isinstance(result, BaseModel):
        return result.model_dump_json()
    return json.dumps(result, ensure_ascii=False, default=str)


def tool_from_function(function: Callable[..., Any], name: str | None = None) -> Tool:
    """Describe ``function`` as a tool: its signature gives the schema, its docstring the
    description.

    :raise ToolSpecError: a parameter the model could not fill (``*args``, ``**kwargs``).
    """
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ToolSpecError(f"{function.__name__}: *args and **kwargs cannot be tool "
                                "arguments")
        annotation = Any if parameter.annotation is parameter.empty else parameter.annotation
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    try:
        hints = inspect.get_annotations(function, eval_str=True)
    except Exception as exc:
        raise ToolSpecError(f"{function.__name__}: its type hints cannot be read: "
                            f"{_line(exc)}") from None
    for key, (annotation, default) in list(fields.items()):
        fields[key] = (hints.get(key, annotation), default)
    try:
        model = create_model(
            f"{function.__name__}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        schema = model.model_json_schema()
    except Exception as exc:  # a type pydantic cannot describe as JSON schema
        raise ToolSpecError(f"{function.__name__}: its arguments cannot be described to the "
                            f"model: {_line(exc)}") from None
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    doc = inspect.getdoc(function) or ""
    return Tool(name or function.__name__, doc.split("\n\n")[0].replace("\n", " "), schema,
                function, model)


BUILTIN: dict[str, Tool] = {
    function.__name__: tool_from_function(function) for function in builtin_tools.FUNCTIONS
}


def resolve_tools(specs: Iterable[str]) -> tuple[Tool, ...]:
    """The tools an agent names: built-in names or ``"package.module:function"``.

    :raise ToolSpecError: an unknown built-in tool, a function that cannot be imported, or
        two tools with one name.
    """
    tools: list[Tool] = []
    for spec in specs:
        if ":" not in spec:
            if spec not in BUILTIN:
                raise ToolSpecError(f"unknown built-in tool {spec!r} (the built-in tools: "
                                    f"{', '.join(sorted(BUILTIN))})")
            tools.append(BUILTIN[spec])
            continue
        tools.append(tool_from_function(_import(spec)))
    names = [tool.name for tool in tools]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ToolSpecError(f"two tools are named {twice[0]!r}")
    return tuple(tools)


def _import(spec: str) -> Callable[..., Any]:
    if not _SPEC.fullmatch(spec):
        raise ToolSpecError(f"{spec!r} is not a built-in tool nor \"package.module:function\"")
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever a module raises on import, it is not a tool
        raise ToolSpecError(f"cannot import {module_name!r} for tool {spec!r}: "
                            f"{type(exc).__name__}: {_line(exc)}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ToolSpecError(f"{module_name!r} has no function {attribute!r} (tool {spec!r})")
    return function  # type: ignore[no-any-return]


def _line(exc: BaseException) -> str:
    """An exception's message on one line, at most 200 characters: it goes into one line of
    the log or one tool message."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:200]
