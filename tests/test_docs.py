"""The OpenAPI spec and the Swagger UI page, checked against the app that serves them (fake engine)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import pytest
from openapi_spec_validator import validate

from llmapi.http.docs import DOC_ENDPOINTS

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def spec(client) -> dict[str, Any]:
    """The spec as the app serves it."""
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (path, method, operation) of the spec."""
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


def openapi_path(rule: str) -> str:
    """Werkzeug's /a/<int:b> as OpenAPI's /a/{b}."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_spec_is_valid_openapi(spec):
    validate(spec)
    assert spec["openapi"].startswith("3.")


def test_spec_and_docs_need_no_key(client):
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_every_route_is_in_the_spec(app, spec):
    documented = {(path, method) for path, method, _ in operations(spec)}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in DOC_ENDPOINTS:
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (openapi_path(rule.rule), method.lower()) in documented, f"{method} {rule.rule} is not documented"


def test_every_documented_operation_is_a_route(app, spec):
    adapter = app.url_map.bind("localhost")
    for path, method, _ in operations(spec):
        assert adapter.test(path, method=method.upper()), f"{method} {path} has no route"


def test_security_schemes_are_api_key_and_bearer(spec):
    schemes = spec["components"]["securitySchemes"]
    assert {"type": "apiKey", "in": "header", "name": "x-api-key"}.items() <= schemes["ApiKeyAuth"].items()
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes["BearerAuth"].items()


def test_security_is_documented_exactly_where_a_key_is_required(client, spec):
    """A keyless request gets 401 on every operation marked secured, and on no other."""
    secured = set()
    for path, method, operation in operations(spec):
        response = client.open(path, method=method.upper(), json={})
        if operation.get("security"):
            assert operation["security"] == [{"ApiKeyAuth": []}, {"BearerAuth": []}]
            assert "401" in operation["responses"]
            assert response.status_code == 401, f"{method} {path} is documented as secured but answered without a key"
            secured.add(path)
        else:
            assert response.status_code != 401, f"{method} {path} needs a key the spec does not mention"
    assert "/generate" in secured
    assert "/health" not in secured


def test_every_error_response_has_the_error_shape(spec):
    for path, method, operation in operations(spec):
        statuses = {status for status in operation["responses"] if status[0] in "45"}
        assert "500" in statuses, f"{method} {path}"
        for status in statuses:
            content = operation["responses"][status]["content"]
            assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (path, status)
    error = spec["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    detail = spec["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}


def test_generate_documents_every_error_it_can_give(spec):
    responses = spec["paths"]["/generate"]["post"]["responses"]
    assert {"200", "400", "401", "413", "415", "422", "500", "503"} <= set(responses)
    assert "WWW-Authenticate" in responses["401"]["headers"]
    assert "Retry-After" in responses["503"]["headers"]


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ("{bad", {"content-type": "application/json"}, 400),
        ('{"prompt": "hi"}', {"content-type": "text/plain"}, 415),
        (json.dumps({"prompt": "x" * 300_000}), {"content-type": "application/json"}, 413),
        ('{"prompt": ""}', {"content-type": "application/json"}, 422),
    ],
)
def test_documented_errors_are_the_ones_answered(client, auth, spec, body, headers, status):
    response = client.post("/generate", data=body, headers={**auth, **headers})
    assert response.status_code == status
    assert str(status) in spec["paths"]["/generate"]["post"]["responses"]
    assert set(response.get_json()["error"]) == {"message", "type", "param", "code"}


def test_streaming_is_documented_as_an_alternative_200(spec):
    content = spec["paths"]["/generate"]["post"]["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateResponse"}
    stream = content["text/event-stream"]
    assert stream["schema"]["properties"]["data"]["type"] == "string"
    assert stream["example"].startswith('data: {"token"')


def test_spec_shows_the_configured_limits(spec):
    fields = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert fields["max_new_tokens"]["maximum"] == 48  # the `app` fixture's max_new_tokens_limit
    assert fields["prompt"]["maxLength"] == 200
    assert fields["top_p"]["exclusiveMinimum"] is True
    assert fields["repetition_penalty"]["exclusiveMinimum"] is True
    assert "exclusiveMinimum" not in fields["temperature"]
    strings, lists = fields["stop"]["oneOf"]
    assert strings["minLength"] == 1 and lists["maxItems"] == 4


def test_request_examples_include_the_readme_curl_example(spec):
    examples = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert examples["readme"]["value"] == {"prompt": "Artificial Intelligence is", "max_new_tokens": 40}


def test_request_examples_are_accepted(client, auth, spec):
    """Every documented example is a request the server answers with 200."""
    for path, method, operation in operations(spec):
        for name, example in (
            operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("examples", {}).items()
        ):
            response = client.open(path, method=method.upper(), json=example["value"], headers=auth)
            assert response.status_code == 200, (path, name, response.get_json())


def test_request_examples_stay_within_small_limits(make_app, fake_engine):
    app = make_app(fake_engine, max_new_tokens_limit=8, max_new_tokens_default=8)
    body = app.test_client().get("/openapi.json").get_json()
    examples = body["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert {example["value"]["max_new_tokens"] for example in examples.values()} == {8}


class AssetLinks(HTMLParser):
    """Collect every src and href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_docs_page_loads_every_asset_from_the_app(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert not re.search(r"(https?:)?//", html), "the page names another host"
    parser = AssetLinks()
    parser.feed(html)
    assert len(parser.urls) >= 3
    for url in parser.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/docs/assets/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.mimetype in ("text/css", "text/javascript", "application/javascript"), url
    assert '"/openapi.json"' in html
    assert '"validatorUrl": null' in html  # no badge fetched from validator.swagger.io


@pytest.mark.parametrize(
    "path", ["/docs/assets/../../config.py", "/docs/assets/nope.js", "/docs/assets/", "/docs/assets/index.html"]
)
def test_docs_assets_serve_nothing_else(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert set(response.get_json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "\\ud800 lone"}',
        '{"prompt": "hi", "stop": "\\udc00"}',
        '{"prompt": "hi", "stop": ["ok", "\\ud83d"]}',
    ],
)
def test_unpaired_surrogates_are_422(client, auth, body):
    """Found while fuzzing: a lone surrogate in a JSON escape reached the tokenizer and gave a 500."""
    response = client.post("/generate", data=body, headers={**auth, "content-type": "application/json"})
    assert response.status_code == 422
    assert response.get_json()["error"]["param"] in ("prompt", "stop")


def test_surrogate_pairs_are_text(client, auth):
    body = '{"prompt": "emoji \\ud83d\\ude00", "stop": "\\ud83d\\ude00", "max_new_tokens": 1}'
    assert client.post("/generate", data=body, headers={**auth, "content-type": "application/json"}).status_code == 200
