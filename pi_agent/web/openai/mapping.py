"""Chat Completions requests as Ollama chat calls: messages, options, tools, formats.

The mapping follows shared/protocols/openai-chat.md; ``model`` is an Ollama model or, as
``agent:<name>``, an agent preset whose system prompt, model and options apply.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ...config import Settings
from ...core.agents import Agent, base_options
from ...core.context import check_fits
from ...core.knowledge import Library, with_sources
from ...core.prompt import Prompt
from ...errors import AgentNotRunnable, InvalidRequest, UnknownModel
from ...providers.base import ChatCall
from .schemas import (
    ChatCompletionRequest,
    ContentPart,
    JSONObjectFormat,
    JSONSchemaFormat,
    Message,
)

AGENT_PREFIX = "agent:"

# OpenAI's effort levels onto Ollama's think levels ("none" turns thinking off).
THINK_LEVELS: dict[str, bool | str] = {
    "none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
    "xhigh": "high",
}
# Only inline images: the gateway fetches nothing from the internet on a client's behalf.
DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,([A-Za-z0-9+/=\s]+)", re.DOTALL)


def build_prompt(
    body: ChatCompletionRequest, settings: Settings, agents: Mapping[str, Agent],
    library: Library,
) -> Prompt:
    """Map a Chat Completions request onto an Ollama chat call; a conversation's remembered
    turns go in after the agent's system prompt, once the turn has its slot, as many as fit
    the token budget left by the request's own messages (core/context.py).

    An agent's own tools are run by the gateway when the request brings none; a request's
    own tools go to its client as always, and the two are never mixed.

    :raise UnknownModel: 404 for ``agent:<name>`` with no such agent.
    :raise AgentNotRunnable: 501 for a router, which only ``/chat`` runs.
    :raise InvalidRequest: 400 for messages Ollama cannot take.
    """
    agent: Agent | None = None
    model = body.model
    if model.startswith(AGENT_PREFIX):
        agent = agents.get(model[len(AGENT_PREFIX):])
        if agent is None:
            raise UnknownModel(model)
        if agent.kind == "router":
            raise AgentNotRunnable(agent.name, "routes")
        model = agent.resolve_model(settings)
    options = ollama_options(body, agent, settings)

    messages: list[dict[str, Any]] = []
    if agent is not None:
        system = agent.system_prompt
        if agent.knowledge is not None:
            # The sources are in the prompt; OpenAI's format has no place to show them.
            found = library.search(agent, last_user_text(body.messages))
            system = with_sources(system, found)
        messages.append({"role": "system", "content": system})
    given = to_ollama_messages(body.messages)
    check_fits(messages + given, options["num_ctx"])
    history_at = len(messages)
    messages += given

    tools = None
    if body.tools and body.tool_choice != "none":
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    response_format: str | dict[str, Any] | None = None
    if isinstance(body.response_format, JSONObjectFormat):
        response_format = "json"
    elif isinstance(body.response_format, JSONSchemaFormat):
        response_format = body.response_format.json_schema.schema_
    think = THINK_LEVELS[body.reasoning_effort] if body.reasoning_effort else (
        agent.think if agent is not None else None)
    call = ChatCall(model=model, messages=messages, options=options,
                    keep_alive=settings.keep_alive, tools=tools, format=response_format,
                    think=think)
    # tool_choice "none" asks for an answer without tools: the agent's are not offered either.
    toolbox = None if agent is None or body.tools or body.tool_choice == "none" \
        else agent.toolbox()
    return Prompt(call, history_at=history_at, toolbox=toolbox)


def ollama_options(body: ChatCompletionRequest, agent: Agent | None,
                   settings: Settings) -> dict[str, Any]:
    """The configured options (an agent's over them), then the request's own, with
    ``num_predict`` never above the configured cap."""
    options = agent.resolve_options(settings) if agent else base_options(settings)
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None:
            options[name] = value
    if body.stop is not None:
        options["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    limit = body.max_completion_tokens or body.max_tokens
    if limit is not None:
        options["num_predict"] = min(limit, settings.num_predict)
    return options


def to_ollama_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """OpenAI's messages in Ollama's form: string content, base64 ``images``, tool calls
    with their arguments as objects, and tool results that name their tool."""
    converted: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        text, images = text_and_images(message.content, f"messages.{i}.content")
        role = "system" if message.role == "developer" else message.role
        out: dict[str, Any] = {"role": role, "content": text}
        if images:
            out["images"] = images
        if message.role == "assistant" and message.tool_calls:
            out["tool_calls"] = []
            for j, call in enumerate(message.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except (ValueError, RecursionError):
                    arguments = None
                if not isinstance(arguments, dict):
                    raise InvalidRequest(
                        "tool call arguments must be a JSON object, as a string",
                        param=f"messages.{i}.tool_calls.{j}.function.arguments")
                tool_names[call.id] = call.function.name
                out["tool_calls"].append({"id": call.id, "function": {
                    "name": call.function.name, "arguments": arguments}})
        if message.role == "tool":
            name = tool_names.get(message.tool_call_id or "")
            if name is None:
                raise InvalidRequest(
                    "a tool message must answer a tool call of an earlier assistant message "
                    "by its id", param=f"messages.{i}.tool_call_id")
            out["tool_name"] = name
            out["tool_call_id"] = message.tool_call_id
        converted.append(out)
    return converted


def text_and_images(content: str | list[ContentPart] | None, param: str) -> tuple[str, list[str]]:
    """Text and base64 images of a message: Ollama takes the content as one string."""
    if content is None or isinstance(content, str):
        return content or "", []
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        if part.type == "text":
            texts.append(part.text)
            continue
        found = DATA_URL.fullmatch(part.image_url.url)
        if found is None:
            raise InvalidRequest(
                "an image must be inline, as a data:image/...;base64 URL: the gateway does not "
                "fetch URLs", param=f"{param}.{j}.image_url.url")
        images.append(re.sub(r"\s", "", found.group(1)))
    return "\n".join(texts), images


def last_user_text(messages: list[Message]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return text_and_images(message.content, "")[0]
    return ""
