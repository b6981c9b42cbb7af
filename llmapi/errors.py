"""One JSON error shape for every failure, and the handlers that produce it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from llmapi.engine.types import EngineError, InvalidRequest, ModelUnavailable

log = logging.getLogger(__name__)

TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the service answers on purpose, with its status, type and the parameter at fault."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or TYPES.get(status, "invalid_request_error")
        self.param = param
        self.headers = headers or {}


def error_body(message: str, *, status: int, type: str | None = None, param: str | None = None) -> dict[str, Any]:
    """Build the error object every route answers with."""
    return {
        "error": {
            "message": message,
            "type": type or TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": status,
        }
    }


def respond(error: APIError) -> Response:
    """Turn an APIError into its JSON response."""
    response = jsonify(error_body(error.message, status=error.status, type=error.type, param=error.param))
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def flatten(messages: Any, path: str = "") -> list[tuple[str, str]]:
    """Flatten marshmallow's nested messages into (field path, message) pairs."""
    if isinstance(messages, dict):
        pairs: list[tuple[str, str]] = []
        for key, value in messages.items():
            name = path if key in ("_schema", "json") else f"{path}.{key}" if path else str(key)
            pairs.extend(flatten(value, name))
        return pairs
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [(path, " ".join(messages))]
    if isinstance(messages, list):
        return [pair for item in messages for pair in flatten(item, path)]
    return [(path, str(messages))]


def validation_error(messages: Any, *, status: int = 422) -> APIError:
    """Describe every invalid field in one message; the first one names the parameter."""
    pairs = flatten(messages)
    text = "; ".join(f"{name}: {msg}" if name else msg for name, msg in pairs) or "Invalid request."
    param = next((name for name, _ in pairs if name), None)
    return APIError(text, status=status, param=param)


def from_http_exception(exc: HTTPException) -> APIError:
    """Map werkzeug's and webargs' HTTP errors to the one shape, keeping headers such as Allow.

    A schema's failure keeps the status its blueprint declared for validation (webargs' error_status_code):
    422 on /generate, 400 on /v1, as OpenAI answers.
    """
    status = exc.code or 500
    data = getattr(exc, "data", None) or {}
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    if isinstance(getattr(exc, "exc", None), ValidationError):
        return validation_error(data["messages"], status=status)
    if "messages" in data:  # webargs could not read the body as JSON
        return APIError("Request body is not valid JSON.", status=400, headers=headers)
    return APIError(exc.description or exc.name, status=status, headers=headers)


def from_engine_error(exc: EngineError) -> APIError:
    """Map the engine's errors that mean the same on every API (each API words its own client errors)."""
    if isinstance(exc, ModelUnavailable):
        return APIError(str(exc), status=503, headers={"Retry-After": str(exc.retry_after())})
    log.error("engine error: %s", exc)
    return APIError("The server failed to generate a response.", status=500)


def refusal(status: int, rename: Mapping[str, str] | None = None) -> Callable[[InvalidRequest], Response]:
    """The handler of the engine's InvalidRequest in one API's dialect: its status, its names for the params."""
    names = rename or {}

    def refused(exc: InvalidRequest) -> Response:
        """The engine cannot serve the request as asked (a token id outside the vocabulary, a schema it cannot
        compile, a feature this engine lacks): the client's error."""
        return respond(APIError(str(exc), status=status, param=names.get(exc.param or "", exc.param)))

    return refused


def in_band(exc: Exception) -> dict[str, Any]:
    """The error event of a stream that failed after it started (its 200 status is already sent)."""
    if isinstance(exc, EngineError):
        failure = from_engine_error(exc)
    else:
        log.exception("stream failed")
        failure = APIError("The server had an unexpected error.", status=500)
    return error_body(failure.message, status=failure.status, type=failure.type, param=failure.param)


def register(app: Flask) -> None:
    """Install the handlers on `app` so that nothing leaves it in another shape."""

    @app.errorhandler(APIError)
    def _api_error(exc: APIError) -> Response:
        return respond(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return respond(from_http_exception(exc))

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError) -> Response:
        return respond(validation_error(exc.messages))

    @app.errorhandler(EngineError)
    def _engine_error(exc: EngineError) -> Response:
        return respond(from_engine_error(exc))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return respond(APIError("The server had an unexpected error.", status=500))
