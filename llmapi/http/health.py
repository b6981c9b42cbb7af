"""Probes: GET /health (liveness) and GET /ready (readiness), open to all, never waiting on the model."""

from __future__ import annotations

from flask_smorest import Blueprint
from marshmallow import Schema, fields

from llmapi.errors import APIError
from llmapi.http.fields import ErrorSchema
from llmapi.runtime.service import engine_service


class HealthSchema(Schema):
    """The liveness answer."""

    status = fields.String(required=True, metadata={"example": "ok"})


class ReadySchema(Schema):
    """The readiness answer."""

    status = fields.String(required=True, metadata={"example": "ready"})
    model = fields.String(required=True, metadata={"description": "the model this worker has loaded"})
    dtype = fields.String(metadata={"description": "what the model computes in (DTYPE)", "example": "bfloat16"})
    device = fields.String(metadata={"description": "where the model runs (DEVICE)", "example": "cpu"})


blp = Blueprint("health", __name__, description="Probes for load balancers and orchestrators.")

READY_RETRY_AFTER_S = 5


@blp.route("/health", methods=["GET"])
@blp.response(200, HealthSchema)
def health() -> dict[str, str]:
    """Answer 200 while the process serves HTTP (liveness); loads nothing."""
    return {"status": "ok"}


@blp.route("/ready", methods=["GET"])
@blp.response(200, ReadySchema)
@blp.alt_response(503, schema=ErrorSchema, description="This worker's model is not loaded (the reason says why)")
def ready() -> dict[str, str]:
    """Answer 200 when the worker that answers has its model loaded (readiness), else 503 with the reason.

    With WARMUP=true a probe also starts a new load in the background when the last one failed more
    than MODEL_RETRY_SECONDS ago, so that a fixed model is picked up without any traffic.
    """
    service = engine_service()
    if service.loaded:
        return {"status": "ready", "model": service.settings.model_name, **service.placement}
    if service.settings.warmup:
        service.warm()
    if service.failure:
        reason = service.failure
    elif service.loading:
        reason = "The model is loading in this worker."
    elif service.settings.warmup:
        reason = "The model is about to load in this worker."
    else:
        reason = "The model is not loaded yet: this worker loads it on its first generate (or at start with WARMUP)."
    raise APIError(reason, status=503, headers={"Retry-After": str(READY_RETRY_AFTER_S)})
