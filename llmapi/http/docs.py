"""API docs: an OpenAPI spec completed from what each route really does, and Swagger UI served offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from apispec import APISpec, BasePlugin
from flask import Blueprint, Flask, Response, abort, send_from_directory
from flask_smorest import Api
from marshmallow import fields
from marshmallow.validate import Range
from swagger_ui_bundle import swagger_ui_path
from werkzeug.routing import Rule

from llmapi.errors import error_body
from llmapi.http import playground
from llmapi.http.fields import ErrorSchema
from llmapi.http.hooks import require_api_key, require_json

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
ASSETS_DIR = Path(str(swagger_ui_path))
# What flask-smorest's page loads; the bundle's own index.html would point at the online petstore demo.
ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"})
# Routes that serve the documentation itself, or the playground; every other route of the app must be in the spec.
DOC_ENDPOINTS = frozenset({"api-docs.openapi_json", "api-docs.openapi_swagger_ui", "swagger_ui.asset"}) | (
    playground.ENDPOINTS
)

SECURITY_SCHEMES = {
    "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "One of the API keys."},
    "BearerAuth": {"type": "http", "scheme": "bearer", "description": "The same keys, as `Authorization: Bearer`."},
}
# Either scheme is enough (a list of alternatives, each a one-scheme requirement).
SECURITY = [{"ApiKeyAuth": []}, {"BearerAuth": []}]
# The before_request hooks that make a route need a key, and insist on a JSON body (415).
AUTH_HOOKS: frozenset[Callable[..., Any]] = frozenset({require_api_key})
JSON_HOOKS: frozenset[Callable[..., Any]] = frozenset({require_json})

ERRORS: dict[int, str] = {
    400: "The body is not valid JSON.",
    401: "Missing or invalid API key.",
    404: "No such resource.",
    413: "The body is larger than MAX_BODY_BYTES.",
    415: "Content-Type is not application/json.",
    422: "A field failed validation.",
    500: "An unexpected failure: logged with its traceback, answered with a generic message.",
}
HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "How to authenticate: the x-api-key header or a Bearer token.",
            "required": True,
            "schema": {"type": "string"},
        }
    },
}

DESCRIPTION = """\
A Hugging Face causal language model behind an HTTP API.

**Authentication.** Routes marked with a lock need one of the service's API keys, in the
`x-api-key` header or as `Authorization: Bearer <key>`: press *Authorize* and enter it once.
`/health`, `/docs`, `/openapi.json` and the playground at `/` are open.

**Errors.** Every error, from any route, is JSON of one shape:
`{"error": {"message", "type", "param", "code"}}`. Besides the statuses listed per operation,
an unknown path answers 404 and a method a path does not serve answers 405 (with `Allow`).

**Limits** shown in the schemas (prompt length, `max_new_tokens`, `timeout_ms`) are this
server's configuration.
"""

SWAGGER_UI_CONFIG = {
    "OPENAPI_SWAGGER_UI_PATH": DOCS_PATH,
    "OPENAPI_SWAGGER_UI_URL": ASSETS_PATH + "/",
    "OPENAPI_SWAGGER_UI_CONFIG": {
        # Swagger UI would otherwise send the spec to validator.swagger.io for a badge.
        "validatorUrl": None,
        "displayRequestDuration": True,
        "deepLinking": True,
    },
}


class SpecApi(Api):
    """flask-smorest's Api, documenting our error shape, auth and limits, with Swagger UI served by the app."""

    ERROR_SCHEMA = ErrorSchema

    def init_app(self, app: Flask, *, spec_kwargs: dict[str, Any] | None = None) -> None:
        """Set up the spec with our plugin, and serve Swagger UI's files from the installed bundle."""
        for key, value in SWAGGER_UI_CONFIG.items():
            app.config.setdefault(key, value)
        spec_kwargs = dict(spec_kwargs or {})
        spec_kwargs["extra_plugins"] = [*spec_kwargs.get("extra_plugins", ()), RoutePlugin(app)]
        super().init_app(app, spec_kwargs=spec_kwargs)
        self.ma_plugin.converter.add_attribute_function(field_attributes)
        app.register_blueprint(assets_blueprint())

    def _register_pagination_header(self) -> None:
        """Leave out flask-smorest's pagination header: no route pages, and its schema would clutter the docs."""


class RoutePlugin(BasePlugin):
    """Complete each operation from its route: security where the auth hook runs, and the errors it can give."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def init_spec(self, spec: APISpec) -> None:
        """Declare the security schemes, the error schema and the overview."""
        for name, scheme in SECURITY_SCHEMES.items():
            spec.components.security_scheme(name, scheme)
        spec.components.schema("Error", schema=ErrorSchema)
        spec.options.setdefault("info", {}).setdefault("description", DESCRIPTION)

    def operation_helper(self, path: str | None = None, operations: dict | None = None, **kwargs: Any) -> None:
        """Add security and error responses to the operations of `kwargs["rule"]` (flask-smorest passes it)."""
        rule: Rule | None = kwargs.get("rule")
        if rule is None or not operations:
            return
        hooks = before_request_hooks(self.app, rule.endpoint)
        for operation in operations.values():
            if hooks & AUTH_HOOKS:
                operation.setdefault("security", SECURITY)
            # Keys are strings in the spec; flask-smorest hands over the route's own as ints.
            responses = {str(status): doc for status, doc in operation.get("responses", {}).items()}
            for status in error_statuses(operation, hooks, rule):
                declared = responses.setdefault(str(status), error_response(status))
                if status in HEADERS and isinstance(declared, dict):
                    declared.setdefault("headers", HEADERS[status])
            operation["responses"] = dict(sorted(responses.items(), key=lambda item: item[0].zfill(7)))


def before_request_hooks(app: Flask, endpoint: str) -> set[Callable[..., Any]]:
    """The before_request functions Flask runs for `endpoint`: the app's and every enclosing blueprint's."""
    names: list[str | None] = [None]
    parts = endpoint.split(".")[:-1]
    names += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return {func for name in names for func in app.before_request_funcs.get(name, ())}


def error_statuses(operation: dict[str, Any], hooks: set[Callable[..., Any]], rule: Rule) -> list[int]:
    """The error statuses an operation can answer, from its hooks, its body and its path."""
    statuses = [401] if hooks & AUTH_HOOKS else []
    if "requestBody" in operation:
        statuses += [400, 413, 415] if hooks & JSON_HOOKS else [400, 413]
        # flask-smorest declares the validation status it answers with (422, or 400 on /v1) itself.
        statuses += [422] if 422 in operation.get("responses", {}) or "422" in operation.get("responses", {}) else []
    if rule.arguments:
        statuses.append(404)
    return [*statuses, 500]


def error_response(status: int) -> dict[str, Any]:
    """Document one error status with the error shape and an example."""
    example = error_body(ERRORS[status], status=status)
    response: dict[str, Any] = {
        "description": ERRORS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}, "example": example}},
    }
    if status in HEADERS:
        response["headers"] = HEADERS[status]
    return response


NULLABLE_OBJECT = {"type": "object", "nullable": True}
NULL = {"nullable": True, "enum": [None]}


def field_attributes(self: Any, field: fields.Field, ret: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """apispec attribute function: open Range ends, and a field's own schema where it declares one."""
    attributes: dict[str, Any] = {}
    for validator in field.validators:
        # apispec writes every Range end as closed; OpenAPI 3.0 marks an open one with a boolean.
        if isinstance(validator, Range) and validator.min is not None and not validator.min_inclusive:
            attributes["exclusiveMinimum"] = True
        if isinstance(validator, Range) and validator.max is not None and not validator.max_inclusive:
            attributes["exclusiveMaximum"] = True
    mapping = getattr(field, "_jsonschema_type_mapping", None)
    if mapping is not None:
        attributes.update(mapping())
    # apispec writes a nullable nested schema as anyOf [its schema, any object]: the second would let any object
    # through the spec while the server refuses unknown fields. Null is what it means.
    if isinstance(field, fields.Nested) and NULLABLE_OBJECT in ret.get("anyOf", ()):
        attributes["anyOf"] = [NULL if item == NULLABLE_OBJECT else item for item in ret["anyOf"]]
    return attributes


def assets_blueprint() -> Blueprint:
    """Serve Swagger UI's files from the swagger-ui-bundle package, so /docs needs no network."""
    blp = Blueprint("swagger_ui", __name__, url_prefix=ASSETS_PATH)

    @blp.get("/<path:filename>")
    def asset(filename: str) -> Response:
        """One file of the Swagger UI distribution."""
        if filename not in ASSETS:
            abort(404)
        return send_from_directory(ASSETS_DIR, filename, max_age=3600)

    return blp
