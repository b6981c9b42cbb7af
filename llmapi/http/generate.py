"""The API blueprint: POST /generate, loaded with a schema, run on the engine, dumped with a schema."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app
from flask_smorest import Blueprint

from llmapi.config import Settings
from llmapi.engine.types import EngineError, GenerationRequest, GenerationResult
from llmapi.errors import error_body, from_engine_error
from llmapi.http import examples
from llmapi.http.fields import ErrorSchema, GenerateResponseSchema, build
from llmapi.http.hooks import require_api_key, require_json
from llmapi.runtime.service import HandleLike, engine_service

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# One Server-Sent Event (before OpenAPI 3.2, a stream's schema describes each event, as schemathesis reads it).
SSE_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": 'JSON: `{"token": {"text": ...}}` per piece, then the full answer (or an error object)',
        }
    },
    "description": 'Server-Sent Events, answered when the request has `"stream": true`',
}
RETRY_AFTER = {"Retry-After": {"description": "seconds before a retry may succeed", "schema": {"type": "integer"}}}


def to_generation_request(args: dict[str, Any]) -> GenerationRequest:
    """Resolve a validated /generate body into an engine request."""
    do_sample = args.get("do_sample")
    if do_sample is None:
        do_sample = any(key in args for key in SAMPLING_KEYS)
    return GenerationRequest(
        prompt=args["prompt"],
        max_new_tokens=args["max_new_tokens"],
        min_new_tokens=args["min_new_tokens"],
        do_sample=do_sample,
        temperature=args.get("temperature", 1.0),
        top_p=args.get("top_p", 1.0),
        top_k=args.get("top_k", 0),
        repetition_penalty=args["repetition_penalty"],
        seed=args.get("seed"),
        stop=args.get("stop", ()),
        timeout_s=args["timeout_ms"] / 1000.0,
        stream=args["stream"],
    )


def generate_body(result: GenerationResult, args: dict[str, Any]) -> dict[str, Any]:
    """Build the /generate answer from a result."""
    text = args["prompt"] + result.text if args["return_full_text"] else result.text
    return {
        "generated_text": text,
        "finish_reason": result.finish_reason,
        "stop_sequence": result.stop_sequence,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.total_tokens,
        },
        "model": result.model,
        "seed": result.seed,
    }


def sse(data: dict[str, Any]) -> str:
    """Format one Server-Sent Event."""
    return f"data: {json.dumps(data)}\n\n"


def stream_events(handle: HandleLike, args: dict[str, Any]) -> Iterator[str]:
    """Yield a token event per text piece, then the full answer; errors go in-band; hang-ups cancel."""
    try:
        for item in handle.pieces():
            if isinstance(item, GenerationResult):
                yield sse(GenerateResponseSchema().dump(generate_body(item, args)))
                return
            yield sse({"token": {"text": item}})
    except EngineError as exc:
        failure = from_engine_error(exc)
        yield sse(error_body(failure.message, status=failure.status, param=failure.param))
    except Exception:
        log.exception("stream failed")
        yield sse(error_body("The server had an unexpected error.", status=500))
    finally:
        # Runs on normal end and when the server closes the generator because the client went away.
        handle.cancel()


def settings() -> Settings:
    """The current app's settings."""
    return current_app.config["LLMAPI_SETTINGS"]


def create_blueprint(app_settings: Settings) -> Blueprint:
    """Build the generation blueprint with the request limits of `app_settings`."""
    schemas = build(app_settings)
    blp = Blueprint("generation", __name__, description="Text generation with the served model.")
    blp.before_request(require_api_key)
    blp.before_request(require_json)

    @blp.route("/generate", methods=["POST"])
    # An instance, not the class: webargs would otherwise build (and deep-copy the fields of) one per request.
    @blp.arguments(schemas.generate(), examples=examples.generate_requests(app_settings))
    @blp.response(200, GenerateResponseSchema, example=examples.generate_response())
    @blp.alt_response(200, schema=SSE_SCHEMA, content_type="text/event-stream", example=examples.generate_stream())
    @blp.alt_response(422, schema=ErrorSchema, description="Invalid parameters or too long for the context")
    @blp.alt_response(503, schema=ErrorSchema, description="Model unavailable", headers=RETRY_AFTER)
    def generate(args: dict[str, Any]) -> Any:
        """Generate a continuation of the prompt.

        With `"stream": true` the answer is `text/event-stream`: one `{"token": {"text": ...}}` event per
        piece of text, then one event with the full answer (the 200 body below).
        """
        handle = engine_service().submit(to_generation_request(args))
        if args["stream"]:
            return Response(stream_events(handle, args), mimetype="text/event-stream", headers=SSE_HEADERS)
        return generate_body(handle.result(), args)

    return blp
