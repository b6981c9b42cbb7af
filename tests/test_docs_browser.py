"""Swagger UI at /docs in a real headless Chromium against a real gunicorn: Authorize, Try it out, Execute."""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlsplit

import pytest

from tests.conftest import KEY, ROOT

ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("LLMAPI_TEST_CHROMIUM", "/usr/bin/chromium")
# Debian's Chromium as root in a closed network: no sandbox, no GPU, and none of its own background traffic.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


@pytest.fixture
def browser_context(tmp_path):
    """A fresh headless Chromium profile driven by Playwright (Debian's browser; Playwright downloads none)."""
    if not shutil.which(CHROMIUM):
        message = f"{CHROMIUM} not found: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 1400},
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.mark.slow
def test_swagger_ui_try_it_out_generates(start_server, tiny_model, browser_context):
    server = start_server(MODEL_NAME=tiny_model, WEB_CONCURRENCY="1")
    page = browser_context.new_page()
    seen: list[tuple[str, int]] = []
    page.on("response", lambda response: seen.append((response.url, response.status)))
    ARTIFACTS.mkdir(exist_ok=True)

    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock-summary-path")
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/generate", "/health"} <= {path.strip() for path in paths}
    page.screenshot(path=ARTIFACTS / "docs-operations.png")

    page.click("button.authorize")
    api_key = page.locator(".auth-container", has_text="ApiKeyAuth")
    api_key.locator("input").fill(KEY)
    api_key.locator("button.authorize").click()
    api_key.locator("button.btn-done").click()

    generate = page.locator(".opblock-post", has_text="/generate")
    generate.locator(".opblock-summary").click()
    generate.locator("button.try-out__btn").click()
    generate.locator("button.execute").click()
    status = generate.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for()
    body = generate.locator(".live-responses-table .response-col_description .microlight").first
    body.wait_for()
    generate.locator(".live-responses-table").scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "docs-try-it-out.png")

    assert status.inner_text().strip() == "200"
    assert '"generated_text": "Artificial Intelligence is' in body.inner_text()
    assert '"finish_reason"' in body.inner_text()
    curl = generate.locator(".curl-command").inner_text()
    assert f"x-api-key: {KEY}" in curl
    # Everything the page fetched came from this server, and all of it loaded.
    origin = urlsplit(server.url).netloc
    assert {urlsplit(url).netloc for url, _ in seen} == {origin}, seen
    assert all(code < 400 for url, code in seen if not url.endswith("/favicon.ico")), seen
    assert (server.url + "/generate", 200) in seen
