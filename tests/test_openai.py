"""The OpenAI-compatible API, driven by the official ``openai`` SDK (and by raw HTTP where the
wire format itself is checked), through gunicorn and the gevent worker, in front of the fake
Ollama."""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from flask import Flask
from werkzeug.exceptions import Unauthorized

from .conftest import state, unused_port, wait_until
from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, serving

MODEL = "llama3.2:1b"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
OSLO_CALL = {"id": "call_k3j9x0ab",
             "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Oslo"}}}


@pytest.fixture(scope="module")
def server(upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    # One slot and one place in the queue, so that a third turn is refused; a short
    # heartbeat and total time, so that the slow cases take seconds.
    with serving(tmp_path_factory.mktemp("openai") / "server.log", OLLAMA_URL=upstream.url,
                 MAX_CONCURRENT="1", MAX_QUEUE="1", HEARTBEAT_SECONDS="1",
                 TOTAL_TIMEOUT="4", NUM_PREDICT="300", MAX_BODY_BYTES="20000") as server:
        yield server


@pytest.fixture
def conversation_id() -> str:
    return "oa-" + uuid.uuid4().hex


@pytest.fixture
def client(server: Gunicorn) -> Iterator[openai.OpenAI]:
    # No retries: a test sees each status as the server sent it.
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=20) as client:
        yield client


def ask(client: openai.OpenAI, content: str = "hi", **params: Any) -> Any:
    return client.chat.completions.create(
        model=params.pop("model", MODEL), messages=[{"role": "user", "content": content}],
        **params)


def sse_events(server: Gunicorn, body: dict[str, Any]) -> list[str]:
    """POST a stream and return the data of each event, checking the SSE framing."""
    response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    text = response.text
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), text
    return [e[len("data: "):] for e in events]


# --- answers ---------------------------------------------------------------------------


def test_non_stream_completion(client: openai.OpenAI, fake: FakeOllama) -> None:
    completion = ask(client)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert isinstance(completion.created, int) and abs(completion.created - time.time()) < 60
    assert completion.model == MODEL
    [choice] = completion.choices
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.role == "assistant" and choice.message.content == "Hello, world!"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
            completion.usage.total_tokens) == (12, 4, 16)
    [sent] = fake.chat_requests()
    # Streamed upstream also for a whole reply: so the timeouts and cancel can stop it.
    assert sent["stream"] is True and sent["model"] == MODEL


def test_the_wire_format_of_a_non_stream_answer(server: Gunicorn, fake: FakeOllama) -> None:
    response = requests.post(server.url + "/v1/chat/completions", timeout=10, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert list(body) == ["id", "object", "created", "model", "system_fingerprint", "choices",
                          "usage"]
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Hello, world!",
                                            "refusal": None}}]


def test_stream_events_follow_the_protocol(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=["Hel", "lo"], token_delay=0.01)
    events = sse_events(server, {"model": MODEL, "stream": True,
                                 "messages": [{"role": "user", "content": "hi"}]})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert all("usage" not in c for c in chunks)  # usage was not asked for
    choices = [c["choices"][0] for c in chunks]
    assert all(set(c) == {"index", "delta", "logprobs", "finish_reason"} for c in choices)
    assert [c["delta"] for c in choices] == [
        {"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {}]
    assert [c["finish_reason"] for c in choices] == [None, None, None, "stop"]


def test_stream_with_usage(client: openai.OpenAI, server: Gunicorn, fake: FakeOllama) -> None:
    stream = ask(client, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello, world!")
    *_, finish, usage = chunks
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage is not None and usage.usage.total_tokens == 16
    # On the wire, every chunk but the last says "usage": null.
    events = sse_events(server, {"model": MODEL, "stream": True,
                                 "stream_options": {"include_usage": True},
                                 "messages": [{"role": "user", "content": "hi"}]})
    raw = [json.loads(e) for e in events[:-1]]
    assert [c["usage"] for c in raw[:-1]] == [None] * (len(raw) - 1)
    assert raw[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}


def test_the_stream_helper_merges_the_deltas(client: openai.OpenAI, fake: FakeOllama) -> None:
    with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.role == "assistant"  # not "assistantassistant"
    assert final.choices[0].message.content == "Hello, world!"


def test_a_reply_cut_at_the_limit_says_length(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script = Script(done_reason="length")
    assert ask(client).choices[0].finish_reason == "length"
    chunks = list(ask(client, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_parameters_are_mapped_to_ollama(client: openai.OpenAI, fake: FakeOllama) -> None:
    client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ]},
        ],
        temperature=0.3, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=-0.5,
        stop="END", max_completion_tokens=50, response_format={"type": "json_object"},
        reasoning_effort="low", user="someone", metadata={"x": "y"},
        extra_body={"some_future_field": {"a": 1}},  # unknown fields are ignored
    )
    [sent] = fake.chat_requests()
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo="]},
    ]
    assert sent["options"] == {"temperature": 0.3, "num_ctx": 2048, "num_predict": 50,
                               "top_p": 0.9, "seed": 7, "presence_penalty": 0.5,
                               "frequency_penalty": -0.5, "stop": ["END"]}
    assert sent["format"] == "json" and sent["think"] == "low"
    assert "tools" not in sent


def test_long_messages_and_the_context(client: openai.OpenAI, fake: FakeOllama,
                                       conversation_id: str) -> None:
    header = {"X-Conversation-Id": conversation_id}
    first, second = "x" * 4200, "y" * 4200  # each more than /chat takes, within 2048 tokens
    assert ask(client, first, extra_headers=header).choices[0].message.content
    ask(client, second, extra_headers=header)
    # Both turns together would not fit beside the reply (num_predict 512): the remembered
    # one is left out, and forgotten.
    assert [m["content"] for m in fake.chat_requests()[-1]["messages"]] == [second]
    ask(client, "short", extra_headers=header)
    assert [m["content"] for m in fake.chat_requests()[-1]["messages"]] == [
        second, "Hello, world!", "short"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[
            {"role": "system", "content": "s" * 6000}, {"role": "user", "content": first * 2}])
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "messages"
    assert "context of 2048 (num_ctx)" in refused.value.message
    assert len(fake.chat_requests()) == 3


def test_a_whole_reply_keeps_the_total_timeout(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script = Script(tokens=[f"t{i}" for i in range(100)], token_delay=0.1)
    with pytest.raises(openai.InternalServerError) as info:
        ask(client)  # TOTAL_TIMEOUT is 4 s
    assert info.value.status_code == 504
    assert fake.client_closed.wait(5)


def test_numbers_beyond_64_bits_are_refused(client: openai.OpenAI, fake: FakeOllama) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, **{name: 10**30})
        assert refused.value.param == name
    assert fake.chat_requests() == []


def test_limits_and_formats(client: openai.OpenAI, fake: FakeOllama) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    ask(client, max_tokens=100_000, stop=["a", "b"], reasoning_effort="none",
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    [sent] = fake.chat_requests()
    assert sent["options"]["num_predict"] == 300  # bounded by NUM_PREDICT
    assert sent["options"]["stop"] == ["a", "b"]
    assert sent["format"] == schema and sent["think"] is False


def test_agent_models(client: openai.OpenAI, fake: FakeOllama) -> None:
    completion = ask(client, model="agent:coder")
    assert completion.model == "agent:coder"
    [sent] = fake.chat_requests()
    assert sent["model"] == MODEL  # the configured model, which the coder preset keeps
    assert sent["messages"][0]["role"] == "system"
    assert "programming assistant" in sent["messages"][0]["content"]
    assert sent["options"]["temperature"] == 0.2


def test_tools_without_stream(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script = Script(tokens=[], tool_calls=[OSLO_CALL])
    completion = ask(client, "weather?", tools=[WEATHER_TOOL])
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.id, call.type) == ("call_k3j9x0ab", "function")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert fake.chat_requests()[0]["tools"] == [WEATHER_TOOL]


def test_tools_streamed(client: openai.OpenAI, fake: FakeOllama) -> None:
    second = {"function": {"name": "get_weather", "arguments": {"city": "Bergen"}}}  # no id
    fake.script = Script(tokens=[], tool_calls=[OSLO_CALL, second])
    with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL]
    ) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    [delta] = deltas  # Ollama sends the calls whole: one delta holds both
    assert [(t.index, t.type) for t in delta.tool_calls] == [(0, "function"), (1, "function")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    calls = final.choices[0].message.tool_calls
    arguments = [json.loads(c.function.arguments) for c in calls]
    assert arguments == [{"city": "Oslo"}, {"city": "Bergen"}]
    assert calls[0].id == "call_k3j9x0ab" and calls[1].id.startswith("call_")


def test_tool_results_go_back_to_ollama(client: openai.OpenAI, fake: FakeOllama) -> None:
    client.chat.completions.create(model=MODEL, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "11 degrees"},
    ])
    [sent] = fake.chat_requests()
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "11 degrees", "tool_name": "get_weather",
         "tool_call_id": "call_1"},
    ]


def test_tool_choice_none_leaves_the_tools_out(client: openai.OpenAI, fake: FakeOllama) -> None:
    ask(client, tools=[WEATHER_TOOL], tool_choice="none")
    assert "tools" not in fake.chat_requests()[0]


# --- models ----------------------------------------------------------------------------


def test_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert list(models) == ["llama3.2:1b", "qwen3:0.6b", "agent:general", "agent:coder",
                            "agent:poet", "agent:pi"]
    assert models[MODEL].created == 1746405464  # the fake's modified_at, in Unix seconds
    assert models[MODEL].owned_by == "library" and models["agent:coder"].owned_by == "pi-agent"
    assert client.models.retrieve("qwen3:0.6b").id == "qwen3:0.6b"
    assert client.models.retrieve("agent:general").object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"


# --- memory ----------------------------------------------------------------------------


def test_memory_only_with_a_conversation_header(
    client: openai.OpenAI, fake: FakeOllama, conversation_id: str
) -> None:
    ask(client, "first")
    ask(client, "second")
    assert [len(r["messages"]) for r in fake.chat_requests()] == [1, 1]  # stateless
    header = {"X-Conversation-Id": conversation_id}
    response = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "one"}], extra_headers=header)
    assert response.headers["X-Conversation-Id"] == conversation_id
    list(ask(client, "two", stream=True, extra_headers=header))
    ask(client, "three", extra_headers=header)
    assert [m["content"] for m in fake.chat_requests()[-1]["messages"]] == [
        "one", "Hello, world!", "two", "Hello, world!", "three"]


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("params, param", [
    ({"n": 2}, "n"),
    ({"temperature": 5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}]},
     "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
     "messages.0.tool_call_id"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    *[({"messages": [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"}]},
       "messages.0.tool_calls.0.function.arguments")
      for arguments in ("[1, 2]", "{not json", "[" * 5000)],
])
def test_bad_requests_are_400(client: openai.OpenAI, fake: FakeOllama,
                              params: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **params}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error" and info.value.param == param
    assert fake.chat_requests() == []


def test_a_body_that_is_not_json(server: Gunicorn) -> None:
    response = requests.post(server.url + "/v1/chat/completions", data=b"{nope",
                             headers={"Content-Type": "application/json"}, timeout=5)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_body_too_large_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, "x" * 30_000)
    assert info.value.status_code == 413
    assert info.value.type == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["not-installed:7b", "agent:nobody"])
def test_unknown_models_are_404(client: openai.OpenAI, stream: bool, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, model=model, stream=stream)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert f"`{model}`" in info.value.message


def test_a_model_that_refuses_an_option_is_400(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script = Script(status=400, error_text='"llama3.2:1b" does not support thinking')
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, reasoning_effort="high")
    assert "does not support thinking" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("script, status", [
    (Script(status=500), 502),
    (Script(drop_before_headers=True), 502),
])
def test_upstream_failures_are_5xx(
    client: openai.OpenAI, fake: FakeOllama, stream: bool, script: Script, status: int
) -> None:
    fake.script = script
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, stream=stream)
    assert info.value.status_code == status and info.value.type == "server_error"


def test_a_model_that_never_answers_is_504(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script = Script(first_token_delay=30)
    with pytest.raises(openai.InternalServerError) as info:
        ask(client)  # TOTAL_TIMEOUT is 4 s
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"
    assert fake.client_closed.wait(5)


def test_an_error_after_the_stream_started_is_one_event(
    client: openai.OpenAI, server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(error_after=2)
    stream = ask(client, stream=True)
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "the model server answered with an error" in info.value.message
    events = sse_events(server, {"model": MODEL, "stream": True,
                                 "messages": [{"role": "user", "content": "hi"}]})
    assert json.loads(events[-1]) == {"error": {
        "message": "the model server answered with an error", "type": "server_error",
        "param": None, "code": "upstream_error"}}


def test_reasoning_is_an_extra_field(client: openai.OpenAI, server: Gunicorn,
                                     fake: FakeOllama) -> None:
    fake.script = Script(thinking=["Let me ", "see."], tokens=["Yes."])
    message = ask(client).choices[0].message
    assert message.content == "Yes." and message.model_extra == {"reasoning": "Let me see."}
    events = sse_events(server, {"model": MODEL, "stream": True,
                                 "messages": [{"role": "user", "content": "hi"}]})
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"reasoning": "Let me "},
                      {"reasoning": "see."}, {"content": "Yes."}, {}]


def test_a_failure_after_a_keep_alive_is_an_event(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(first_token_delay=2.5, error_after=0)  # the heartbeat is 1 s
    response = requests.post(server.url + "/v1/chat/completions", timeout=10, json={
        "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    assert response.text.startswith(": keep-alive\n\n")
    assert response.text.endswith('"code":"upstream_error"}}\n\n')
    assert "[DONE]" not in response.text


def test_cancel_a_v1_stream(server: Gunicorn, fake: FakeOllama, conversation_id: str) -> None:
    fake.script = Script(tokens=[f"t{i} " for i in range(100)], token_delay=0.05)
    with requests.post(server.url + "/v1/chat/completions", stream=True, timeout=10,
                       headers={"X-Conversation-Id": conversation_id}, json={
                           "model": MODEL, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith(b"data: ")
        cancelled = requests.post(server.url + f"/chat/{conversation_id}/cancel", timeout=5)
        assert cancelled.status_code == 200
        rest = [line for line in lines if line]
    assert json.loads(rest[-1][len(b"data: "):])["error"]["code"] == "cancelled"
    assert fake.client_closed.wait(5)


def test_a_cancel_before_the_reply_sticks(
    client: openai.OpenAI, server: Gunicorn, fake: FakeOllama, conversation_id: str
) -> None:
    fake.script = Script(first_token_delay=30)

    def cancel_once_asked() -> None:
        # Once Ollama was asked, the turn is known to the server: the cancel finds it.
        if wait_until(lambda: len(fake.chat_requests()) == 1):
            requests.post(server.url + f"/chat/{conversation_id}/cancel", timeout=5)

    canceller = threading.Thread(target=cancel_once_asked)
    canceller.start()
    try:
        # The SDK would retry a 409; with x-should-retry: false it does not, even when told
        # it may retry.
        with pytest.raises(openai.ConflictError) as info:
            client.with_options(max_retries=2).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}],
                extra_headers={"X-Conversation-Id": conversation_id})
    finally:
        canceller.join()
    assert info.value.code == "cancelled"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(fake.chat_requests()) == 1


def test_a_slow_first_token_gets_keep_alives(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(first_token_delay=2.5)  # the heartbeat is 1 s
    response = requests.post(server.url + "/v1/chat/completions", timeout=10, json={
        "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    assert response.text.startswith(": keep-alive\n\n")
    assert response.text.endswith("data: [DONE]\n\n")


def test_busy_conversation_is_409_and_full_queue_is_429(
    client: openai.OpenAI, server: Gunicorn, fake: FakeOllama, conversation_id: str
) -> None:
    fake.script = Script(first_token_delay=3)  # under TOTAL_TIMEOUT, 4 s
    header = {"X-Conversation-Id": conversation_id}
    threads = [threading.Thread(target=ask, args=(client,), kwargs={"extra_headers": header}),
               threading.Thread(target=ask, args=(client, "other"))]
    threads[0].start()
    assert wait_until(lambda: len(fake.chat_requests()) == 1)
    threads[1].start()  # queued behind the first: the queue holds one
    assert wait_until(lambda: "\npi_agent_turns_waiting 1.0\n" in requests.get(
        server.url + "/metrics", timeout=5).text)
    try:
        with pytest.raises(openai.ConflictError):
            ask(client, extra_headers=header)
        with pytest.raises(openai.RateLimitError) as info:
            ask(client, "third")
        assert info.value.code == "rate_limit_exceeded"
        assert int(info.value.response.headers["Retry-After"]) >= 1
    finally:
        for thread in threads:
            thread.join(10)


def test_a_client_that_leaves_mid_stream_stops_ollama(server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(tokens=[f"t{i}" for i in range(200)], token_delay=0.05)
    with requests.post(server.url + "/v1/chat/completions", stream=True, timeout=10, json={
        "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]
    }) as response:
        lines = response.iter_lines()
        assert next(lines).startswith(b"data: ")
    assert fake.client_closed.wait(5)
    assert fake.tokens_sent < 200


def test_ollama_not_running_is_503(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    with serving(tmp_path / "server.log", OLLAMA_URL=url) as server, openai.OpenAI(
        base_url=server.url + "/v1", api_key="x", max_retries=0
    ) as client:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                ask(client, stream=stream)
            assert info.value.status_code == 503
            assert info.value.code == "upstream_unavailable"
        with pytest.raises(openai.InternalServerError) as info:
            client.models.list()
        assert info.value.status_code == 503


def test_failed_streams_give_their_slot_back(app: Flask, fake_ollama: FakeOllama) -> None:
    client = app.test_client()
    fake_ollama.script = Script(status=500)
    bodies = [{"model": "not-installed:1b"}, {"model": MODEL}, {"model": "agent:nobody"},
              {"model": "PI-AGENT-TOKEN"}]
    for body in bodies:
        response = client.post("/v1/chat/completions", json={
            **body, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code in (404, 502)
    admission = state(app).admission
    assert (admission.running, admission.waiting) == (0, 0)
    assert not state(app).running.cancel("any")


def test_an_agent_whose_model_is_missing_is_502(make_app: Callable[..., Flask]) -> None:
    client = make_app(MODEL="missing:1b").test_client()
    for stream in (False, True):
        response = client.post("/v1/chat/completions", json={
            "model": "agent:general", "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 502
        error = response.get_json()["error"]
        assert error["code"] == "model_not_found" and "ollama pull missing:1b" in error["message"]


@pytest.mark.parametrize("error, status, kind, code", [
    (Unauthorized(), 401, "invalid_request_error", "invalid_api_key"),
    (RuntimeError("a bug"), 500, "server_error", "internal_error"),
])
def test_any_error_under_v1_has_openai_shape(
    app: Flask, error: Exception, status: int, kind: str, code: str
) -> None:
    # A route that fails in a way no route of the app should, to see it rendered.
    def fail() -> None:
        raise error

    app.add_url_rule("/v1/fails", "fails", fail)
    response = app.test_client().get("/v1/fails")
    assert response.status_code == status
    assert response.get_json() == {"error": {
        "message": response.get_json()["error"]["message"], "type": kind, "param": None,
        "code": code}}
    assert "a bug" not in response.get_data(as_text=True)
    unknown = app.test_client().get("/v1/nothing")
    assert unknown.status_code == 404 and unknown.get_json()["error"]["type"] == (
        "invalid_request_error")
