"""An agent with tools: the loop the gateway runs between the model and the tools.

Each step is one streamed model call that offers the agent's tools. When the model asks for
calls, they run one after another, each answer goes back as a ``tool`` message in call
order, and the model is called again; at most ``max_steps`` calls offer tools, and a model
that still asks for one at that cap gets one more call without tools, which answers. A
model too small for Ollama's tool calls may write the call as a JSON object instead: text
that could still be such a call (it begins with ``{`` or a code fence) is held back until
the step ends, and is the answer's text only if it is not a call.

A ``ToolLoop`` stands in for the provider where a reply is streamed: it yields the answer's
chunks as they come and, between them, the events of each call (``ToolCalled``,
``ToolAnswered``) and of each step (``Stepped``, ``Held``), then one final ``done`` chunk
with the counts of every call. It counts the completion tokens of each call against the
key's quota itself.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from typing import Any

from ..errors import ProviderError, UpstreamProtocolError
from ..providers.base import Abort, ChatCall, ChatChunk, ChatStream, Provider, ToolCall
from .events import HELD, SHOWN_CHARS, Event, Held, Stepped, ToolAnswered, ToolCalled
from .tools import Tool, Toolbox, ToolError

logger = logging.getLogger(__name__)

# The events that show the model at work, as opposed to waiting for a tool or a first token.
_ALIVE = (Held, ToolAnswered)
# A fence before a JSON call: ``` or ```json, then the object.
_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)


class Stopped(ProviderError):
    """The turn was stopped (cancel, client gone, shutdown, timeout) while a tool ran; the
    turn tells its client why, from its abort's reason."""


class ToolLoop:
    """One turn's tool loop; ``stream_chat`` starts it. ``steps`` and ``calls`` say what it
    did, for the ``done`` event and the JSON reply."""

    def __init__(self, provider: Provider, toolbox: Toolbox,
                 count_tokens: Callable[[int], None]) -> None:
        self._provider = provider
        self._toolbox = toolbox
        self._tools = {tool.name: tool for tool in toolbox.tools}
        self._count = count_tokens
        self.steps = 0
        self.calls: list[ToolAnswered] = []
        self._answers: dict[str, tuple[bool, str]] = {}  # by call, for a repeated call
        self._ids: set[str] = set()
        self._made = 0  # ids made here
        self._abort = Abort()
        self._call: ChatCall | None = None
        self._stream: ChatStream | None = None  # the step under way
        self._events: Generator[ChatChunk | Event, None, None] | None = None
        self._step: Step | None = None

    @property
    def answer(self) -> str:
        """The answer's text: what the last model call showed. Text shown before a tool
        call was seen by the client as it came, but is not the answer memory keeps."""
        return "".join(self._step.shown) if self._step is not None else ""

    def stream_chat(self, call: ChatCall, abort: Abort | None = None) -> ToolLoop:
        """Make the first model call, with the tools: a call that fails before its first
        token fails here, as a provider's would.

        :raise ProviderError: the first call failed.
        """
        self._abort = abort or Abort()
        self._call = replace(call, tools=self._toolbox.definitions(),
                             think=False if call.think is None else call.think)
        self.steps = 1
        self._stream = self._provider.stream_chat(self._call, self._abort)
        return self

    def __iter__(self) -> Iterator[ChatChunk | Event]:
        if self._events is None:
            self._events = self._run()
        return self._events

    def close(self) -> None:
        if self._events is not None:
            self._events.close()  # counts what a step cut short received
        if self._stream is not None:
            self._stream.close()

    def _run(self) -> Generator[ChatChunk | Event, None, None]:
        assert self._call is not None and self._stream is not None, "stream_chat() first"
        call, stream = self._call, self._stream
        prompt_tokens = completion_tokens = 0
        while True:
            offered = call.tools is not None
            step = self._step = Step(self._tools if offered else None)
            received = 0
            chunk = ChatChunk()
            try:
                for chunk in stream:
                    received += 1
                    if chunk.done:
                        break
                    out = step.feed(chunk)
                    if out is not None:
                        yield out
                    elif chunk.content:
                        yield HELD
            finally:
                self._abort.set_handler(None)  # before its connection goes back to the pool
                stream.close()
                self._count(chunk.completion_tokens if chunk.done else received)
            if not chunk.done:
                raise UpstreamProtocolError()  # a stream ends with its done chunk
            prompt_tokens += chunk.prompt_tokens
            completion_tokens += chunk.completion_tokens
            calls = step.finish(chunk)
            if not calls or not offered:
                yield ChatChunk(step.released(chunk), chunk.thinking, True, chunk.done_reason,
                                prompt_tokens, completion_tokens)
                return
            if self.steps < self._toolbox.max_steps:
                told = yield from self._act(calls, step.text)
                call = replace(call, messages=[*call.messages, *told])
            else:  # at the cap: the call asked for is not run; the model answers without tools
                call = replace(call, tools=None)
            self.steps += 1
            yield Stepped(self.steps)
            stream = self._stream = self._open(call)

    def knows(self, tool: str) -> bool:
        """Whether ``tool`` is one of the agent's (a model may call one it made up)."""
        return tool in self._tools

    def _open(self, call: ChatCall) -> ChatStream:
        """The next model call; one that fails leaves no abort handler on a connection that
        went back to the pool (the turn's stop would shut it under another turn)."""
        try:
            return self._provider.stream_chat(call, self._abort)
        except BaseException:
            self._abort.set_handler(None)
            raise

    def _act(self, calls: list[ToolCall], text: str,
             ) -> Generator[Event, None, list[dict[str, Any]]]:
        """Run the calls one after another; the generator's value is the messages that
        tell the model about them."""
        asked: list[dict[str, Any]] = []
        answers: list[dict[str, Any]] = []
        for call in calls:
            call_id = self._new_id(call.id)
            yield ToolCalled(call_id, call.name, call.arguments)
            started = time.monotonic()
            key = call.name + "\0" + json.dumps(call.arguments, sort_keys=True, default=str)
            if key not in self._answers:
                self._answers[key] = self._call_tool(call)
            ok, content = self._answers[key]
            answer = ToolAnswered(call_id, call.name, call.arguments, ok,
                                  content[:SHOWN_CHARS], round((time.monotonic() - started) * 1000))
            self.calls.append(answer)
            yield answer
            asked.append({"id": call_id, "function": {"name": call.name,
                                                      "arguments": call.arguments}})
            answers.append({"role": "tool", "tool_name": call.name, "content": content})
        return [{"role": "assistant", "content": text, "tool_calls": asked}, *answers]

    def _new_id(self, given: str) -> str:
        """Ollama's id if it is new in the turn, else one made here."""
        call_id = given
        while not call_id or call_id in self._ids:
            self._made += 1
            call_id = f"call_{self._made}"
        self._ids.add(call_id)
        return call_id

    def _call_tool(self, call: ToolCall) -> tuple[bool, str]:
        """Run one call in a thread of its own, for at most the tool timeout; whether it
        worked, and what the model is told. A stopped turn stops waiting for it at once.

        :raise Stopped: the turn was stopped meanwhile.
        """
        tool = self._tools.get(call.name)
        if tool is None:
            return False, f"error: unknown tool {call.name[:100]!r}"
        outcome: list[tuple[bool, str]] = []
        finished = threading.Event()

        def work() -> None:
            try:
                outcome.append((True, tool.call(call.arguments)))
            except ToolError as exc:
                outcome.append((False, f"error: {exc}"))
            except BaseException:  # a tool's bug must not end the turn, nor die unseen
                logger.exception("tool %s failed", tool.name)
                outcome.append((False, "error: the tool failed"))
            finally:
                finished.set()

        # Not joined on a timeout: a Python function cannot be stopped from outside. A
        # daemon thread (a greenlet under gevent) does not hold the worker's exit up.
        threading.Thread(target=work, name=f"tool {tool.name}", daemon=True).start()
        self._abort.set_handler(finished.set)
        try:
            finished.wait(self._toolbox.timeout)
        finally:
            self._abort.set_handler(None)
        if self._abort.requested:
            raise Stopped()
        if not outcome:
            logger.warning("tool %s timed out after %g s", tool.name, self._toolbox.timeout)
            return False, f"error: timed out after {self._toolbox.timeout:g} s"
        return outcome[0]


class Step:
    """One model call's reply, as the loop reads it: text that is streamed at once, text
    held back while it could be a tool call written as JSON, and the calls asked for."""

    def __init__(self, tools: dict[str, Tool] | None) -> None:
        self._tools = tools  # None: the call offers no tools, and nothing is held back
        self._texts: list[str] = []
        self._held = tools is not None  # until the text shows it is not a call
        self._object = False  # the held text has begun a JSON object: held to the end
        self._calls: list[ToolCall] = []
        self.shown: list[str] = []  # the text handed on as the answer's

    @property
    def text(self) -> str:
        return "".join(self._texts)

    def feed(self, chunk: ChatChunk) -> ChatChunk | None:
        """The chunk to hand on (maybe with the text held before it), or None."""
        if chunk.tool_calls:
            self._calls += chunk.tool_calls
            chunk = ChatChunk(chunk.content, chunk.thinking)  # the calls are not the answer's
        if not chunk.content:
            return chunk if chunk.thinking else None
        self._texts.append(chunk.content)
        if self._held and self._still_held():
            return ChatChunk("", chunk.thinking) if chunk.thinking else None
        if self._held:
            self._held = False
            chunk = ChatChunk(self.text, chunk.thinking)
        self.shown.append(chunk.content)
        return chunk

    def _still_held(self) -> bool:
        if self._object:
            return True  # decided once: the text is not looked at again per token
        text = self.text
        if not could_be_call(text):
            return False
        self._object = "{" in text
        return True

    def finish(self, last: ChatChunk) -> list[ToolCall]:
        """The calls the step asked for: Ollama's own, else its whole text as a JSON call."""
        if last.tool_calls:
            self._calls += last.tool_calls
        if last.content:
            self._texts.append(last.content)
        if self._calls or self._tools is None or not self._held:
            return self._calls
        found = read_text_call(self.text, self._tools)
        if found is not None:
            self._calls.append(found)
            self._texts = []  # the call is not the answer's text
        return self._calls

    def released(self, last: ChatChunk) -> str:
        """The text the final chunk carries: what was held back, or the last chunk's own."""
        text = self.text if self._held else last.content
        self.shown.append(text)
        return text


def could_be_call(text: str) -> bool:
    """Whether text may still turn out to be a tool call written as JSON: it begins with
    ``{``, or with a code fence (```, ```json) that is followed by ``{`` or nothing yet."""
    rest = text.lstrip()
    if not rest or rest[0] == "{":
        return True
    if not rest.startswith("```"):
        return "```".startswith(rest)
    after = rest[3:]
    if len(after) < 4 and "json".startswith(after.lower()):
        return True
    if after[:4].lower() == "json":
        after = after[4:]
    after = after.lstrip()
    return not after or after[0] == "{"


def read_text_call(text: str, tools: dict[str, Tool]) -> ToolCall | None:
    """A reply's whole text as a tool call: a JSON object (fenced or not) whose ``name`` is
    a known tool and whose ``arguments`` (or ``parameters``) are an object or left out."""
    body = text.strip()
    fenced = _FENCED.fullmatch(body)
    if fenced is not None:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
            or data["name"] not in tools:
        return None
    arguments = data.get("arguments", data.get("parameters"))
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ToolCall("", data["name"], arguments)


class AnswerOnly:
    """A tool loop's answer chunks alone, for a turn that writes nothing but the answer
    (plain text, a JSON reply). The loop's events only tell ``touch`` when the model last
    showed it is alive, or None while no idle time counts: a tool runs (its own timeout
    bounds it), or a model call waits for its first token (the socket timeout bounds it)."""

    def __init__(self, loop: ToolLoop, touch: Callable[[float | None], None]) -> None:
        self._loop = loop
        self._touch = touch

    def __iter__(self) -> Iterator[ChatChunk]:
        touch = self._touch
        for item in self._loop:
            if type(item) is ChatChunk:
                yield item
            else:
                touch(time.monotonic() if type(item) in _ALIVE else None)

    def close(self) -> None:
        self._loop.close()
