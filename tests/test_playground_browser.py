"""The playground in headless Chromium (Debian's chromium and chromedriver, driven by selenium) on a real gunicorn.

One gunicorn on the tiny model serves the module (the tests change nothing on it); one browser, a fresh page
per test. Every URL the browser requests, and every console message, is collected from Chrome's logs, and the
last test checks that no request left 127.0.0.1 and that the Content Security Policy refused nothing.
Set LLMAPI_SCREENSHOT=1 (`make screenshot`) to write the README's docs/playground.png; it always goes to
artifacts/playground.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from werkzeug.serving import make_server

from llmapi import create_app
from tests.conftest import (
    GGUF_CACHE,
    KEY,
    ROOT,
    FakeEngine,
    FakeHandle,
    Server,
    free_port,
    launch,
    server_env,
    wait_for_health,
)

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "artifacts"
README_SCREENSHOT = ROOT / "docs" / "playground.png"
CHROMIUM = os.environ.get("LLMAPI_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LLMAPI_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
# Debian's Chromium as root in a closed network: no sandbox, no GPU, and none of its own background traffic.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,700",
]
WAIT_S = 120  # generous: the machines that run this share their cores
# top_p below 1 sorts the vocabulary at every step: about 8 ms a token on the tiny model, so a long answer
# streams for seconds, long enough to watch it grow and to stop it.
SLOW = {"top_p": "0.9"}
HTML_ANSWER = ["<script>window.pwned = 1</script>", '<img src=x onerror="window.pwned = 2">', " & <b>bold</b>"]


@pytest.fixture(scope="module")
def server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One gunicorn worker on the tiny model, its model loaded at start (WARMUP)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("playground") / "gunicorn.log"
    # SERVED_MODEL_NAME: the screenshot shows the model's id, not this checkout's path.
    settings = {"MODEL_NAME": tiny_model, "SERVED_MODEL_NAME": "tiny-gpt2", "WEB_CONCURRENCY": "1", "WARMUP": "true"}
    env = server_env(API_KEY=KEY, BIND=f"127.0.0.1:{port}", **settings)
    with log_path.open("wb") as log_file:
        cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for_health(server.url, process)
        deadline = time.monotonic() + WAIT_S
        while requests.get(server.url + "/ready", timeout=5).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield server
    finally:
        server.stop()


class HtmlEngine(FakeEngine):
    """A fake engine whose every answer is HTML."""

    def submit(self, request):
        self.requests.append(request)
        return FakeHandle(request, HTML_ANSWER)


@pytest.fixture(scope="module")
def html_server() -> Iterator[str]:
    """The app with the HTML-writing fake engine, on werkzeug's server in a thread (no model needed)."""
    app = create_app({"api_key": KEY}, engine_factory=lambda settings: HtmlEngine())
    http = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}"
    finally:
        http.shutdown()


class Browser:
    """A selenium Chrome session and what its logs have said so far."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.requests: list[dict[str, Any]] = []  # DevTools' Network.Request objects: url, method, headers
        self.console: list[dict[str, Any]] = []

    @property
    def urls(self) -> list[str]:
        """Every URL requested so far."""
        return [request["url"] for request in self.requests]

    def drain_logs(self) -> None:
        """Move Chrome's performance (network) and console entries into `requests` and `console`."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"])
        self.console += self.driver.get_log("browser")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Debian's headless Chromium through Debian's chromedriver, logging every network request."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = f"{CHROMIUM} or {CHROMEDRIVER} not found: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(WAIT_S)
    session = Browser(driver)
    try:
        yield session
    finally:
        driver.quit()


class Playground:
    """The page, driven as a person would: typing into labelled fields and pressing keys and buttons."""

    def __init__(self, browser: Browser, url: str) -> None:
        self.browser = browser
        self.driver = browser.driver
        self.driver.get(url + "/")
        self.driver.execute_script("sessionStorage.clear()")
        self.driver.refresh()
        self.wait(lambda: self.driver.execute_script("return document.readyState") == "complete")

    def wait(self, condition: Callable[[], Any], timeout: float = WAIT_S) -> Any:
        """Poll `condition` until it is truthy; fail with the page's state when time runs out."""
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: condition())

    def find(self, selector: str) -> Any:
        """The element matching a CSS selector."""
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def find_all(self, selector: str) -> list[Any]:
        """Every element matching a CSS selector."""
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def fill(self, field: str, text: str) -> None:
        """Replace the text of the field with id `field`."""
        element = self.find(f"#{field}")
        element.clear()
        element.send_keys(text)

    def send(self, prompt: str) -> None:
        """Type a prompt and press Enter."""
        from selenium.webdriver.common.keys import Keys

        self.find("#message").send_keys(prompt, Keys.ENTER)

    def answer(self) -> str:
        """The text of the last answer so far."""
        answers = self.find_all(".turn .answer")
        return self.driver.execute_script("return arguments[0].textContent", answers[-1]) if answers else ""

    def figures(self) -> dict[str, str]:
        """The figures of the last answer, once it has ended."""
        self.wait(lambda: self.find_all(".turn:last-child .figures li"))
        items = self.find_all(".turn:last-child .figures li")
        return {item.get_attribute("data-figure"): item.text for item in items}

    def error(self, field: str) -> str:
        """The error shown under a field ('' while hidden)."""
        element = self.find(f"#{field}-error")
        return element.text if element.is_displayed() else ""

    def server_panel(self, name: str) -> str:
        """One figure of the server panel."""
        return self.find(f'[data-server="{name}"]').text


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Playground]:
    """A fresh playground page on the gunicorn server, with an empty sessionStorage."""
    yield Playground(browser, server.url)
    browser.drain_logs()


def cancellations(server: Server) -> list[str]:
    """The engine's cancellation lines so far."""
    return [line for line in server.log().splitlines() if "generation cancelled after" in line]


def test_chat_answer_streams_and_grows(page, server):
    page.fill("key", KEY)
    page.fill("top_p", SLOW["top_p"])
    page.fill("max_tokens", "200")
    from selenium.webdriver.common.keys import Keys

    message = page.find("#message")
    message.send_keys("Once upon a time", Keys.SHIFT, Keys.ENTER, Keys.NULL, "there was")
    assert message.get_attribute("value") == "Once upon a time\nthere was"  # Shift+Enter: a new line, not sent
    message.send_keys(Keys.ENTER)
    page.wait(lambda: page.answer())
    log = page.find("#log")
    first_text, first_shot = page.answer(), log.screenshot_as_png
    time.sleep(0.5)
    second_text, second_shot = page.answer(), log.screenshot_as_png
    assert first_shot != second_shot
    assert len(second_text) > len(first_text) and second_text.startswith(first_text)

    figures = page.figures()
    text = page.answer()
    assert re.fullmatch(r"first token \d+ ms", figures["ttft"]), figures
    assert re.fullmatch(r"\d+\.\d tokens/s", figures["rate"]), figures
    usage = re.fullmatch(r"usage (\d+) \+ (\d+) = (\d+) tokens", figures["usage"])
    assert usage and 0 < int(usage[2]) <= 200 and int(usage[1]) + int(usage[2]) == int(usage[3]), figures
    assert figures["finish"] in ("finish: length", "finish: stop"), figures
    seed = re.fullmatch(r"seed (\d+)", figures["seed"])
    request_id = re.fullmatch(r"request id ([0-9a-f]{32})", figures["request-id"])
    assert seed and request_id, figures
    assert f"[{request_id[1]}]" in server.log()  # the id shown is the one the server logged the request under

    # The seed shown reproduces the answer: the same request through the API gives the same text.
    again = server.post(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Once upon a time\nthere was"}],
            "top_p": 0.9,
            "max_tokens": 200,
            "seed": int(seed[1]),
        },
    )
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == text

    # The server panel: readiness, the model's facts and the engine's figures, through /status with the key.
    page.wait(lambda: page.server_panel("hardware") == "float32 / cpu", timeout=10)
    assert page.server_panel("readiness") == "ready"
    assert page.server_panel("model") == "tiny-gpt2"  # the id /v1/models lists
    assert page.server_panel("engine").startswith("batch")
    assert re.fullmatch(r"\d+(\.\d+)?", page.server_panel("rate"))
    assert page.find("#send").is_enabled() and not page.find("#stop").is_enabled()


def test_stop_aborts_the_stream_and_the_server_cancels(page, server):
    page.fill("key", KEY)
    page.fill("top_p", SLOW["top_p"])
    page.fill("max_tokens", "500")
    before = len(cancellations(server))
    page.send("Tell me a long story")
    page.wait(lambda: page.answer())
    assert page.find("#stop").is_enabled()
    page.find("#stop").click()

    figures = page.figures()
    assert figures["finish"] == "finish: stopped by you", figures
    request_id = re.fullmatch(r"request id ([0-9a-f]{32})", figures["request-id"])[1]
    deadline = time.monotonic() + 15
    while len(cancellations(server)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = cancellations(server)
    assert len(lines) == before + 1, "the server did not cancel the generation"
    done = int(re.search(r"cancelled after (\d+) of 500", lines[-1])[1])
    assert done < 500
    assert f"[{request_id}]" in lines[-1]
    assert page.find("#send").is_enabled() and not page.find("#stop").is_enabled()

    # The partial answer stays in the conversation: the next turn is sent with it.
    kept = page.answer()
    page.fill("max_tokens", "4")
    page.send("Go on")
    page.wait(lambda: len(page.find_all(".turn")) == 2 and page.figures().get("finish", "").startswith("finish"))
    assert len(page.find_all(".msg.assistant")) == 2
    assert kept


@pytest.mark.parametrize(
    ("key", "message"),
    [("not-the-key", "401: Invalid API key."), ("", "401: Missing API key: send it in the x-api-key header.")],
)
def test_wrong_key_shows_the_apis_401_message(page, key, message):
    page.fill("key", key)
    page.send("Hello")
    page.wait(lambda: page.error("key"))
    assert page.error("key") == message
    assert page.find("#key").get_attribute("aria-invalid") == "true"
    assert page.find(".turn:last-child .turn-error").text == message
    assert page.find("#message").get_attribute("value") == "Hello"  # back in the box, to send again


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [("temperature", "5", "temperature"), ("max_tokens", "100000", "max_tokens"), ("top_p", "abc", "top_p")],
)
def test_bad_value_shows_the_apis_message_next_to_its_field(page, field, value, param):
    page.fill("key", KEY)
    page.fill(field, value)
    page.send("Hello")
    page.wait(lambda: page.error(field))
    assert page.error(field).startswith(f"400: {param}: "), page.error(field)
    assert page.find(f"#{field}").get_attribute("aria-invalid") == "true"
    assert page.error("key") == ""
    page.fill(field, "1")  # editing the field clears its error
    assert page.error(field) == ""


def test_key_is_kept_for_the_tab_and_sent_as_bearer(page, browser):
    page.fill("key", KEY)
    page.driver.refresh()
    page.wait(lambda: page.find("#key").get_attribute("value") == KEY)  # restored from sessionStorage
    stored = page.driver.execute_script("return [sessionStorage.getItem('llmapi.key'), localStorage.length]")
    assert stored == [KEY, 0]
    assert page.driver.get_cookies() == []
    page.fill("max_tokens", "4")
    page.send("Hello")
    page.figures()
    browser.drain_logs()
    sent = [r for r in browser.requests if r["url"].endswith("/v1/chat/completions") and r["method"] == "POST"]
    headers = {name.lower(): value for name, value in sent[-1]["headers"].items()}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert "x-api-key" not in headers
    page.find("#forget").click()
    assert page.driver.execute_script("return sessionStorage.getItem('llmapi.key')") is None
    assert page.find("#key").get_attribute("value") == ""


def test_completion_mode_continues_the_prompt(page):
    page.fill("key", KEY)
    page.find('input[name="mode"][value="completion"]').click()
    assert page.find("#message-label").text == "Prompt"
    assert not page.find("#system").is_displayed()
    page.fill("max_tokens", "8")
    page.send("Artificial Intelligence is")
    figures = page.figures()
    assert figures["finish"] in ("finish: length", "finish: stop"), figures
    assert page.find(".turn.completion .prompt").text == "Artificial Intelligence is"
    assert page.answer()


def posts(browser: Browser) -> list[dict[str, Any]]:
    """The POSTs to /v1 the browser has sent so far (DevTools' Network.Request objects, with postData)."""
    browser.drain_logs()
    return [r for r in browser.requests if r["method"] == "POST" and urlsplit(r["url"]).path.startswith("/v1/")]


def choose_format(page: Playground, kind: str, schema: str | None = None) -> None:
    """Pick an output format and, for json_schema, type the schema into its box."""
    from selenium.webdriver.support.ui import Select

    Select(page.find("#response-format")).select_by_value(kind)
    if schema is not None:
        assert page.find("#json-schema").is_displayed()
        page.fill("json-schema", schema)


LOGPROB = re.compile(r"logprob -?\d+\.\d{4}, probability \d+(\.\d+)?(e-\d+)?%")


@pytest.mark.parametrize(("mode", "top"), [("chat", 2), ("completion", 3), ("chat", 0)])
def test_logprobs_show_on_each_token(page, browser, mode, top):
    page.fill("key", KEY)
    if mode == "completion":
        page.find('input[name="mode"][value="completion"]').click()
    page.find("#logprobs").click()
    page.fill("top_logprobs", str(top))
    page.fill("max_tokens", "12")
    page.send("The capital of France is")
    figures = page.figures()
    assert figures["finish"] in ("finish: length", "finish: stop"), figures
    sent = json.loads(posts(browser)[-1]["postData"])
    if mode == "chat":
        assert sent["logprobs"] is True and sent["top_logprobs"] == top, sent
    else:
        assert sent["logprobs"] == top and "top_logprobs" not in sent, sent

    spans = page.find_all(".turn:last-child .answer .token")
    assert spans, "no token spans"
    texts = [page.driver.execute_script("return arguments[0].textContent", span) for span in spans]
    assert "".join(texts) == page.answer() != ""
    answer_box = page.find(".turn:last-child .answer")
    children = page.driver.execute_script("return [...arguments[0].childNodes].map((n) => n.nodeName)", answer_box)
    assert set(children) == {"SPAN"}, children
    for span in spans:
        title = span.get_attribute("title")
        assert LOGPROB.search(title), title
        assert ("Top alternatives:" in title) == (top > 0), title
        assert span.get_attribute("tabindex") == "0"
    if top:  # each alternative has its own logprob line
        first = spans[0].get_attribute("title").split("\n")
        alternatives = first[first.index("Top alternatives:") + 1 :]
        assert 1 <= len(alternatives) <= top + 1 and all(LOGPROB.search(line) for line in alternatives), first

    # Keyboard: a token takes the focus and the tip shows its title next to it.
    page.driver.execute_script("arguments[0].focus()", spans[0])
    tip = page.find("#token-tip")
    assert tip.is_displayed()
    assert page.driver.execute_script("return arguments[0].textContent", tip) == spans[0].get_attribute("title")
    page.driver.execute_script("arguments[0].blur()", spans[0])
    assert not tip.is_displayed()

    # Off again: the next answer is one plain text node, as without the control.
    page.find("#logprobs").click()
    page.send(" Paris")
    page.wait(lambda: len(page.find_all(".turn")) == 2)
    page.figures()
    assert page.find_all(".turn:last-child .answer .token") == []
    assert "logprobs" not in json.loads(posts(browser)[-1]["postData"])


SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_json_schema_box_constrains_the_answer(page, browser, mode):
    page.fill("key", KEY)
    if mode == "completion":
        page.find('input[name="mode"][value="completion"]').click()
    choose_format(page, "json_schema", SCHEMA)
    page.fill("max_tokens", "60")
    page.send("Give me a number")
    figures = page.figures()
    sent = json.loads(posts(browser)[-1]["postData"])
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "playground", "schema": json.loads(SCHEMA)},
    }
    assert page.error("json-schema") == ""
    if figures["finish"] == "finish: length":
        pytest.skip("the answer was cut at max_tokens, so it is not complete JSON")
    assert figures["finish"] == "finish: stop", figures
    answer = json.loads(page.answer())
    assert isinstance(answer["a"], int), answer


def test_json_object_mode_sends_it(page, browser):
    page.fill("key", KEY)
    choose_format(page, "json_object")
    assert not page.find("#json-schema").is_displayed()  # no schema to type
    page.fill("max_tokens", "60")
    page.send("Some JSON please")
    figures = page.figures()
    assert json.loads(posts(browser)[-1]["postData"])["response_format"] == {"type": "json_object"}
    if figures["finish"] == "finish: stop":
        assert isinstance(json.loads(page.answer()), dict)


def test_invalid_json_in_the_schema_box_is_shown_and_nothing_is_sent(page, browser):
    page.fill("key", KEY)
    choose_format(page, "json_schema", '{"type": "object",')
    before = len(posts(browser))
    page.send("Hello")
    page.wait(lambda: page.error("json-schema"))
    assert page.error("json-schema").startswith("Not valid JSON: "), page.error("json-schema")
    assert page.find("#json-schema").get_attribute("aria-invalid") == "true"
    assert page.find_all(".turn") == []
    assert page.find("#message").get_attribute("value") == "Hello"  # still there, to send once the schema is fixed
    time.sleep(0.3)
    assert len(posts(browser)) == before
    page.fill("json-schema", SCHEMA)  # editing the box clears its error
    assert page.error("json-schema") == ""


def test_a_schema_the_server_refuses_shows_its_400_next_to_the_box(page, server):
    page.fill("key", KEY)
    choose_format(page, "json_schema", '{"type": 12}')
    page.send("Hello")
    page.wait(lambda: page.error("json-schema"))
    shown = page.error("json-schema")
    direct = server.post(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Hello"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "playground", "schema": {"type": 12}}},
        },
    )
    assert direct.status_code == 400
    error = direct.json()["error"]
    assert error["param"].startswith("response_format"), error
    assert shown == f"400: {error['message']}"
    assert page.find("#json-schema").get_attribute("aria-invalid") == "true"
    assert page.find(".turn:last-child .turn-error").text == shown


def test_readable_on_a_phone_sized_window(page):
    driver = page.driver
    driver.set_window_size(390, 844)
    try:
        page.wait(lambda: driver.execute_script("return window.innerWidth") <= 400)
        choose_format(page, "json_schema")  # the schema box shown too
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than the window"
        for selector in (
            "#message",
            "#send",
            "#stop",
            "#new",
            "#key",
            "#temperature",
            "#top_logprobs",
            "#response-format",
            "#json-schema",
        ):
            element = page.find(selector)
            assert element.size["width"] <= 390, selector
        font = driver.execute_script(
            "return parseFloat(getComputedStyle(document.querySelector('.text, .empty')).fontSize)"
        )
        assert font >= 14
    finally:
        driver.set_window_size(1000, 700)


def test_html_in_an_answer_is_shown_as_text(browser, html_server):
    page = Playground(browser, html_server)
    try:
        page.fill("key", KEY)
        page.send("Write some HTML")
        page.figures()
        assert page.answer() == "".join(HTML_ANSWER)
        driver = page.driver
        assert driver.execute_script("return document.scripts.length") == 1  # the page's own module
        assert driver.execute_script("return document.querySelectorAll('#log img, #log b, #log script').length") == 0
        assert driver.execute_script("return window.pwned") is None
    finally:
        browser.drain_logs()


def test_new_conversation_clears_the_log(page):
    page.fill("key", KEY)
    page.fill("max_tokens", "4")
    page.fill("system", "You are terse.")
    page.send("Hi")
    page.figures()
    page.find("#new").click()
    assert page.find_all(".turn") == []
    assert "new conversation" in page.find("#log").text.lower()
    assert page.find("#system").get_attribute("value") == "You are terse."  # settings stay


@pytest.fixture(scope="module")
def real_server(real_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One gunicorn worker on the real model (SmolLM2-135M-Instruct), as `make run` serves it, loaded at start."""
    settings = {
        "MODEL_NAME": real_model,
        "GGUF_CACHE_DIR": str(GGUF_CACHE),
        "SERVED_MODEL_NAME": "SmolLM2-135M-Instruct",
    }
    running = launch(tmp_path_factory.mktemp("playground-real"), **settings, WEB_CONCURRENCY="1", WARMUP="true")
    try:
        deadline = time.monotonic() + 600  # a machine where `make real-model` has not run converts the file first
        while requests.get(running.url + "/ready", timeout=5).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield running
    finally:
        running.stop()


def test_screenshot_for_the_readme_the_real_model_answers_paris(browser, real_server):
    # What a new user does after `make run`: opens the page, pastes the key, asks. The README's picture is this one.
    page = Playground(browser, real_server.url)
    metrics = {"width": 1000, "height": 700, "deviceScaleFactor": 1, "mobile": False}
    page.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    page.fill("key", KEY)
    page.fill("max_tokens", "60")
    page.fill("temperature", "0")
    for prompt in ("What is the capital of France? Answer in one sentence.", "Name three famous museums there."):
        page.send(prompt)
        page.wait(lambda: page.find_all(".turn:last-child .figures li"))
        if "France" in prompt:
            assert "Paris" in page.answer(), page.answer()
    page.wait(lambda: page.server_panel("rate") not in ("…", "0", "0.0"), timeout=10)  # the tokens just made
    page.driver.execute_script("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "playground.png"
    try:
        page.driver.save_screenshot(str(shot))
    finally:
        page.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.drain_logs()
    assert shot.read_bytes()[16:24] == (1000).to_bytes(4, "big") + (700).to_bytes(4, "big")  # PNG width, height
    if os.environ.get("LLMAPI_SCREENSHOT"):
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, README_SCREENSHOT)


def test_no_request_left_this_machine_and_the_csp_refused_nothing(page, browser, server):
    # This test's own page load and request, then everything every test of the module asked for.
    page.fill("key", KEY)
    page.fill("max_tokens", "4")
    page.send("Hello")
    page.figures()
    browser.drain_logs()
    assert browser.urls, "Chrome's performance log recorded no request"
    for url in browser.urls:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https", "ws", "wss"):
            assert parts.hostname == "127.0.0.1", url
        else:  # answered inside the browser: the page's empty icon, Chrome's own first tab
            assert parts.scheme in ("data", "about", "chrome"), url
    paths = {urlsplit(url).path for url in browser.urls if url.startswith(server.url)}
    assert {"/", "/playground/assets/playground.js", "/playground/assets/playground.css"} <= paths
    assert {"/ready", "/status", "/v1/chat/completions", "/v1/completions"} <= paths
    refused = [
        entry["message"]
        for entry in browser.console
        if "Content Security Policy" in entry["message"] or "Trusted Type" in entry["message"]
    ]
    assert refused == []
    # The only console errors are the failed requests the tests made on purpose (401s and 400s), and /ready's
    # 503 from the fake-engine server, whose model loads on its first request.
    expected = re.compile(r"status of (400|401) |/ready - .* status of 503 ")
    unexpected = [e["message"] for e in browser.console if e["level"] == "SEVERE" and not expected.search(e["message"])]
    assert unexpected == []
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
