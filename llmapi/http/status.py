"""GET /status: this worker's model and live engine figures, behind the key (the playground's server panel)."""

from __future__ import annotations

import os
from typing import Any

from flask_smorest import Blueprint
from marshmallow import Schema, fields
from marshmallow.validate import OneOf

from llmapi.http.hooks import require_api_key
from llmapi.runtime.service import EngineService, engine_service

STATES = ("ready", "loading", "failed", "not loaded")
# What the engine reports once its model is loaded (llmapi.engine.stats); null before.
LIVE = ("dtype", "device", "context_length", "decoding", "waiting", "tokens_per_second", "generated_tokens")

blp = Blueprint("status", __name__, description="The state of the worker that answers, for people and dashboards.")
blp.before_request(require_api_key)


def _nullable(field: type[fields.Field], description: str) -> fields.Field:
    """A field that is always present and null until the model is loaded."""
    return field(required=True, allow_none=True, metadata={"description": description})


class StatusSchema(Schema):
    """One worker's state (each gunicorn worker has its own model copy and engine)."""

    state = fields.String(required=True, validate=OneOf(STATES), metadata={"description": " | ".join(STATES)})
    ready = fields.Boolean(required=True, metadata={"description": "what /ready answers 200 for"})
    reason = _nullable(fields.String, "why the last load failed")
    model = fields.String(required=True, metadata={"description": "the id /v1/models lists"})
    source = fields.String(required=True, metadata={"description": "MODEL_NAME: the hub id or directory served"})
    engine_mode = fields.String(required=True, metadata={"description": "ENGINE_MODE: batch or simple"})
    dtype = _nullable(fields.String, "the weights' dtype, e.g. float32")
    device = _nullable(fields.String, "where the weights live, e.g. cpu")
    context_length = _nullable(fields.Integer, "tokens (prompt plus new) that fit the model")
    decoding = _nullable(fields.Integer, "rows the engine is decoding now")
    waiting = _nullable(fields.Integer, "rows queued for a place in the batch")
    tokens_per_second = _nullable(fields.Float, "new tokens per second over the last 10 s")
    generated_tokens = _nullable(fields.Integer, "new tokens since the model loaded")
    max_batch_size = fields.Integer(required=True, metadata={"description": "rows decoded together at most"})
    in_flight = fields.Integer(required=True, metadata={"description": "generating requests admitted now"})
    admission_limit = fields.Integer(required=True, metadata={"description": "generating requests admitted at once"})
    pid = fields.Integer(required=True, metadata={"description": "the worker process that answered"})


def state(service: EngineService) -> str:
    """Name where this worker's model stands, as /ready sees it."""
    if service.loaded:
        return "ready"
    if service.loading:
        return "loading"
    return "failed" if service.failure else "not loaded"


@blp.route("/status", methods=["GET"])
@blp.response(200, StatusSchema)
def status() -> dict[str, Any]:
    """Report this worker's model and engine figures; never loads the model (the figures are null until loaded)."""
    service = engine_service()
    settings = service.settings
    live = service.stats() or {}
    current = state(service)
    return {
        "state": current,
        "ready": current == "ready",
        "reason": service.failure,
        "model": settings.served_model,
        "source": settings.model_name,
        "engine_mode": live.get("engine_mode", settings.engine_mode),
        **{name: live.get(name) for name in LIVE},
        "max_batch_size": live.get("max_batch_size", settings.max_batch_size),
        "in_flight": service.admission.count,
        "admission_limit": service.admission.limit,
        "pid": os.getpid(),
    }
