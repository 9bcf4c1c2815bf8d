"""``GET /metrics`` (Prometheus' text format, to an admin key; loopback only without keys,
as every route), and the count of requests by route and status that it shows."""
from __future__ import annotations

from flask import Flask, Response, request

from ..errors import NotAllowed
from ..metrics import CONTENT_TYPE
from ..state import current_state
from .auth import current_key

# The route of a request that matched none (a 404 or 405): never the path itself, which
# anyone may vary without end.
UNMATCHED = "unmatched"


def init_app(app: Flask) -> None:
    app.add_url_rule("/metrics", "metrics", show_metrics, methods=["GET"])
    app.after_request(count_request)


def show_metrics() -> Response:
    """Every metric, this worker's or, with several workers, all of theirs.

    :raise NotAllowed: 403 for a key without the admin scope.
    """
    if not current_key().admin:
        raise NotAllowed("the metrics (an admin key may)")
    return Response(current_state().metrics.exposition(), content_type=CONTENT_TYPE)


def count_request(response: Response) -> Response:
    """One count per request, under its URL rule; a stream's status is the one it began
    with."""
    rule = request.url_rule
    current_state().metrics.request(rule.rule if rule is not None else UNMATCHED,
                                    response.status_code)
    return response
