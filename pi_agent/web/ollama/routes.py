"""The Ollama-compatible API: Ollama's own routes, relayed to the upstream Ollama.

Ollama clients pointed at the gateway get Ollama's exact answers: its status codes, its
error bodies, its NDJSON framing streamed as it comes (one object per line). Generations
(``/api/chat``, ``/api/generate``) go through the same admission control, cancellation,
timeouts and watchdog as ``/chat``, and get the configured ``num_predict`` cap, ``num_ctx``
and ``keep_alive`` unless they set their own (a lower ``num_predict`` only). Embeddings
(``/api/embed``, ``/api/embeddings``) take a slot too (see embeddings.py). Model
management is refused: a chat gateway must not let its clients fill or wipe the disk.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from ...config import Settings
from ...core.context import check_fits, check_text_fits
from ...core.turn import Turn
from ...core.watch import STOPPED
from ...errors import (
    FieldProblem,
    InvalidRequest,
    ModelManagementRefused,
    ProviderError,
    UpstreamProtocolError,
    ValidationFailed,
)
from ...providers.base import Forwarded
from ...providers.ollama_replies import OllamaErrorBody
from ...state import current_state
from ..auth import allow_model, current_key, may_use_model
from ..bodies import stream_response
from ..client_socket import client_of
from ..embeddings import fetch_embeddings
from ..validation import parse_body
from .whole import gather_whole

bp = Blueprint("ollama", __name__)

# Ollama's model management routes and their methods.
MANAGEMENT_ROUTES = {
    "/api/pull": ["POST"], "/api/push": ["POST"], "/api/create": ["POST"],
    "/api/copy": ["POST"], "/api/delete": ["DELETE"], "/api/blobs/<path:digest>": ["HEAD", "POST"],
}


# Ollama reads numbers into Go's int64 and float64: beyond those, no model server can take them.
MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1
# Sampling options and the values they may take here. Load-time options are refused: a
# change reloads the model, which takes minutes on a Pi and stalls every other client.
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 2), "top_p": (0, 1), "min_p": (0, 1), "typical_p": (0, 1),
    "top_k": (0, 1000), "repeat_penalty": (0, 10), "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2), "repeat_last_n": (-1, 1_048_576), "num_keep": (-1, 1_048_576),
    "seed": (MIN_INT64, MAX_INT64),
}
LOAD_TIME_OPTIONS = {"num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock",
                     "numa", "low_vram", "vocab_only", "f16_kv"}
MAX_STOP_SEQUENCES = 16


class GenerationRequest(BaseModel):
    """``/api/chat`` and ``/api/generate``: only what the gateway reads is checked; every
    other field goes to Ollama as it came."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    stream: StrictBool | None = None
    options: dict[str, Any] | None = None
    keep_alive: int | float | str | None = None
    prompt: str | None = None
    system: str | None = None
    template: str | None = None
    suffix: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    name: str | None = None  # the old name of "model"


class EmbedRequest(BaseModel):
    """``/api/embed`` (``input``) and the older ``/api/embeddings`` (``prompt``): only what
    the gateway reads, or what Ollama would refuse anyway, is checked."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    input: StrictStr | list[StrictStr] | None = None
    prompt: StrictStr | None = None
    truncate: StrictBool | None = None
    dimensions: StrictInt | None = None
    options: dict[str, Any] | None = None
    keep_alive: int | float | str | None = None


@bp.route("/", methods=["GET", "HEAD"])
def root() -> Response:
    return _relay_whole(request.method, "/")


@bp.get("/api/version")
@bp.get("/api/tags")
@bp.get("/api/ps")
def read_only() -> Response:
    response = _relay_whole("GET", request.path)
    key = current_key()
    if key.models is not None and request.path != "/api/version" and response.status_code == 200:
        # A key limited to some models sees only those: the rest is not its business.
        try:
            listing = json.loads(response.get_data())
            listing["models"] = [m for m in listing["models"] if isinstance(m, dict)
                                 and may_use_model(key, str(m.get("name") or m.get("model")))]
        except (ValueError, TypeError, KeyError):
            raise UpstreamProtocolError() from None
        response.set_data(json.dumps(listing, separators=(",", ":")))
    return response


@bp.post("/api/show")
def show() -> Response:
    body = parse_body(ShowRequest, any_content_type=True)
    allow_model(body.model or body.name or "")
    return _relay_whole("POST", "/api/show", _encode(_given(body)))


@bp.post("/api/chat")
@bp.post("/api/generate")
def generate() -> Response:
    """Relay one generation, streamed unless ``"stream": false``, as Ollama's default is."""
    body = parse_body(GenerationRequest, any_content_type=True)
    state = current_state()
    settings = state.settings
    _check_bounds(body, settings)
    allow_model(body.model)
    payload = _upstream_body(body, settings)
    _check_context(body, payload["options"]["num_ctx"])
    streamed = body.stream is not False
    # Streamed upstream in every case, so that the timeouts, a cancel and a client that
    # leaves stop a whole reply too; that one is gathered here (see whole.py).
    payload["stream"] = True
    data = _encode(payload)

    turn = state.turns.open("ollama-" + uuid.uuid4().hex, current_key(),
                            client_of(request.environ), model=body.model)
    try:
        watch = turn.begin()
        upstream = turn.forward("POST", request.path, data, wait="stream")
    except BaseException:
        turn.release()
        raise
    if streamed:
        # The body gives the slot back when it is closed, after the upstream (see _relay_lines).
        return stream_response(_relay_lines(upstream, turn), turn.release,
                               upstream.content_type, status=upstream.status,
                               headers={"X-Accel-Buffering": "no"})
    try:
        status, whole = turn.run(lambda abort: gather_whole(
            upstream, watch, turn.count_tokens, turn.log,
            generate=request.path == "/api/generate"))
        turn.log.relayed(status)
    finally:
        turn.release()
    return Response(whole, status=status, content_type="application/json; charset=utf-8")


@bp.post("/api/embed")
@bp.post("/api/embeddings")
def embed() -> Response:
    """Relay an embedding request in a generation slot; Ollama answers it whole."""
    body = parse_body(EmbedRequest, any_content_type=True)
    state = current_state()
    settings = state.settings
    problems = option_problems(body.options, settings)
    if problems:
        raise ValidationFailed(problems[:20])
    allow_model(body.model)
    # The configured num_ctx, as a generation gets it: a model used for both (or two
    # clients that differ) would otherwise be reloaded at each switch.
    payload = _upstream_body(body, settings)
    del payload["options"]["num_predict"]  # an embedding generates nothing
    answer = fetch_embeddings(state.turns, request.path, _encode(payload), body.model,
                              current_key(), client_of(request.environ))
    return Response(answer.body, status=answer.status, content_type=answer.content_type)


def refuse_management(digest: str = "") -> Response:
    raise ModelManagementRefused()


for _rule, _methods in MANAGEMENT_ROUTES.items():
    bp.add_url_rule(_rule, "refuse_management", refuse_management, methods=_methods)


def _relay_whole(method: str, path: str, body: bytes | None = None) -> Response:
    """Relay a request that does not generate: its answer is small and comes at once."""
    upstream = current_state().provider.forward(method, path, body)
    try:
        content = b"".join(upstream)
    finally:
        upstream.close()
    return Response(content, status=upstream.status, content_type=upstream.content_type)


def _relay_lines(upstream: Forwarded, turn: Turn) -> Iterator[bytes]:
    """Yield Ollama's streamed body as it comes (the turn's release closes it). A failure
    after the status went out is told as Ollama tells it in a stream: one more line,
    ``{"error": "..."}``."""
    watch, count = turn.watch, turn.count_tokens
    assert watch is not None, "begin() first"
    finished = False
    pieces = 0
    try:
        for piece in upstream:
            pieces += 1
            watch.last_chunk = watch.last_write = time.monotonic()
            if pieces == 1 and upstream.status == 200:
                turn.log.saw_first_token()
            # Ollama writes compact JSON, one object per piece: the last one says this,
            # with the count of tokens generated.
            if not finished and b'"done":true' in piece:
                finished = True
                completion, prompt = _counts(piece)
                count(completion)
                turn.log.done(prompt)
            # A client that reads slowly holds the write up; that is not Ollama idling.
            watch.writing = True
            yield piece
            watch.writing = False
    except GeneratorExit:  # the client left: its write failed
        turn.log.cut_short("disconnected")
        raise
    except ProviderError as exc:
        reason = watch.abort.reason if watch.abort.requested else ""
        if reason == "client_gone" or finished:
            # The reply is whole when only the end of its body failed.
            return
        error = STOPPED[reason]() if reason in STOPPED else exc
        turn.log.failed(error)
        yield OllamaErrorBody(error=error.description).model_dump_json().encode() + b"\n"
    finally:
        # A stream cut short counts as what it relayed: a line is about a token.
        if not finished and upstream.status == 200:
            count(pieces)
        turn.log.relayed(upstream.status)
        turn.release()  # now, not when the WSGI server closes the body


def _check_bounds(body: GenerationRequest, settings: Settings) -> None:
    """:raise ValidationFailed: 400 (Ollama's API has no 422) for what is out of bounds.

    A message's length is bounded by the body size and by the model's context (see
    ``_check_context``), not by a count of its own.
    """
    problems = []
    if body.messages is not None and len(body.messages) > settings.max_messages:
        problems.append(FieldProblem(
            field="messages", problem=f"must be at most {settings.max_messages} messages"))
    if body.tools is not None and len(body.tools) > settings.max_tools:
        problems.append(FieldProblem(
            field="tools", problem=f"must be at most {settings.max_tools} tools"))
    problems += option_problems(body.options, settings)
    if problems:
        raise ValidationFailed(problems[:20])


def option_problems(options: dict[str, Any] | None, settings: Settings) -> list[FieldProblem]:
    """What is wrong with a request's Ollama ``options``; one given as null is left out, as
    Ollama leaves it out, and a ``num_ctx`` above the maximum is capped, not refused."""
    problems = []

    def refuse(name: str, problem: str) -> None:
        problems.append(FieldProblem(field=f"options.{name}"[:100], problem=problem))

    for name, value in (options or {}).items():
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = number and isinstance(value, int)
        if name in LOAD_TIME_OPTIONS:
            refuse(name, "is a load-time option, which the gateway does not pass on: a "
                         "change reloads the model")
        elif name == "num_ctx" and not (whole and 1 <= value <= MAX_INT64):
            refuse(name, f"must be a whole number from 1 to {MAX_INT64}")
        elif name == "num_predict" and not (whole and MIN_INT64 <= value <= MAX_INT64):
            refuse(name, "must be a whole number that fits in 64 bits")
        elif name in OPTION_RANGES and not (number and OPTION_RANGES[name][0] <= value
                                            <= OPTION_RANGES[name][1]):
            low, high = OPTION_RANGES[name]
            refuse(name, f"must be a number from {low:g} to {high:g}")
        elif name == "stop" and not (isinstance(value, list) and len(value) <= MAX_STOP_SEQUENCES
                                     and all(isinstance(v, str) for v in value)):
            refuse(name, f"must be a list of at most {MAX_STOP_SEQUENCES} strings")
        elif number and not (MIN_INT64 <= value <= MAX_INT64 if whole else math.isfinite(value)):
            refuse(name, "must be a finite number that fits in 64 bits")
    return problems


def sent_options(options: dict[str, Any] | None, settings: Settings) -> dict[str, Any]:
    """The checked options as Ollama gets them: without the null ones, ``num_predict`` at
    most the configured cap, ``num_ctx`` the configured one unless given, and at most
    ``PI_AGENT_MAX_NUM_CTX``."""
    sent = {name: value for name, value in (options or {}).items() if value is not None}
    num_predict = sent.get("num_predict", -1)
    # -1 (Ollama's default) means no limit: the configured cap is the limit then.
    sent["num_predict"] = settings.num_predict if num_predict < 0 else min(
        num_predict, settings.num_predict)
    # Another num_ctx reloads the model, so it is sent only when asked for.
    sent["num_ctx"] = min(sent.get("num_ctx", settings.num_ctx), settings.max_num_ctx)
    return sent


def _check_context(body: GenerationRequest, num_ctx: int) -> None:
    """:raise ContextTooLong: 400 when what Ollama would keep of the request cannot fit."""
    if body.messages:
        check_fits(body.messages, num_ctx)
    prompt = "".join(text for text in (body.system, body.prompt, body.suffix) if text)
    if prompt:
        check_text_fits(prompt, num_ctx, "prompt")


def _upstream_body(body: GenerationRequest | EmbedRequest, settings: Settings
                   ) -> dict[str, Any]:
    """The body as Ollama gets it: the client's fields, the options as ``sent_options``
    makes them, and the configured ``keep_alive`` unless the client gave one."""
    payload = _given(body)
    payload["options"] = sent_options(body.options, settings)
    if payload.get("keep_alive") is None:
        payload["keep_alive"] = settings.keep_alive
    return payload


def _counts(piece: bytes) -> tuple[int, int]:
    """The completion and prompt tokens Ollama's last chunk counts (0 for what it lacks)."""
    try:
        last = json.loads(piece)
        found = last.get("eval_count", 0), last.get("prompt_eval_count", 0)
    except (ValueError, AttributeError, RecursionError):
        return 0, 0
    completion, prompt = (count if isinstance(count, int) else 0 for count in found)
    return completion, prompt


def _given(body: BaseModel) -> dict[str, Any]:
    """The fields of a body as the client sent them, the unknown ones included."""
    return {name: value for name, value in body if name in body.model_fields_set}


def _encode(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload).encode()
    except (ValueError, RecursionError):  # nesting deep enough to pass json.loads only
        raise InvalidRequest("the request body is nested too deeply") from None
