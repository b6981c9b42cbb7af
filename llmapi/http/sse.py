"""Server-Sent Events: how a generation is written on the wire when a request asks for a stream."""

from __future__ import annotations

import json
from typing import Any

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer a stream


def sse(data: dict[str, Any] | str) -> str:
    """Format one event: a JSON object, or a bare word such as OpenAI's [DONE]."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def event_schema(data: str) -> dict[str, Any]:
    """The OpenAPI schema of one event of a stream whose `data` is described by `data`.

    Before OpenAPI 3.2, a stream's schema describes each event, as schemathesis reads it.
    """
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string", "description": data}},
        "description": 'Server-Sent Events, answered when the request has `"stream": true`',
    }
