"""Liveness: GET /health, open to all, never touching the model."""

from __future__ import annotations

from flask_smorest import Blueprint

from llmapi.schemas import HealthSchema

blp = Blueprint("health", __name__, description="Probes for load balancers and orchestrators.")


@blp.route("/health", methods=["GET"])
@blp.response(200, HealthSchema)
def health() -> dict[str, str]:
    """Answer 200 while the process serves HTTP (liveness); loads nothing."""
    return {"status": "ok"}
