"""Embeddings on both fronts: ``/api/embed`` and ``/api/embeddings`` relayed to Ollama, and
``/v1/embeddings`` in OpenAI's shape; driven by the official ``ollama`` and ``openai``
clients (and raw HTTP where the wire format itself is checked), through gunicorn and the
gevent worker, with API keys, in front of the fake Ollama."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
import requests

from pi_agent.cli import main as cli

from .conftest import unused_port
from .fake_embeddings import raw_vector, vector
from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, serving

MODEL = "llama3.2:1b"
OTHER_MODEL = "qwen3:0.6b"


@dataclass(frozen=True)
class Keys:
    all: str
    other: str  # may use OTHER_MODEL only


def create_key(path: Path, *args: str) -> str:
    """Create a key with the command-line tool; return it (the last line it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["keys", "--file", str(path), "create", *args]) == 0
    return out.getvalue().splitlines()[-1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Keys]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return path, Keys(all=create_key(path, "--name", "all"),
                      other=create_key(path, "--name", "other", "--models", OTHER_MODEL))


@pytest.fixture(scope="module")
def server(upstream: FakeOllama, keys: tuple[Path, Keys],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    # One slot and one place in the queue, so that a third request is refused; a short
    # total time, so that the slow cases take seconds.
    with serving(tmp_path_factory.mktemp("embeddings") / "server.log", OLLAMA_URL=upstream.url,
                 KEYS_FILE=str(keys[0]), MAX_CONCURRENT="1", MAX_QUEUE="1",
                 TOTAL_TIMEOUT="3", MAX_BODY_BYTES="20000") as server:
        yield server


@pytest.fixture
def key(keys: tuple[Path, Keys]) -> Keys:
    return keys[1]


@pytest.fixture
def post(server: Gunicorn, key: Keys) -> Callable[..., requests.Response]:
    def post(path: str, body: Any, api_key: str | None = key.all) -> requests.Response:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if isinstance(body, bytes):
            return requests.post(server.url + path, data=body, headers=headers, timeout=10)
        return requests.post(server.url + path, json=body, headers=headers, timeout=10)
    return post


@pytest.fixture
def oai(server: Gunicorn, key: Keys) -> Iterator[openai.OpenAI]:
    # No retries: a test sees each status as the server sent it.
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key.all, max_retries=0,
                       timeout=20) as client:
        yield client


@pytest.fixture
def olm(server: Gunicorn, key: Keys) -> Iterator[ollama.Client]:
    client = ollama.Client(host=server.url, timeout=20,
                           headers={"Authorization": f"Bearer {key.all}"})
    try:
        yield client
    finally:
        client._client.close()


def sent(fake: FakeOllama, path: str = "/api/embed") -> list[dict[str, Any]]:
    """The bodies the gateway sent to ``path``, without the fake's own notes."""
    return [{k: v for k, v in r.items() if not k.startswith("_")}
            for r in list(fake.requests) if r["_path"] == path]


# --- /api -------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/api/embed", {"model": MODEL, "input": ["a <b> & c", "d"], "truncate": False,
                    "dimensions": 4}),
    ("/api/embed", {"model": MODEL, "input": [f"t{i}" for i in range(40)]}),  # sent chunked
    ("/api/embed", {"model": MODEL, "input": ""}),  # Ollama loads the model, embeds nothing
    ("/api/embeddings", {"model": MODEL, "prompt": "a <b> & c"}),
    ("/api/embeddings", {"model": MODEL}),
])
def test_api_answers_are_ollamas(post: Callable[..., requests.Response], fake: FakeOllama,
                                 path: str, body: dict[str, Any]) -> None:
    answer = post(path, body)
    fake.requests.clear()
    direct = requests.post(fake.url + path, json=body, timeout=10)
    assert answer.status_code == direct.status_code == 200
    assert answer.headers["Content-Type"] == direct.headers["Content-Type"]
    assert answer.content == direct.content


def test_the_gateway_adds_its_settings(post: Callable[..., requests.Response],
                                       fake: FakeOllama) -> None:
    post("/api/embed", {"model": MODEL, "input": ["a", "b"], "truncate": False, "dimensions": 4,
                        "extra": [1]})
    post("/api/embed", {"model": MODEL, "input": "a", "keep_alive": "5m",
                        "options": {"num_ctx": 131072, "temperature": None, "num_predict": 9}})
    post("/api/embeddings", {"model": MODEL, "prompt": "a", "keep_alive": None})
    # What langchain's OllamaEmbeddings sends: every option it knows, null unless set.
    langchain = post("/api/embed", {"model": MODEL, "input": ["a"], "options": {
        "mirostat": None, "num_ctx": None, "num_gpu": None, "num_thread": None, "stop": None}})
    assert langchain.status_code == 200
    assert sent(fake) == [
        {"model": MODEL, "input": ["a", "b"], "truncate": False, "dimensions": 4, "extra": [1],
         "options": {"num_ctx": 2048}, "keep_alive": "30m"},
        {"model": MODEL, "input": "a", "keep_alive": "5m", "options": {"num_ctx": 8192}},
        {"model": MODEL, "input": ["a"], "options": {"num_ctx": 2048}, "keep_alive": "30m"},
    ]
    assert sent(fake, "/api/embeddings") == [
        {"model": MODEL, "prompt": "a", "keep_alive": "30m", "options": {"num_ctx": 2048}}]


def test_the_ollama_client(olm: ollama.Client, fake: FakeOllama) -> None:
    reply = olm.embed(model=MODEL, input=["one", "two words"])
    assert reply.model == MODEL and reply.prompt_eval_count == 3
    assert reply.embeddings == [vector("one"), vector("two words")]
    assert olm.embed(model=MODEL, input="one", dimensions=3).embeddings == [vector("one", 3)]
    assert olm.embeddings(model=MODEL, prompt="one").embedding == raw_vector("one")


def test_bad_api_bodies_are_400_in_ollamas_shape(
        post: Callable[..., requests.Response], fake: FakeOllama) -> None:
    cases: list[tuple[str, Any, str]] = [
        ("/api/embed", {"model": MODEL, "input": "a", "options": {"num_gpu": 1}},
         "options.num_gpu: is a load-time option"),
        ("/api/embed", {"model": MODEL, "input": "a", "options": {"temperature": "hot"}},
         "options.temperature"),
        ("/api/embed", {"model": MODEL, "input": 5}, "input"),
        ("/api/embed", {"model": MODEL, "input": ["a", 1]}, "input"),
        ("/api/embed", {"model": MODEL, "input": "a", "truncate": "yes"}, "truncate"),
        ("/api/embed", {"model": MODEL, "input": "a", "dimensions": "4"}, "dimensions"),
        ("/api/embeddings", {"model": MODEL, "prompt": ["a"]}, "prompt"),
        ("/api/embeddings", b"{nope", "not valid JSON"),
    ]
    for path, body, problem in cases:
        answer = post(path, body)
        assert answer.status_code == 400, body
        assert problem in answer.json()["error"], answer.json()
    assert list(fake.requests) == []


# --- /v1 --------------------------------------------------------------------------------


def test_the_openai_sdk_default_is_base64(oai: openai.OpenAI, fake: FakeOllama) -> None:
    result = oai.embeddings.create(model=MODEL, input="hello there world")
    [item] = result.data
    # The SDK asked for base64 and decoded the float32 values: nothing was lost on the way.
    assert item.embedding == vector("hello there world") and item.index == 0
    assert result.model == MODEL and result.object == "list"
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (3, 3)
    assert sent(fake) == [{"model": MODEL, "input": ["hello there world"],
                           "options": {"num_ctx": 2048}, "keep_alive": "30m"}]


def test_a_list_as_floats_with_dimensions(oai: openai.OpenAI, fake: FakeOllama) -> None:
    texts = ["a", "b c", "a"]
    result = oai.embeddings.create(model=MODEL, input=texts, encoding_format="float",
                                   dimensions=4)
    assert [d.embedding for d in result.data] == [vector(t, 4) for t in texts]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert sent(fake)[0]["dimensions"] == 4
    raw = oai.embeddings.create(model=MODEL, input=["a"], encoding_format="base64")
    assert isinstance(raw.data[0].embedding, str)
    assert list(struct.unpack("<8f", base64.b64decode(raw.data[0].embedding))) == vector("a")


def test_the_v1_wire_format(post: Callable[..., requests.Response], fake: FakeOllama) -> None:
    answer = post("/v1/embeddings", {"model": MODEL, "input": "x", "user": "u1"})
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    assert list(body) == ["object", "data", "model", "usage"]
    assert body == {"object": "list", "model": MODEL,
                    "data": [{"object": "embedding", "embedding": vector("x"), "index": 0}],
                    "usage": {"prompt_tokens": 1, "total_tokens": 1}}


@pytest.mark.parametrize("params, param, words", [
    ({"input": [1, 2, 3]}, "input", "check_embedding_ctx_length=False"),
    ({"input": [[1, 2], [3]]}, "input", "not token ids"),
    ({"input": []}, "input", "1 to 2048"),
    ({"input": ["a"] * 2049}, "input", "1 to 2048"),
    ({"input": ""}, "input", "empty"),
    ({"input": ["a", ""]}, "input", "empty"),
    ({"input": ["a", None]}, "input", "a list of strings"),
    ({"encoding_format": "int8"}, "encoding_format", "base64"),
    ({"dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ({"model": ""}, "model", "at least 1"),
])
def test_bad_v1_requests_are_400(oai: openai.OpenAI, fake: FakeOllama, params: dict[str, Any],
                                 param: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(**{"model": MODEL, "input": "x", **params})
    assert info.value.type == "invalid_request_error" and info.value.param == param
    assert words in info.value.message
    assert list(fake.requests) == []


# --- both fronts --------------------------------------------------------------------------


def test_unknown_models_are_404(oai: openai.OpenAI, olm: ollama.Client,
                                fake: FakeOllama) -> None:
    for model in ("nope:7b", "agent:general"):
        with pytest.raises(openai.NotFoundError) as info:
            oai.embeddings.create(model=model, input="x")
        assert info.value.code == "model_not_found" and f"`{model}`" in info.value.message
    for call in (lambda: olm.embed(model="nope:7b", input="x"),
                 lambda: olm.embeddings(model="nope:7b", prompt="x")):
        with pytest.raises(ollama.ResponseError) as error:
            call()
        assert error.value.status_code == 404
        assert error.value.error == 'model "nope:7b" not found, try pulling it first'
    assert len(fake.requests) == 3  # an agent is no Ollama model: not asked


def test_keys_and_scopes(post: Callable[..., requests.Response], server: Gunicorn, key: Keys,
                         fake: FakeOllama) -> None:
    for path, body in (("/api/embed", {"model": MODEL, "input": "x"}),
                       ("/api/embeddings", {"model": MODEL, "prompt": "x"})):
        assert post(path, body, api_key=None).status_code == 401
        refused = post(path, body, api_key=key.other)
        assert refused.status_code == 403
        assert refused.json() == {"error": "this API key may not use the model 'llama3.2:1b'"}
        assert post(path, {**body, "model": OTHER_MODEL}, api_key=key.other).status_code == 200
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key.other, max_retries=0) as oai:
        with pytest.raises(openai.PermissionDeniedError) as info:
            oai.embeddings.create(model=MODEL, input="x")
        assert info.value.code == "permission_denied" and info.value.param == "model"
        assert len(oai.embeddings.create(model=OTHER_MODEL, input="x").data) == 1
    with pytest.raises(openai.AuthenticationError):
        with openai.OpenAI(base_url=server.url + "/v1", api_key="pia_wrong",
                           max_retries=0) as oai:
            oai.embeddings.create(model=MODEL, input="x")
    assert [r["model"] for r in fake.requests] == [OTHER_MODEL] * 3


def test_a_body_too_large_is_413(post: Callable[..., requests.Response], oai: openai.OpenAI,
                                 fake: FakeOllama) -> None:
    answer = post("/api/embed", {"model": MODEL, "input": "x" * 30_000})
    assert answer.status_code == 413 and isinstance(answer.json()["error"], str)
    with pytest.raises(openai.APIStatusError) as info:
        oai.embeddings.create(model=MODEL, input="x" * 30_000)
    assert info.value.status_code == 413 and info.value.type == "invalid_request_error"
    assert list(fake.requests) == []


@pytest.mark.parametrize("script, api_status, api_error, v1_error", [
    (Script(status=400, error_text="this model does not support embeddings"), 400,
     "this model does not support embeddings", openai.BadRequestError),
    (Script(status=500, error_text="llama runner process has terminated"), 500,
     "llama runner process has terminated", openai.InternalServerError),
    (Script(drop_before_headers=True), 502,
     "the model server sent a broken or incomplete answer", openai.InternalServerError),
])
def test_upstream_failures(post: Callable[..., requests.Response], oai: openai.OpenAI,
                           fake: FakeOllama, script: Script, api_status: int, api_error: str,
                           v1_error: type[openai.APIStatusError]) -> None:
    fake.script = script
    answer = post("/api/embed", {"model": MODEL, "input": "x"})
    assert (answer.status_code, answer.json()) == (api_status, {"error": api_error})
    with pytest.raises(v1_error) as info:
        oai.embeddings.create(model=MODEL, input="x")
    # On /v1 Ollama's refusal is the client's 400; its failure, the gateway's 502.
    assert info.value.status_code == (400 if api_status == 400 else 502)
    if api_status == 400:
        assert api_error in info.value.message


@pytest.mark.parametrize("path", ["/api/embed", "/v1/embeddings"])
def test_a_model_that_never_answers_is_504(post: Callable[..., requests.Response],
                                           fake: FakeOllama, path: str) -> None:
    fake.script = Script(first_token_delay=30)
    answer = post(path, {"model": MODEL, "input": "x"})  # TOTAL_TIMEOUT is 3 s
    assert answer.status_code == 504
    error = answer.json()["error"]
    assert "did not answer in time" in (error if isinstance(error, str) else error["message"])
    assert fake.client_closed.wait(5)


def test_embeddings_wait_for_a_slot(post: Callable[..., requests.Response], fake: FakeOllama
                                    ) -> None:
    fake.script = Script(first_token_delay=1.5)
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(
        post("/api/embed", {"model": MODEL, "input": "x"}).status_code)) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)  # the first takes the slot, the second the place in the queue
    try:
        full = post("/api/embed", {"model": MODEL, "input": "x"})
        assert full.status_code == 429 and "busy" in full.json()["error"]
        full = post("/v1/embeddings", {"model": MODEL, "input": "x"})
        assert full.status_code == 429 and full.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for thread in threads:
            thread.join(10)
    assert answers == [200, 200]


def test_a_client_that_leaves_stops_ollama(server: Gunicorn, key: Keys, fake: FakeOllama
                                           ) -> None:
    fake.script = Script(first_token_delay=30)
    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"model": MODEL, "input": "x"}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (key.all.encode(), len(body), body))
        time.sleep(0.5)
    # The watchdog sees the client gone and shuts the upstream, long before 30 s.
    assert fake.client_closed.wait(5)


def test_ollama_not_running_is_503(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    with serving(tmp_path / "server.log", OLLAMA_URL=url) as server:
        answer = requests.post(server.url + "/api/embed", json={"model": MODEL, "input": "x"},
                               timeout=10)
        assert answer.status_code == 503
        assert answer.json() == {"error": "the model server is not reachable: is Ollama running?"}
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as oai:
            with pytest.raises(openai.InternalServerError) as info:
                oai.embeddings.create(model=MODEL, input="x")
        assert info.value.status_code == 503 and info.value.code == "upstream_unavailable"
