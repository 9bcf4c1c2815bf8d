"""``/ui/``: the chat page, three static files shipped in the package (``static/``), no build
step and nothing fetched from another site (the Pi may be offline). The page talks to the
native API like any other client (``/agents``, ``/chat/stream``, cancel, ``/conversations``)
and sends the key a person typed in as ``X-API-Key``; the files themselves are public, as
``/docs`` is, so that the page can ask for that key. A browser that opens ``/`` (it asks for
``text/html``) is sent here; every other ``GET /`` stays Ollama's heartbeat."""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Flask, Response, redirect, request, send_from_directory

STATIC = Path(__file__).parent / "static"
PREFIX = "/ui/"

bp = Blueprint("page", __name__)


def init_app(app: Flask) -> None:
    """Register the page, and the redirect of a browser at ``/``: before the key check, as
    the page asks for the key itself."""
    app.before_request(send_browser_to_page)
    app.after_request(vary_root_by_accept)
    app.register_blueprint(bp)


def send_browser_to_page() -> Response | None:
    """A browser's ``GET /`` goes to the page. Ollama's clients send ``Accept: */*``,
    ``application/json`` or nothing, and get the heartbeat: only ``text/html`` named
    outright counts, not a wildcard."""
    if request.path != "/" or request.method != "GET":
        return None
    if not any(value.split(";")[0].strip().lower() == "text/html" and quality > 0
               for value, quality in request.accept_mimetypes):
        return None
    return redirect(PREFIX, code=302)  # type: ignore[return-value]


def vary_root_by_accept(response: Response) -> Response:
    """``/`` answers by the Accept header (the page or the heartbeat): caches must know."""
    if request.path == "/":
        response.vary.add("Accept")
    return response


@bp.get("/ui")
def page_without_slash() -> Response:
    return redirect(PREFIX, code=308)  # type: ignore[return-value]


@bp.get(PREFIX)
@bp.get(PREFIX + "<name>")
def page_file(name: str = "index.html") -> Response:
    """One of the page's files (a name outside the folder is 404, as an unknown one).
    Browsers revalidate them (ETag), so that an upgraded server's page is seen at once."""
    response = send_from_directory(STATIC, name, max_age=0)
    response.headers["X-Content-Type-Options"] = "nosniff"
    if name == "index.html":
        # The page runs only its own script and style, and shows no other site's images: a
        # reply that slipped past the renderer still could not load or run anything.
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
    return response
