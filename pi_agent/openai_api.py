"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``GET /v1/models[/<id>]``.

Requests are mapped onto Ollama's ``/api/chat`` and answered in OpenAI's wire format
(shared/protocols/openai-chat.md), through the same admission control, cancellation,
timeouts and watchdog as ``/chat``. ``model`` names an Ollama model, or an agent preset as
``agent:<name>``. Without an ``X-Conversation-Id`` header the endpoint is stateless, as
OpenAI's is; with one, the conversation's remembered turns go before the messages and the
new turn is remembered.
"""
from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from collections.abc import Callable, Generator
from typing import Any

from flask import Blueprint, Response, g, request

from .agents import Agent, base_options
from .auth import (
    allow_agent,
    allow_model,
    require_conversation,
    current_key,
    may_use_agent,
    may_use_model,
)
from .chat import Recorder, remembered_messages
from .config import Settings
from .errors import (
    ClientGone,
    InvalidRequest,
    ModelNotFound,
    PiAgentError,
    ProviderError,
    UnknownModel,
    UpstreamError,
    ValidationFailed,
    openai_error,
)
from .events import EventStream, Timeouts
from .health import full_model_name
from .memory import Turn
from .openai_schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    ContentPart,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    JSONObjectFormat,
    JSONSchemaFormat,
    Message,
    ModelList,
    ModelObject,
    ResponseFunction,
    ResponseToolCall,
)
from .providers.base import ChatCall, ChatChunk, ToolCall
from .schemas import CONVERSATION_ID, FieldProblem
from .state import AppState, current_state
from .streaming import StreamBody, client_probe, never
from .turns import WatchedTurn
from .validation import parse_body

bp = Blueprint("openai", __name__, url_prefix="/v1")

AGENT_PREFIX = "agent:"
SYSTEM_FINGERPRINT = "fp_pi_agent"
# Agents exist from the start of the process; OpenAI's model objects need a date.
STARTED = int(time.time())

# OpenAI's effort levels onto Ollama's think levels ("none" turns thinking off).
THINK_LEVELS: dict[str, bool | str] = {
    "none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
    "xhigh": "high",
}
# Only inline images: the gateway fetches nothing from the internet on a client's behalf.
DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,([A-Za-z0-9+/=\s]+)", re.DOTALL)


@bp.post("/chat/completions")
def chat_completions() -> Response:
    body = parse_body(ChatCompletionRequest)
    if body.n not in (None, 1):
        raise InvalidRequest("n must be 1: Ollama makes one choice per request", param="n")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true",
                             param="stream_options")
    state = current_state()
    settings = state.settings
    _check_bounds(body, settings)
    _allow(body.model, state)
    conversation_id = _conversation_id()
    call = build_call(body, state, conversation_id)
    user_text = _last_user_text(body.messages)
    memory = state.memory if conversation_id else None
    key = current_key()

    def record(answer: str, partial: bool, done_reason: str) -> None:
        # As in /chat, only an answer the model gave is remembered, and only as the answer
        # to a user's message.
        if memory is not None and conversation_id and answer and user_text:
            memory.append_turn(conversation_id, Turn(user=user_text, assistant=answer,
                                                     partial=partial, done_reason=done_reason),
                               key.id)

    def count(tokens: int) -> None:
        state.limits.add_tokens(key, tokens)

    # Admission keeps one turn per conversation; a stateless request is its own.
    turn_id = conversation_id or "openai-" + uuid.uuid4().hex
    probe = client_probe(request.environ)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _stream(state, call, body.model, turn_id, record, count, probe, include_usage)

    turn = WatchedTurn(state, turn_id, probe, key.id)
    try:
        turn.begin()
        result = turn.run(lambda abort: state.provider.chat(call, abort))
    except ProviderError as exc:
        raise _for_client(exc, body.model) from None
    finally:
        turn.release()
    record(result.content, False, result.done_reason)
    count(result.completion_tokens)
    message: dict[str, Any] = {"role": "assistant", "content": result.content, "refusal": None}
    if result.tool_calls:
        message["content"] = result.content or None
        message["tool_calls"] = [
            ResponseToolCall(id=c.id, type="function",
                             function=ResponseFunction(name=c.name, arguments=_arguments(c)))
            for c in result.tool_calls
        ]
    if result.thinking:
        message["reasoning"] = result.thinking
    completion = ChatCompletion(
        id=_completion_id(), object="chat.completion", created=int(time.time()),
        model=body.model, system_fingerprint=SYSTEM_FINGERPRINT,
        choices=[Choice(index=0, message=AssistantMessage(**message), logprobs=None,
                        finish_reason=_finish_reason(result.done_reason,
                                                     bool(result.tool_calls)))],
        usage=_usage(result),
    )
    return _json(completion.model_dump_json(exclude_unset=True))


@bp.get("/models")
def list_models() -> Response:
    """The installed models and the agents that the request's key may use."""
    return _json(ModelList(object="list", data=_models(current_state())).model_dump_json())


@bp.get("/models/<path:model_id>")
def show_model(model_id: str) -> Response:
    for model in _models(current_state()):
        if model.id == model_id or full_model_name(model.id) == full_model_name(model_id):
            return _json(model.model_dump_json())
    raise UnknownModel(model_id)


def build_call(
    body: ChatCompletionRequest, state: AppState, conversation_id: str | None
) -> ChatCall:
    """Map a Chat Completions request onto an Ollama chat call.

    :raise UnknownModel: 404 for ``agent:<name>`` with no such agent.
    :raise InvalidRequest: 400 for messages Ollama cannot take.
    """
    settings = state.settings
    agent: Agent | None = None
    model = body.model
    if model.startswith(AGENT_PREFIX):
        agent = state.agents.get(model[len(AGENT_PREFIX):])
        if agent is None:
            raise UnknownModel(model)
        model = agent.resolve_model(settings)
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

    messages: list[dict[str, Any]] = []
    if agent is not None:
        messages.append({"role": "system", "content": agent.system_prompt})
    if conversation_id and state.memory is not None:
        messages += remembered_messages(state.memory.get_history(conversation_id))
    messages += to_ollama_messages(body.messages)

    tools = None
    if body.tools and body.tool_choice != "none":
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    response_format: str | dict[str, Any] | None = None
    if isinstance(body.response_format, JSONObjectFormat):
        response_format = "json"
    elif isinstance(body.response_format, JSONSchemaFormat):
        response_format = body.response_format.json_schema.schema_
    think = THINK_LEVELS[body.reasoning_effort] if body.reasoning_effort else None
    return ChatCall(model=model, messages=messages, options=options,
                    keep_alive=settings.keep_alive, tools=tools, format=response_format,
                    think=think)


def to_ollama_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """OpenAI's messages in Ollama's form: string content, base64 ``images``, tool calls
    with their arguments as objects, and tool results that name their tool."""
    converted: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        text, images = _content(message.content, f"messages.{i}.content")
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


def _content(content: str | list[ContentPart] | None, param: str) -> tuple[str, list[str]]:
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


def _stream(state: AppState, call: ChatCall, model: str, turn_id: str, record: Recorder,
            count: Callable[[int], None], probe: Callable[[], bool] | None,
            include_usage: bool) -> Response:
    """Answer with chat.completion.chunk events.

    The response starts with the model's first output, or with a keep-alive comment once
    the heartbeat interval has passed without one: a failure before that (unknown model,
    busy queue, cancel) still gets its HTTP status and an error body, which OpenAI's SDKs
    turn into the right exception; after it, the failure is one ``error`` event.
    """
    settings = state.settings
    encoder = OpenAIChunks(model, include_usage)
    ticket = state.admission.enter(turn_id)
    cancel = state.running.add(turn_id, current_key().id)
    events: Generator[bytes, None, None] | None = None

    def finish() -> None:
        try:
            if events is not None:
                events.close()  # closes the upstream, then gives the slot back...
        finally:
            state.admission.leave(ticket)  # ...which a relay that never started did not do
            state.running.remove(turn_id, cancel)

    try:
        stream = EventStream(
            fmt=encoder, conversation_id=turn_id, agent="", model=call.model,
            provider=state.provider, admission=state.admission, ticket=ticket, cancel=cancel,
            make_call=lambda: call, record=record, client_gone=probe or never,
            shutdown=state.shutdown, count_tokens=count,
            timeouts=Timeouts(settings.heartbeat_seconds, settings.first_token_timeout,
                              settings.idle_timeout, settings.total_timeout),
        )
        events = relay = stream.relay()
        head = next((data for data in relay if data), b"")
    except BaseException:
        finish()
        raise
    if stream.failure is not None or not head:
        finish()
        if stream.failure is None:
            raise ClientGone()
        raise _for_client(stream.failure, model)
    return Response(
        StreamBody(itertools.chain((head,), relay), cleanup=finish),
        content_type=encoder.content_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        direct_passthrough=True,
    )


class OpenAIChunks:
    """Writes a reply as OpenAI's ``chat.completion.chunk`` events, ending with ``[DONE]``.

    One ``id`` and ``created`` for the whole stream; ``role`` only in the first delta; a
    last choice chunk with an empty delta and the finish reason; a usage chunk only when
    asked for. Queue and start events are not part of OpenAI's format: they write nothing.
    """

    content_type = "text/event-stream; charset=utf-8"

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = _completion_id()
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self._started = False
        self._tool_calls = 0
        # A token's chunk is made once per token: its JSON is the model's, with the text put
        # between a prefix and a suffix cut from a chunk that pydantic wrote once.
        # The delta comes after the model's name, which may hold anything: cut at the last.
        marker = "PI-AGENT-TOKEN"
        template = self._event(Delta(content=marker))
        self._before, _, self._after = template.rpartition(json.dumps(marker).encode())

    def start(self, conversation_id: str, agent: str, model: str) -> bytes:
        return b""

    def queued(self, position: int) -> bytes:
        return b""

    def ping(self) -> bytes:
        return b": keep-alive\n\n"

    def chunk(self, chunk: ChatChunk) -> bytes:
        out = b""
        if chunk.tool_calls:
            deltas = [self._tool_call(call) for call in chunk.tool_calls]
            if not self._started:
                self._started = True
                out += self._event(Delta(role="assistant", content=None, tool_calls=deltas))
            else:
                out += self._event(Delta(tool_calls=deltas))
        if (chunk.content or chunk.thinking) and not self._started:
            self._started = True
            out += self._event(Delta(role="assistant", content=""))
        if chunk.thinking:
            out += self._event(Delta(reasoning=chunk.thinking))
        if chunk.content:
            text = json.dumps(chunk.content, ensure_ascii=False).encode()
            out += self._before + text + self._after
        return out

    def done(self, chunk: ChatChunk, conversation_id: str, timings: dict[str, int]) -> bytes:
        out = self.chunk(chunk)
        if not self._started:  # an empty reply still has its role
            self._started = True
            out += self._event(Delta(role="assistant", content=""))
        out += self._event(Delta(), _finish_reason(chunk.done_reason, self._tool_calls > 0))
        if self.include_usage:
            usage = ChatCompletionChunk(
                id=self.id, object="chat.completion.chunk", created=self.created,
                model=self.model, system_fingerprint=SYSTEM_FINGERPRINT, choices=[],
                usage=_usage(chunk))
            out += b"data: " + usage.model_dump_json(exclude_unset=True).encode() + b"\n\n"
        return out + b"data: [DONE]\n\n"

    def error(self, exc: PiAgentError) -> bytes:
        body = openai_error(exc).model_dump_json()
        return b"data: " + body.encode() + b"\n\n"

    def _tool_call(self, call: ToolCall) -> DeltaToolCall:
        # Ollama sends a call whole: its one delta has the id, the name and all arguments.
        index = self._tool_calls
        self._tool_calls += 1
        return DeltaToolCall(index=index, id=call.id, type="function",
                             function=DeltaFunction(name=call.name, arguments=_arguments(call)))

    def _event(self, delta: Delta, finish_reason: str | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.id, object="chat.completion.chunk", created=self.created, model=self.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[ChunkChoice(index=0, delta=delta, logprobs=None,
                                 finish_reason=finish_reason)],
        )
        if self.include_usage:
            chunk.usage = None  # every chunk but the last says "usage": null
        return b"data: " + chunk.model_dump_json(exclude_unset=True).encode() + b"\n\n"


def _for_client(exc: PiAgentError, model: str) -> PiAgentError:
    """An upstream failure in OpenAI's terms: the model the client named is unknown, or the
    model server refused what the client asked for (tools, thinking) as a bad request.

    An agent whose model is not pulled is the server's problem, not the client's: that
    stays the 502 that names the model to pull.
    """
    if isinstance(exc, ModelNotFound) and not model.startswith(AGENT_PREFIX):
        return UnknownModel(model)
    if isinstance(exc, UpstreamError) and exc.upstream_status == 400:
        return InvalidRequest(f"the model server refused the request: {exc.upstream_text[:300]}")
    return exc


def _models(state: AppState) -> list[ModelObject]:
    key = current_key()
    models = [ModelObject(id=m.name, object="model", created=m.modified_at, owned_by="library")
              for m in state.provider.list_models() if may_use_model(key, m.name)]
    models += [ModelObject(id=AGENT_PREFIX + name, object="model", created=STARTED,
                           owned_by="pi-agent") for name, agent in state.agents.items()
               if may_use_agent(key, name)
               and may_use_model(key, agent.resolve_model(state.settings))]
    return models


def _check_bounds(body: ChatCompletionRequest, settings: Settings) -> None:
    """:raise ValidationFailed: 400 here, for more messages or tools, or a longer message,
    than the configuration allows."""
    problems = []
    if len(body.messages) > settings.max_messages:
        problems.append(FieldProblem(
            field="messages", problem=f"must be at most {settings.max_messages} messages"))
    if body.tools and len(body.tools) > settings.max_tools:
        problems.append(FieldProblem(
            field="tools", problem=f"must be at most {settings.max_tools} tools"))
    for i, message in enumerate(body.messages[:settings.max_messages]):
        if len(_content(message.content, f"messages.{i}.content")[0]) > (
                settings.max_message_chars):
            problems.append(FieldProblem(
                field=f"messages.{i}.content",
                problem=f"must be at most {settings.max_message_chars} characters"))
    if problems:
        raise ValidationFailed(problems[:20])


def _allow(model: str, state: AppState) -> None:
    """:raise NotAllowed: 403 if the key may not use the model, or the agent and its model."""
    agent = state.agents.get(model[len(AGENT_PREFIX):]) if model.startswith(AGENT_PREFIX) else None
    if agent is not None:
        allow_agent(agent.name, param="model")
        allow_model(agent.resolve_model(state.settings))
    elif not model.startswith(AGENT_PREFIX):
        allow_model(model)


def _conversation_id() -> str | None:
    """The ``X-Conversation-Id`` header, which turns memory on for the request."""
    value = request.headers.get("X-Conversation-Id")
    if value is None:
        return None
    if not CONVERSATION_ID.fullmatch(value):
        raise InvalidRequest("X-Conversation-Id must be 1 to 128 letters, digits, - or _",
                             param="X-Conversation-Id")
    require_conversation(value)
    g.conversation_id = value
    return value


def _last_user_text(messages: list[Message]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return _content(message.content, "")[0]
    return ""


def _finish_reason(done_reason: str, tool_calls: bool) -> str:
    if done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _usage(chunk: ChatChunk) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=chunk.prompt_tokens,
                           completion_tokens=chunk.completion_tokens,
                           total_tokens=chunk.prompt_tokens + chunk.completion_tokens)


def _arguments(call: ToolCall) -> str:
    return json.dumps(call.arguments, ensure_ascii=False)


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _json(body: str) -> Response:
    return Response(body, content_type="application/json")
