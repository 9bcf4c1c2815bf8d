"""``POST /chat`` through the Flask test client, against the fake Ollama."""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from pi_agent.memory import Turn
from pi_agent.web.native.events import TRUNCATED_LINE

from .conftest import state, unused_port
from .fake_ollama import FakeOllama, Script


def post_chat(client: FlaskClient, **body: Any) -> Any:
    return client.post("/chat", json={"message": "hello", **body})


def history(app: Flask, conversation_id: str) -> list[Turn]:
    memory = state(app).memory
    assert memory is not None
    return memory.history(conversation_id)


# --- the happy path ------------------------------------------------------------------


def test_reply_has_every_field(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    response = post_chat(client)
    assert response.status_code == 200
    body = response.get_json()
    uuid.UUID(body["conversation_id"])  # a new conversation gets a uuid4
    assert body == {
        "reply": "Hello, world!",
        "conversation_id": body["conversation_id"],
        "agent": "general",
        "model": "llama3.2:1b",
        "provider": "ollama",
        "done_reason": "stop",
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
        "sources": [],  # the agent has no knowledge
        "route": None,  # nor is it a router
        "tool_calls": [],  # nor has it tools
        "steps": 1,
        "history": {"turns": 0, "dropped": 0},  # a new conversation
        "upstream": fake_ollama.url.removeprefix("http://"),  # the Ollama that answered
    }
    assert response.headers["X-Conversation-Id"] == body["conversation_id"]


def test_upstream_request_is_explicit(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    post_chat(client, message="what is a Pi?")
    (sent,) = fake_ollama.chat_requests()
    assert sent["model"] == "llama3.2:1b"
    # Streamed upstream also for a whole reply: so the timeouts and cancel can stop it.
    assert sent["stream"] is True
    assert sent["options"] == {"temperature": 0.7, "num_ctx": 2048, "num_predict": 512}
    assert sent["keep_alive"] == "30m"
    system, user = sent["messages"]
    assert system["role"] == "system" and "assistant" in system["content"]
    assert user == {"role": "user", "content": "what is a Pi?"}


def test_configured_options_and_integer_keep_alive_are_sent(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama
) -> None:
    app = make_app(MODEL="qwen3:0.6b", TEMPERATURE=0.1, NUM_CTX=1024, NUM_PREDICT=64,
                   KEEP_ALIVE="-1")
    assert app.test_client().post("/chat", json={"message": "x"}).status_code == 200
    (sent,) = fake_ollama.chat_requests()
    assert sent["model"] == "qwen3:0.6b"
    assert sent["options"] == {"temperature": 0.1, "num_ctx": 1024, "num_predict": 64}
    # "-1" as a string is rejected by Ollama; the number -1 keeps the model loaded.
    assert sent["keep_alive"] == -1


def test_agent_preset_applies(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    response = post_chat(client, agent="coder")
    assert response.get_json()["agent"] == "coder"
    (sent,) = fake_ollama.chat_requests()
    assert "programming" in sent["messages"][0]["content"]
    assert sent["options"]["temperature"] == 0.2


def test_length_reaches_the_client(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    fake_ollama.script = Script(tokens=["cut", " off"], done_reason="length")
    assert post_chat(client).get_json()["done_reason"] == "length"


def test_thinking_is_not_part_of_the_reply(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    fake_ollama.script = Script(thinking=["Let me", " think"], tokens=["42"])
    assert post_chat(client).get_json()["reply"] == "42"
    response = post_chat(client, stream=True)
    assert response.data == b"42"


# --- streaming ----------------------------------------------------------------------


def test_stream_headers_and_body(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    response = post_chat(client, stream=True, conversation_id="my-chat_1")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["X-Conversation-Id"] == "my-chat_1"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    assert response.data == b"Hello, world!"
    assert fake_ollama.chat_requests()[0]["stream"] is True


def test_stream_yields_one_piece_per_token(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    fake_ollama.script = Script(tokens=["a", "b", "c"])
    response = client.post("/chat", json={"message": "x", "stream": True}, buffered=False)
    try:
        assert list(response.response) == [b"a", b"b", b"c"]
    finally:
        response.close()


@pytest.mark.parametrize("framing", ["split_frames", "one_frame"])
def test_multibyte_text_survives_any_framing(
    client: FlaskClient, fake_ollama: FakeOllama, framing: str
) -> None:
    tokens = ["Grüße", " 🍓", " 日本語", " <&>"]
    fake_ollama.script = Script(tokens=tokens, **{framing: True})
    response = post_chat(client, stream=True)
    assert response.data.decode("utf-8") == "".join(tokens)


def test_stream_marks_a_truncated_reply(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    fake_ollama.script = Script(tokens=["cut", " off"], done_reason="length")
    response = post_chat(client, stream=True)
    assert response.data == b"cut off" + TRUNCATED_LINE


@pytest.mark.parametrize(
    "script",
    [
        Script(tokens=["partial", " answer", " more"], error_after=2),
        Script(tokens=["partial", " answer", " more"], drop_after=2),
        Script(tokens=["partial", " answer", " more"], garbage_after=2),
        Script(tokens=["partial", " answer"], end_without_done=True),
        Script(tokens=["partial", " answer", " more"], garbage_after=2,
               garbage_line=b'{"message":{"role":"assistant","content":5},"done":false}\n'),
        Script(tokens=["partial", " answer", " more"], garbage_after=2,
               garbage_line=b'["not", "an", "object"]\n'),
        Script(tokens=["partial", " answer", " more"], garbage_after=2,
               garbage_line=b'{"message":"text","done":false}\n'),
        Script(tokens=["partial", " answer", " more"], garbage_after=2,
               garbage_line=b'{"message":{"content":"\xff"},"done":false}\n'),
        Script(tokens=["partial", " answer"], garbage_after=2,
               garbage_line=b'{"message":{"content":""},"done":true,"eval_count":"3"}\n'),
    ],
    ids=["error-line", "dropped", "garbage", "no-done", "content-not-text", "not-an-object",
         "message-not-object", "bad-utf8", "count-not-int"],
)
def test_failure_mid_stream_ends_with_error_line(
    app: Flask, client: FlaskClient, fake_ollama: FakeOllama, script: Script
) -> None:
    fake_ollama.script = script
    response = post_chat(client, stream=True, conversation_id="c1")
    assert response.status_code == 200
    text = response.data.decode()
    assert text.startswith("partial answer\n[error] ")
    assert text.endswith("\n") and text.count("[error]") == 1
    # Neither the upstream's error text nor its address reaches the client.
    assert "llama runner" not in text and "127.0.0.1" not in text
    assert history(app, "c1") == []


def test_disconnect_closes_upstream_and_keeps_partial_answer(
    app: Flask, client: FlaskClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script = Script(tokens=[f"t{i} " for i in range(200)], token_delay=0.01)
    response = client.post(
        "/chat", json={"message": "long story", "stream": True, "conversation_id": "c2"},
        buffered=False,
    )
    pieces = iter(response.response)
    received = [next(pieces), next(pieces)]
    response.close()  # what the WSGI server does when the client goes away
    assert fake_ollama.client_closed.wait(2)
    assert not fake_ollama.stream_finished.is_set()
    (turn,) = history(app, "c2")
    assert turn.user == "long story"
    assert turn.partial is True
    assert turn.assistant.startswith(b"".join(received).decode())


# --- memory -------------------------------------------------------------------------


def test_turns_are_remembered_in_order(
    app: Flask, client: FlaskClient, fake_ollama: FakeOllama
) -> None:
    cid = post_chat(client, message="first").get_json()["conversation_id"]
    fake_ollama.script = Script(tokens=["second ", "answer"])
    assert post_chat(client, message="second", conversation_id=cid, stream=True).data
    post_chat(client, message="third", conversation_id=cid)
    messages = fake_ollama.chat_requests()[-1]["messages"]
    assert [(m["role"], m["content"]) for m in messages[1:]] == [
        ("user", "first"), ("assistant", "Hello, world!"),
        ("user", "second"), ("assistant", "second answer"),
        ("user", "third"),
    ]
    assert [t.partial for t in history(app, cid)] == [False, False, False]


def test_conversations_are_separate(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    post_chat(client, message="for a", conversation_id="a")
    post_chat(client, message="for b", conversation_id="b")
    assert len(fake_ollama.chat_requests()[-1]["messages"]) == 2


def test_memory_can_be_turned_off(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama
) -> None:
    app = make_app(ENABLE_MEMORY=False)
    client = app.test_client()
    post_chat(client, conversation_id="same")
    assert post_chat(client, conversation_id="same", stream=True).data
    assert state(app).memory is None
    assert [len(r["messages"]) for r in fake_ollama.chat_requests()] == [2, 2]


def test_failed_turn_is_not_remembered(
    app: Flask, client: FlaskClient, fake_ollama: FakeOllama
) -> None:
    post_chat(client, conversation_id="keep")
    fake_ollama.script = Script(status=500)
    assert post_chat(client, conversation_id="keep").status_code == 502
    assert [t.assistant for t in history(app, "keep")] == ["Hello, world!"]


# --- errors -------------------------------------------------------------------------


def error_of(response: Any) -> dict[str, Any]:
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "data, content_type",
    [
        (b'{"message": "hi"', "application/json"),
        (b"message=hi", "application/x-www-form-urlencoded"),
        (b'{"message": "hi"}', "text/plain"),
        (b'{"message": "hi"}', None),
        (b'{"message": "\xff\xfe"}', "application/json"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        (b"", "application/json"),
        ('{"message": "hi"}'.encode("utf-16"), "application/json"),
    ],
    ids=["truncated", "form", "text-plain", "no-type", "bad-utf8", "deep", "empty", "utf-16"],
)
def test_body_that_is_not_json_is_400(
    app: Flask, client: FlaskClient, fake_ollama: FakeOllama, data: bytes, content_type: str | None
) -> None:
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    response = client.post("/chat", data=data, content_type=content_type)
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_request"
    assert not fake_ollama.requests


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "message"),
        ({"message": ""}, "message"),
        ({"message": "x" * 4001}, "message"),
        ({"message": 42}, "message"),
        ({"message": None}, "message"),
        ({"message": "\ud800"}, "message"),
        ({"message": "hi", "stream": "yes"}, "stream"),
        ({"message": "hi", "agent": ""}, "agent"),
        ({"message": "hi", "agent": "../etc"}, "agent"),
        ({"message": "hi", "conversation_id": ""}, "conversation_id"),
        ({"message": "hi", "conversation_id": "a" * 129}, "conversation_id"),
        ({"message": "hi", "conversation_id": "../../etc/passwd"}, "conversation_id"),
        ({"message": "hi", "conversation_id": "abc\r\nX-Injected: 1"}, "conversation_id"),
        ({"message": "hi", "conversation_id": "abc\n"}, "conversation_id"),
        ({"message": "hi", "conversation_id": 7}, "conversation_id"),
        ({"message": "hi", "strem": True}, "strem"),
    ],
)
def test_invalid_fields_are_422(
    app: Flask, client: FlaskClient, fake_ollama: FakeOllama, body: dict[str, Any], field: str
) -> None:
    memory = state(app).memory
    assert memory is not None
    kept = Turn("earlier", "answer")
    memory.append("keep", kept)
    body = {"conversation_id": "keep", **body}
    response = client.post("/chat", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "validation_error"
    assert [f["field"] for f in error["fields"]] == [field]
    assert "X-Injected" not in response.headers and "X-Conversation-Id" not in response.headers
    # The rejected input is not echoed back.
    assert "passwd" not in response.get_data(as_text=True)
    assert not fake_ollama.requests
    assert len(memory) == 1 and memory.history("keep") == [kept]


def test_body_that_is_a_list_is_422(client: FlaskClient) -> None:
    response = client.post("/chat", json=["hello"])
    assert response.status_code == 422
    assert error_of(response)["fields"] == [
        {
            "field": "body",
            "problem": "Input should be a valid dictionary or instance of ChatRequest",
        }
    ]


def test_unknown_agent_is_404(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    response = post_chat(client, agent="nobody")
    assert response.status_code == 404
    assert error_of(response)["code"] == "agent_not_found"
    assert not fake_ollama.requests


def test_body_over_the_limit_is_413(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    body = b" " * (65 * 1024) + b"{}"
    response = client.post("/chat", data=body, content_type="application/json")
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"


@pytest.mark.parametrize("method", ["get", "put", "delete"])
def test_wrong_method_is_405(client: FlaskClient, method: str) -> None:
    response = getattr(client, method)("/chat")
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "script, status, code",
    [
        (Script(status=500), 502, "upstream_error"),
        (Script(status=400, error_text="invalid options"), 502, "upstream_error"),
        (Script(drop_before_headers=True), 502, "upstream_protocol_error"),
        (Script(first_token_delay=10), 504, "upstream_timeout"),
    ],
    ids=["500", "400", "dropped", "hang"],
)
def test_upstream_failure_before_first_byte(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama,
    script: Script, status: int, code: str, stream: bool,
) -> None:
    # Short timeouts only where the fake hangs: elsewhere a slow machine must not turn the
    # failure under test into a timeout.
    hangs = script.first_token_delay > 0
    app = make_app(**({"READ_TIMEOUT": 0.3, "TOTAL_TIMEOUT": 0.3} if hangs else {}))
    fake_ollama.script = script
    response = post_chat(app.test_client(), stream=stream, conversation_id="c9")
    assert response.status_code == status
    assert error_of(response)["code"] == code
    assert response.headers["X-Conversation-Id"] == "c9"
    text = response.get_data(as_text=True)
    assert "127.0.0.1" not in text and "Traceback" not in text and "llama runner" not in text


@pytest.mark.parametrize(
    "script, code",
    [
        (Script(error_after=0), "upstream_error"),
        (Script(garbage_after=0), "upstream_protocol_error"),
        (Script(drop_after=0), "upstream_protocol_error"),
    ],
    ids=["error-line", "garbage", "cut"],
)
def test_stream_whose_first_line_fails_gets_a_status(
    app: Flask, client: FlaskClient, fake_ollama: FakeOllama, script: Script, code: str
) -> None:
    fake_ollama.script = script
    response = post_chat(client, stream=True, conversation_id="first")
    assert response.status_code == 502
    assert error_of(response)["code"] == code
    assert history(app, "first") == []


@pytest.mark.parametrize("stream", [False, True])
def test_model_not_pulled_is_502_naming_it(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama, stream: bool
) -> None:
    response = post_chat(make_app(MODEL="mistral:7b").test_client(), stream=stream)
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "model_not_found"
    assert "mistral:7b" in error["message"] and "ollama pull mistral:7b" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_not_running_is_503(make_app: Callable[..., Flask], stream: bool) -> None:
    port = unused_port()
    response = post_chat(make_app(OLLAMA_URL=f"http://127.0.0.1:{port}").test_client(),
                         stream=stream)
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "upstream_unavailable"
    assert str(port) not in error["message"]


def test_upstream_silent_mid_stream_times_out(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama
) -> None:
    fake_ollama.script = Script(tokens=["slow", " model"], token_delay=3)
    response = post_chat(make_app(READ_TIMEOUT=0.3).test_client(), stream=True)
    assert response.data == b"slow\n[error] the model server did not answer in time\n"


def test_connections_to_ollama_are_reused(client: FlaskClient, fake_ollama: FakeOllama) -> None:
    for stream in (False, True, True, False, True):
        assert post_chat(client, stream=stream).data
    assert len(fake_ollama.chat_requests()) == 5
    assert fake_ollama.connections_accepted == 1


def test_unknown_agent_still_names_the_conversation(client: FlaskClient) -> None:
    response = post_chat(client, agent="nobody", conversation_id="abc")
    assert response.status_code == 404
    assert response.headers["X-Conversation-Id"] == "abc"


def test_422_names_a_bounded_number_of_fields(client: FlaskClient) -> None:
    body = {"message": "hi", "k" * 60_000: 1, **{f"extra{i}": i for i in range(100)}}
    response = client.post("/chat", json=body)
    assert response.status_code == 422
    fields = response.get_json()["error"]["fields"]
    assert len(fields) == 20
    assert max(len(f["field"]) for f in fields) == 100
    assert len(response.data) < 4000


def test_failed_turn_leaves_memory_order_alone(
    app: Flask, client: FlaskClient, fake_ollama: FakeOllama
) -> None:
    post_chat(client, conversation_id="old")
    post_chat(client, conversation_id="new")
    fake_ollama.script = Script(status=500)
    assert post_chat(client, conversation_id="old").status_code == 502
    memory = state(app).memory
    assert memory is not None
    assert [cid for cid, _, _ in memory.conversations()] == ["new", "old"]


@pytest.mark.parametrize(
    "settings, script",
    [
        ({"IDLE_TIMEOUT": 0.3}, Script(tokens=["a ", "b"], token_delay=3)),
        ({"TOTAL_TIMEOUT": 0.8}, Script(tokens=[f"t{i} " for i in range(40)], token_delay=0.1)),
    ],
    ids=["idle", "total"],
)
def test_plain_text_idle_and_total_timeouts(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama,
    settings: dict[str, float], script: Script,
) -> None:
    fake_ollama.script = script
    response = post_chat(make_app(**settings).test_client(), stream=True)
    text = response.get_data(as_text=True)
    assert text.startswith("a " if "IDLE_TIMEOUT" in settings else "t0 ")
    assert text.endswith("\n[error] the model server did not answer in time\n")


def test_non_stream_turns_keep_the_first_token_and_idle_timeouts(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama
) -> None:
    # A whole reply is streamed from Ollama too, so a model that never sends its first
    # token (a cold load that never ends) is seen within the first-token timeout...
    fake_ollama.script = Script(tokens=["slow"], first_token_delay=3)
    app = make_app(FIRST_TOKEN_TIMEOUT=1, TOTAL_TIMEOUT=60)
    response = post_chat(app.test_client())
    assert response.status_code == 504
    assert response.get_json()["error"]["code"] == "upstream_timeout"
    assert fake_ollama.client_closed.wait(5)  # the upstream call was closed
    # ...and one that goes silent after it within the idle timeout.
    fake_ollama.reset()
    fake_ollama.script = Script(tokens=["a", "b", "c"], token_delay=3)
    app = make_app(FIRST_TOKEN_TIMEOUT=5, IDLE_TIMEOUT=1, TOTAL_TIMEOUT=60)
    response = post_chat(app.test_client())
    assert response.status_code == 504
    assert fake_ollama.client_closed.wait(5)
    assert fake_ollama.tokens_sent == 1
    assert state(app).admission.running == 0
