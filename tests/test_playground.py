"""The playground page, its files and headers, and GET /status, through the Flask test client and the tiny engine."""

from __future__ import annotations

import re
import threading
from html.parser import HTMLParser

import pytest

from llmapi import create_app
from llmapi.engine import GenerationRequest, create_engine
from llmapi.engine.stats import TokenRate
from llmapi.http import playground
from tests.conftest import KEY, OTHER_KEY, FakeEngine

PAGES = ["/", "/playground"]
ASSET_TYPES = {
    "/playground/assets/playground.js": "text/javascript; charset=utf-8",
    "/playground/assets/playground.css": "text/css; charset=utf-8",
}


class PageParser(HTMLParser):
    """Collect what a page loads and anything that would run or style inline."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.inline: list[str] = []
        self.labels: set[str] = set()
        self.controls: list[tuple[str, str | None]] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self._in_script = True
            if not values.get("src"):
                self.inline.append("script without src")
            else:
                self.loads.append(values["src"])
        if tag == "link" and values.get("rel") == "stylesheet":
            self.loads.append(values["href"])
        if tag == "style":
            self.inline.append("style element")
        self.inline += [f"{tag} {name}" for name, _ in attrs if name.startswith("on") or name == "style"]
        if tag == "label" and values.get("for"):
            self.labels.add(values["for"])
        if tag in ("input", "textarea", "select"):
            self.controls.append((values.get("id") or "", values.get("type")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("inline script text")


def parse(html: str) -> PageParser:
    """Parse a page."""
    parser = PageParser()
    parser.feed(html)
    return parser


@pytest.mark.parametrize("path", PAGES)
def test_page_is_served_without_a_key_and_holds_none(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert "<title>llmapi playground</title>" in html
    assert KEY not in html and OTHER_KEY not in html
    key_field = html[html.index('<input id="key"') :].split(">", 1)[0]
    assert "value=" not in key_field  # the field starts empty; the script fills it from sessionStorage


@pytest.mark.parametrize("path", [*PAGES, *ASSET_TYPES])
def test_page_and_assets_carry_the_security_headers(client, path):
    headers = client.get(path).headers
    csp = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'"  # no inline script, no eval, no other host
    assert csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"
    assert csp["require-trusted-types-for"] == "'script'"
    assert "unsafe" not in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"


def test_api_routes_keep_their_own_headers(client, auth):
    response = client.get("/v1/models", headers=auth)
    assert response.status_code == 200
    assert "Content-Security-Policy" not in response.headers


def test_page_has_no_inline_script_or_style_and_loads_only_its_own_assets(client):
    page = parse(client.get("/").get_data(as_text=True))
    assert page.inline == []
    assert sorted(page.loads) == sorted(ASSET_TYPES)


def test_every_control_has_a_label(client):
    page = parse(client.get("/").get_data(as_text=True))
    labelled = {control for control, kind in page.controls if kind != "radio"}  # radios sit inside their label
    assert labelled and labelled <= page.labels, labelled - page.labels


@pytest.mark.parametrize(("path", "content_type"), ASSET_TYPES.items())
def test_assets_are_served_with_their_types(client, path, content_type):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == content_type
    assert response.headers["Cache-Control"] == "no-cache"  # revalidated: a new version is picked up at once
    assert response.data == (playground.FILES / path.rsplit("/", 1)[1]).read_bytes()
    etag = response.headers["ETag"]
    assert client.get(path, headers={"If-None-Match": etag}).status_code == 304


@pytest.mark.parametrize("name", ["index.html", "__init__.py", "missing.js", "..%2F__init__.py"])
def test_only_listed_assets_are_served(client, name):
    response = client.get(f"/playground/assets/{name}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == 404


def test_script_never_parses_model_output_as_html():
    text = (playground.FILES / "playground.js").read_text()
    script = re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE)  # the code, without its comment lines
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "http://" not in script and "https://" not in script  # every URL is this server's


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}])
def test_status_needs_a_key(client, headers):
    response = client.get("/status", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["type"] == "authentication_error"


def test_status_never_loads_the_model():
    loads: list[object] = []
    app = create_app({"api_key": KEY}, engine_factory=lambda settings: loads.append(settings) or FakeEngine())
    response = app.test_client().get("/status", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    body = response.get_json()
    assert loads == []
    assert body["state"] == "not loaded" and body["ready"] is False
    assert body["model"] == "sshleifer/tiny-gpt2"
    assert body["dtype"] is body["device"] is body["decoding"] is body["tokens_per_second"] is None
    assert body["in_flight"] == 0 and body["admission_limit"] > 0


class StatsEngine(FakeEngine):
    """A fake engine that reports live figures, as the real ones do."""

    def stats(self) -> dict[str, object]:
        """What the batching engine reports while busy."""
        facts = {"dtype": "float32", "device": "cpu", "context_length": 64, "engine_mode": "batch"}
        return {**facts, "decoding": 2, "waiting": 1, "tokens_per_second": 12.5, "generated_tokens": 40}


def test_status_reports_the_engines_figures_once_loaded(auth):
    app = create_app({"api_key": KEY}, engine_factory=lambda settings: StatsEngine())
    client = app.test_client()
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth).status_code == 200
    body = client.get("/status", headers=auth).get_json()
    assert body["state"] == "ready" and body["ready"] is True
    assert (body["dtype"], body["device"], body["decoding"], body["waiting"]) == ("float32", "cpu", 2, 1)
    assert body["tokens_per_second"] == 12.5


def test_status_with_a_fake_engine_without_figures_reports_nulls(client, auth):
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth).status_code == 200
    body = client.get("/status", headers=auth).get_json()
    assert body["state"] == "ready"
    assert body["dtype"] is None and body["tokens_per_second"] is None


def test_token_rate_counts_the_last_window():
    now = [1000.0]
    rate = TokenRate(window_s=10, clock=lambda: now[0])
    rate.add(30)
    now[0] += 0.5
    rate.add(20)
    assert rate.per_second() == 5.0
    now[0] += 9.6  # the first second has left the window
    assert rate.per_second() == 0.0
    assert rate.total == 50


def test_token_rate_is_safe_across_threads():
    rate = TokenRate()
    threads = [threading.Thread(target=lambda: [rate.add(1) for _ in range(1000)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert rate.total == 4000
    assert rate.per_second() == pytest.approx(400.0)


def test_batching_engine_stats(engine):
    before = engine.stats()
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=12, do_sample=False))
    after = engine.stats()
    assert (after["dtype"], after["device"], after["engine_mode"]) == ("float32", "cpu", "batch")
    assert after["context_length"] == 1024
    assert after["decoding"] == 0 and after["waiting"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] == result.completion_tokens
    assert after["tokens_per_second"] > 0


def test_batching_engine_stats_count_a_row_while_it_decodes(engine):
    # top_p below 1 makes each step slow enough (a sort of the vocabulary) to look while the row decodes.
    request = GenerationRequest(prompt="Hello", max_new_tokens=300, do_sample=True, top_p=0.9, stream=True)
    handle = engine.submit(request)
    pieces = handle.pieces()
    next(pieces), next(pieces)  # the second piece comes from a decode step: the row is in its lane by then
    busy = engine.stats()
    handle.cancel()
    assert handle.result().finish_reason == "cancelled"
    assert busy["decoding"] == 1 and busy["waiting"] == 0
    assert engine.stats()["decoding"] == 0


def test_simple_engine_stats(tiny_model):
    simple = create_engine(tiny_model, engine_mode="simple")
    assert simple.stats()["tokens_per_second"] == 0
    result = simple.generate(GenerationRequest(prompt="Hello", max_new_tokens=6, do_sample=False))
    stats = simple.stats()
    assert (stats["engine_mode"], stats["decoding"], stats["waiting"]) == ("simple", 0, 0)
    assert stats["generated_tokens"] == result.completion_tokens
    assert stats["dtype"] == "float32"


def test_page_offers_logprobs_and_structured_output(client):
    page = parse(client.get("/").get_data(as_text=True))
    controls = dict(page.controls)
    assert controls["logprobs"] == "checkbox"
    assert "top_logprobs" in controls and "response-format" in controls and "json-schema" in controls
    html = client.get("/").get_data(as_text=True)
    for value in ('value="none"', 'value="json_object"', 'value="json_schema"'):
        assert value in html
    for field in ("top_logprobs", "json-schema"):  # where the API's errors naming logprobs or response_format go
        assert f'id="{field}-error"' in html
