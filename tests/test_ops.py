"""Operations on the HTTP layer (fake engine): readiness, request ids, metrics, admission, proxies, logs."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import replace

import pytest
from flask import request

from llmapi.engine.types import EngineStats, GenerationRequest
from llmapi.logs import SANE_ID
from llmapi.runtime.runner import start
from llmapi.runtime.service import engine_service
from llmapi.runtime.tracking import describe
from tests.conftest import KEY, FakeEngine, FakeHandle
from tests.ops_helpers import error_of, sample

AUTH = {"x-api-key": KEY}
HEX_ID = r"[0-9a-f]{32}"


def generate(client, **body):
    """POST /generate with the key."""
    return client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2, **body}, headers=AUTH)


# Readiness


def test_ready_is_503_with_the_reason_until_the_model_loads(client):
    response = client.get("/ready")
    error = error_of(response.get_json(), 503)
    assert "not loaded yet" in error["message"]
    assert response.headers["Retry-After"].isdigit()
    assert generate(client).status_code == 200
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "model": "sshleifer/tiny-gpt2"}


def test_ready_reports_the_last_load_failure(make_app):
    def factory(settings):
        raise OSError("no model files in /models/x")

    app = make_app(model_retry_seconds=60, factory=factory)
    client = app.test_client()
    assert generate(client).status_code == 503
    error = error_of(client.get("/ready").get_json(), 503)
    assert "could not be loaded" in error["message"]
    assert "no model files in /models/x" in error["message"]


def test_ready_with_warmup_starts_the_load_and_says_it_is_loading(make_app, fake_engine):
    release = threading.Event()

    def slow_factory(settings):
        release.wait(10)
        return fake_engine

    app = make_app(warmup=True, factory=slow_factory)
    client = app.test_client()
    first = error_of(client.get("/ready").get_json(), 503)["message"]
    assert "load" in first
    deadline = time.monotonic() + 5
    while not engine_service_of(app).loading and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "is loading" in error_of(client.get("/ready").get_json(), 503)["message"]
    assert client.get("/health").status_code == 200  # never waits on the load
    release.set()
    assert wait_for(lambda: client.get("/ready").status_code == 200)


def test_warmup_retries_a_failed_load_after_the_retry_window(make_app, fake_engine):
    attempts = []

    def factory(settings):
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("not there yet")
        return fake_engine

    app = make_app(warmup=True, model_retry_seconds=0, factory=factory)
    client = app.test_client()
    engine_service_of(app).warm()
    assert wait_for(lambda: engine_service_of(app).failure is not None)
    assert wait_for(lambda: client.get("/ready").status_code == 200)  # the probe itself started the retry
    assert len(attempts) == 2


def engine_service_of(app):
    """The app's engine service."""
    with app.app_context():
        return engine_service()


def wait_for(condition, timeout: float = 5) -> bool:
    """Poll `condition` until it holds or `timeout` passes; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# Request ids


@pytest.mark.parametrize("sent", ["abc-123", "0f" * 16, "9b2c7e1e-2a3f-4a8e-9d1b-7c6a5e4f3d2c", "a.b:c_d", "x" * 128])
def test_request_id_from_the_client_is_echoed(client, sent):
    assert client.get("/health", headers={"X-Request-ID": sent}).headers["X-Request-ID"] == sent


@pytest.mark.parametrize("sent", ["", "x" * 129, "has space", "semi;colon", 'quote"', "é", "new\tline"])
def test_insane_request_ids_are_replaced(client, sent):
    response = client.get("/health", headers={"X-Request-ID": sent})
    assert response.headers["X-Request-ID"] != sent
    assert SANE_ID.fullmatch(response.headers["X-Request-ID"])


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("post", "/generate", {}, 401),
        ("get", "/nope", {}, 404),
        ("get", "/generate", AUTH, 405),
        ("post", "/generate", {**AUTH, "content-type": "text/plain"}, 415),
        ("get", "/ready", {}, 503),
    ],
)
def test_every_answer_carries_a_request_id(client, method, path, headers, status):
    response = getattr(client, method)(path, headers=headers)
    assert response.status_code == status
    assert response.headers["X-Request-ID"]


def test_a_request_without_an_id_gets_a_new_one_in_its_answer_and_its_log_line(client, llmapi_log):
    first, second = (generate(client).headers["X-Request-ID"] for _ in range(2))
    assert re.fullmatch(HEX_ID, first) and re.fullmatch(HEX_ID, second) and first != second
    ended = [line for line in llmapi_log.getvalue().splitlines() if "generation ended" in line]
    assert [f"[{first}]" in ended[0], f"[{second}]" in ended[1]] == [True, True], ended


# Metrics


def test_metrics_count_requests_by_route_and_status(client):
    for _ in range(3):
        assert generate(client).status_code == 200
    assert generate(client, max_new_tokens=0).status_code == 422
    client.get("/nope")
    text = client.get("/metrics").get_data(as_text=True)
    assert sample(text, "llmapi_http_requests_total", route="/generate", status="200") == 3
    assert sample(text, "llmapi_http_requests_total", route="/generate", status="422") == 1
    assert sample(text, "llmapi_http_requests_total", route="unmatched", status="404") == 1
    assert sample(text, "llmapi_http_request_duration_seconds_count", route="/generate") == 4
    assert sample(text, "llmapi_generated_tokens_total") == 6
    assert sample(text, "llmapi_prompt_tokens_total") == 3
    assert sample(text, "llmapi_generations_total", finish_reason="length") == 3
    assert sample(text, "llmapi_model_load_duration_seconds_count") == 1
    assert sample(text, "llmapi_models_loaded") == 1
    assert sample(text, "llmapi_requests_in_flight") == 0


class TimedHandle(FakeHandle):
    """A fake generation that reports engine timings."""

    def result(self):
        timings = {"queue_s": 0.5, "first_token_s": 0.75, "total_s": 2.0, "batch_size": 3.0}
        return replace(super().result(), timings=timings)


class TimedEngine(FakeEngine):
    """A fake engine whose results carry timings."""

    def submit(self, request):
        return TimedHandle(request, [" tok"] * request.max_new_tokens)


def test_metrics_record_engine_timings(make_app):
    client = make_app(TimedEngine()).test_client()
    assert generate(client).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert sample(text, "llmapi_queue_wait_seconds_sum") == 0.5
    assert sample(text, "llmapi_time_to_first_token_seconds_sum") == 0.75
    assert sample(text, "llmapi_generation_duration_seconds_sum") == 2
    assert sample(text, "llmapi_batch_size_bucket", le="2.0") == 0
    assert sample(text, "llmapi_batch_size_bucket", le="4.0") == 1


class BackloggedEngine(FakeEngine):
    """A fake engine that reports a prefill backlog to the metrics (on_stats) at each submission."""

    on_stats = None

    def submit(self, request):
        handle = super().submit(request)
        if self.on_stats is not None:
            self.on_stats(EngineStats(waiting=2, prefilling=1, prefill_tokens=4096))
        return handle


def test_metrics_report_the_prefill_backlog(make_app):
    engine = BackloggedEngine()
    client = make_app(engine).test_client()
    assert generate(client).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert sample(text, "llmapi_engine_prefill_tokens_waiting") == 4096
    assert sample(text, "llmapi_engine_rows_waiting") == 2


def test_runner_puts_every_choice_of_a_request_in_one_group(make_app, fake_engine):
    client = make_app(served_model_name="fake-model").test_client()
    body = {"model": "fake-model", "prompt": ["one", "two", "three"], "max_tokens": 1}
    assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
    assert generate(client).status_code == 200
    groups = [request.group for request in fake_engine.requests]
    assert groups[0] == groups[1] == groups[2] is not None
    assert groups[3] not in (None, groups[0])


def test_metrics_count_load_failures(make_app):
    def factory(settings):
        raise OSError("nope")

    client = make_app(model_retry_seconds=0, factory=factory).test_client()
    for _ in range(2):
        assert generate(client).status_code == 503
    text = client.get("/metrics").get_data(as_text=True)
    assert sample(text, "llmapi_model_load_failures_total") == 2
    assert sample(text, "llmapi_models_loaded") == 0
    assert sample(text, "llmapi_requests_in_flight") == 0


def test_metrics_are_open_by_default_and_answer_prometheus_text(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")


def test_metrics_key_guards_metrics_only(make_app):
    client = make_app(metrics_key="scrape-key").test_client()
    error_of(client.get("/metrics").get_json(), 401)
    error_of(client.get("/metrics", headers=AUTH).get_json(), 401)  # an API key is not a metrics key
    assert client.get("/metrics", headers={"x-api-key": "scrape-key"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-key"}).status_code == 200
    assert generate(client).status_code == 200  # and the API keeps its own keys


# Admission


def test_overload_is_an_immediate_503_with_retry_after(make_app):
    app = make_app(threads=3, max_inflight=2)
    client = app.test_client()
    service = engine_service_of(app)
    with app.app_context():  # two requests whose generations nobody has read yet hold both places
        held = [start(service, [GenerationRequest(prompt="a", max_new_tokens=1)]).handles[0] for _ in range(2)]
    response = generate(client)
    error = error_of(response.get_json(), 503)
    assert "capacity" in error["message"]
    assert response.headers["Retry-After"] == "1"
    assert client.get("/health").status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert sample(text, "llmapi_requests_rejected_total", reason="overload") == 1
    assert sample(text, "llmapi_requests_in_flight") == 2
    held[0].result()
    assert generate(client).status_code == 200
    held[1].cancel()
    assert service.admission.count == 0


def test_the_generations_of_one_request_share_its_place(make_app):
    app = make_app(threads=3, max_inflight=2)
    service = engine_service_of(app)
    with app.app_context():
        held = start(service, [GenerationRequest(prompt="a", max_new_tokens=1)]).handles[0]  # one place taken elsewhere
    body = {"model": "sshleifer/tiny-gpt2", "prompt": ["one", "two"], "max_tokens": 2, "n": 3}
    response = app.test_client().post("/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200 and len(response.get_json()["choices"]) == 6
    assert service.admission.count == 1
    held.cancel()
    assert service.admission.count == 0


def test_a_stream_holds_its_place_until_its_last_event(client, app):
    service = engine_service_of(app)
    response = generate(client, stream=True)
    assert service.admission.count == 1
    events = response.get_data(as_text=True).split("\n\n")
    assert '"generated_text"' in events[-2]
    assert service.admission.count == 0


def test_a_stream_closed_early_is_cancelled_and_frees_its_place(client, app):
    service = engine_service_of(app)
    response = generate(client, stream=True)
    next(response.response)  # one event, then the client goes away
    response.close()
    assert service.admission.count == 0
    text = client.get("/metrics").get_data(as_text=True)
    assert sample(text, "llmapi_generations_total", finish_reason="cancelled") == 1


def test_a_stream_closed_before_its_first_event_is_cancelled_and_frees_its_place(client, app):
    response = generate(client, stream=True)
    assert engine_service_of(app).admission.count == 1
    response.close()  # the server closes a response it never iterated when the client is already gone
    assert engine_service_of(app).admission.count == 0
    text = client.get("/metrics").get_data(as_text=True)
    assert sample(text, "llmapi_generations_total", finish_reason="cancelled") == 1


def test_engine_errors_free_the_place(make_app):
    class Failing(FakeEngine):
        def submit(self, request):
            raise RuntimeError("boom")

    app = make_app(Failing(), threads=2, max_inflight=1)
    client = app.test_client()
    assert [generate(client).status_code for _ in range(3)] == [500] * 3
    assert engine_service_of(app).admission.count == 0


# Proxies


@pytest.mark.parametrize(("hops", "seen"), [(0, "127.0.0.1"), (1, "203.0.113.7"), (2, "198.51.100.2")])
def test_the_client_address_trusts_exactly_the_configured_proxies(make_app, hops, seen):
    app = make_app(trusted_proxy_hops=hops)
    addresses = []
    app.after_request(lambda response: addresses.append(request.remote_addr) or response)
    headers = {"X-Forwarded-For": "198.51.100.2, 203.0.113.7"}
    app.test_client().get("/health", headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert addresses == [seen]


# Logs


def test_log_lines_carry_the_request_id_and_no_prompt_by_default(app, client, llmapi_log):
    stream = llmapi_log
    generate(client, prompt="a secret prompt", max_new_tokens=1)
    client.post("/generate", json={"prompt": "x"}, headers={"X-Request-ID": "req-42", **AUTH})
    lines = stream.getvalue().splitlines()
    assert any("[req-42]" in line and "generation ended" in line for line in lines), lines
    assert not any("secret prompt" in line or KEY in line for line in lines)


def test_generation_lines_of_v1_streams_carry_the_request_id(app, client, llmapi_log):
    stream = llmapi_log
    body = {"model": "sshleifer/tiny-gpt2", "prompt": "hi", "max_tokens": 2, "n": 2, "stream": True}
    response = client.post("/v1/completions", json=body, headers={"X-Request-ID": "v1-stream-1", **AUTH})
    assert response.status_code == 200 and response.get_data(as_text=True).endswith("data: [DONE]\n\n")
    ended = [line for line in stream.getvalue().splitlines() if "generation ended" in line]
    assert len(ended) == 2 and all("[v1-stream-1]" in line for line in ended), ended
    assert engine_service_of(app).admission.count == 0


def test_json_log_format_writes_one_object_per_line(make_app, llmapi_log):
    client = make_app(log_format="json").test_client()
    stream = llmapi_log
    client.post("/generate", json={"prompt": "hello", "max_new_tokens": 1}, headers={"X-Request-ID": "rid-1", **AUTH})
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    ended = [e for e in entries if "generation ended" in e["message"]]
    assert len(ended) == 1
    assert ended[0]["request_id"] == "rid-1"
    assert set(ended[0]) >= {"time", "level", "logger", "pid", "message"}


def test_log_prompts_puts_the_prompt_in_the_generation_line():
    request = GenerationRequest(prompt="tell me", max_new_tokens=3)
    assert "tell me" not in describe("length", None, request, log_prompts=False)
    assert "prompt='tell me'" in describe("length", None, request, log_prompts=True)
