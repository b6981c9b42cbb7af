"""llmapi: a Flask service that serves a Hugging Face causal language model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from llmapi import errors, logs
from llmapi.config import Settings
from llmapi.http import generate, health, jsonbody, metrics, playground, status, tokens
from llmapi.http.docs import SpecApi
from llmapi.http.hooks import EXTENSION as KEYS_EXTENSION
from llmapi.http.openai import routes as openai_routes
from llmapi.logs import configure_logging
from llmapi.metrics import Metrics
from llmapi.runtime.service import EngineFactory, EngineService, load_engine

__version__ = "0.1.0"


def create_app(
    test_config: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    engine_factory: EngineFactory = load_engine,
) -> Flask:
    """Build the app from the environment, or from `test_config` overrides alone when given."""
    if test_config is not None:
        settings = Settings.from_env(environ or {}, **test_config)
    else:
        settings = Settings.from_env(environ)
    app = Flask(__name__, static_folder=None)  # no /static route: nothing to serve there
    app.config.from_mapping(flask_config(settings))
    jsonbody.init_app(app)  # JSON with a depth and a digit limit wherever Flask parses it
    app.json.sort_keys = False  # keep fields in schema order, as clients print them
    configure_logging(settings)
    app.extensions[KEYS_EXTENSION] = tuple(key.encode("utf-8") for key in settings.keys)
    logs.init_app(app)  # first: every later hook may log, and every response carries the request id
    service_metrics = Metrics(settings)
    service_metrics.init_app(app)
    EngineService(settings, engine_factory, metrics=service_metrics).init_app(app)
    if settings.trusted_proxy_hops:  # only then may X-Forwarded-* say who the client is
        hops = settings.trusted_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)
    spec = SpecApi(app)
    spec.register_blueprint(health.blp)
    spec.register_blueprint(metrics.blp)
    spec.register_blueprint(generate.create_blueprint(settings))
    spec.register_blueprint(openai_routes.create_blueprint(settings))
    spec.register_blueprint(tokens.create_blueprint(settings))
    spec.register_blueprint(status.blp)
    app.register_blueprint(playground.blp)  # a page, not an API: outside the spec, like /docs
    errors.register(app)  # after Api(), so that these handlers replace flask-smorest's own
    return app


def flask_config(settings: Settings) -> dict[str, Any]:
    """Flask and flask-smorest settings derived from ours."""
    return {
        "LLMAPI_SETTINGS": settings,
        "MAX_CONTENT_LENGTH": settings.max_body_bytes,
        "API_TITLE": "llmapi",
        "API_VERSION": __version__,
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/",
        "OPENAPI_JSON_PATH": "openapi.json",
    }
