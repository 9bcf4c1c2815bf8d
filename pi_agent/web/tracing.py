"""Request ids: the client's ``X-Request-ID`` (if it is a sane one) or a new one, echoed in
the response and put in the log lines that concern the request; and the conversation a
request used, in ``X-Conversation-Id``, whichever front it came to."""
from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

# Letters, digits and ".-_:" only: the id goes into a response header and the log.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def init_app(app: Flask) -> None:
    app.before_request(_take_request_id)
    app.after_request(_echo_request_id)
    app.after_request(_add_conversation_header)


def request_id() -> str:
    return str(g.get("request_id", ""))


def _take_request_id() -> None:
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _echo_request_id(response: Response) -> Response:
    if "request_id" in g:
        response.headers["X-Request-ID"] = g.request_id
    return response


def _add_conversation_header(response: Response) -> Response:
    conversation_id = g.get("conversation_id")
    if conversation_id:
        response.headers["X-Conversation-Id"] = conversation_id
    return response
