"""GET /metrics: every worker's metrics in the Prometheus text format (the registry is llmapi/metrics.py)."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app
from flask_smorest import Blueprint
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from llmapi.http.hooks import require_key
from llmapi.metrics import EXTENSION, Metrics

blp = Blueprint("metrics", __name__, description="Prometheus metrics, to be scraped from inside the network.")


def metrics() -> Metrics:
    """The current app's metrics."""
    return current_app.extensions[EXTENSION]


@blp.route("/metrics", methods=["GET"])
@blp.doc(
    security=[],
    responses={
        "200": {
            "description": "Prometheus text format, summed over every worker of this instance.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def get_metrics() -> Any:
    """Every worker's metrics in the Prometheus text format (open unless METRICS_KEY is set)."""
    current = metrics()
    if current.settings.metrics_keys:
        require_key(tuple(key.encode("utf-8") for key in current.settings.metrics_keys))
    return Response(current.render(), content_type=CONTENT_TYPE_PLAIN_0_0_4)
