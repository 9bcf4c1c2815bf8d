"""What HTTP/1.1 requires of a request and a WSGI server may leave to the app to check.

gunicorn serves an HTTP/1.1 request without ``Host`` and a body whose Transfer-Encoding
stacks codings (``identity, chunked``). RFC 9112 says both are answered 400: a proxy in
front may read such a request differently from the server behind it (request smuggling).
A ``TE`` header that lists ``chunked`` (which RFC 9110 forbids) is refused the same way.
"""
from __future__ import annotations

from flask import Flask, request

from ..errors import BadFraming


def init_app(app: Flask) -> None:
    # First of all the hooks: nothing else should act on a request that may be misread.
    app.before_request_funcs.setdefault(None, []).insert(0, check_framing)
    # werkzeug would answer //api//pull with a redirect to /api/pull whose address it
    # builds from the request's own Host header; such a path is simply not found here.
    app.url_map.merge_slashes = False


def check_framing() -> None:
    """:raise BadFraming: 400, and the connection is closed after it."""
    environ = request.environ
    if environ.get("SERVER_PROTOCOL") == "HTTP/1.1" and not environ.get("HTTP_HOST"):
        raise BadFraming("an HTTP/1.1 request must have a Host header")
    coding = environ.get("HTTP_TRANSFER_ENCODING")
    if coding is not None and coding.strip().lower() != "chunked":
        raise BadFraming("Transfer-Encoding must be chunked alone")
    # RFC 9110 10.1.4: chunked is never listed in TE; a client that does has the two
    # headers mixed up, and which one a proxy in front acted on is anybody's guess.
    accepted = environ.get("HTTP_TE", "").lower()
    if "chunked" in (part.split(";")[0].strip() for part in accepted.split(",")):
        raise BadFraming("TE must not list chunked")
