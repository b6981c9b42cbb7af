"""The HTTP layer with a fake engine: statuses, the error shape, auth and validation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmapi.engine.types import EngineError, Grammar, Piece
from tests.conftest import KEY, OTHER_KEY, FakeEngine


def assert_error(response, status: int, *, param: str | None = None) -> dict[str, Any]:
    """Check the one error shape and return its inside."""
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_health_is_open_and_loads_nothing(client, app):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert not app.extensions["llmapi.engine"].loaded


def test_generate_answers_prompt_and_continuation(client, auth):
    response = client.post(
        "/generate", json={"prompt": "Artificial Intelligence is", "max_new_tokens": 3}, headers=auth
    )
    assert response.status_code == 200
    body = response.get_json()
    assert body["generated_text"] == "Artificial Intelligence is tok tok tok"
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert body["model"] == "fake-model"


def test_generate_uses_configured_default_max_new_tokens(client, auth, fake_engine):
    client.post("/generate", json={"prompt": "hi"}, headers=auth)
    assert fake_engine.requests[-1].max_new_tokens == 40


def test_generate_return_full_text_false_gives_continuation_only(client, auth):
    body = client.post(
        "/generate", json={"prompt": "hi", "max_new_tokens": 2, "return_full_text": False}, headers=auth
    ).get_json()
    assert body["generated_text"] == " tok tok"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": ""},
        {"x-api-key": "wrong"},
        {"x-api-key": KEY + "x"},
        {"x-api-key": KEY[:-1]},
        {"x-api-key": "k" * 4000},
        {"x-api-key": "clé-ünïcödé".encode().decode("latin-1")},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
    ],
    ids=["missing", "empty", "wrong", "longer", "shorter", "very-long", "non-ascii", "bearer-wrong", "basic"],
)
def test_auth_rejects_bad_keys(client, headers):
    response = client.post("/generate", json={"prompt": "hi"}, headers=headers)
    error = assert_error(response, 401)
    assert error["type"] == "authentication_error"
    assert "WWW-Authenticate" in response.headers
    assert KEY not in response.get_data(as_text=True)


@pytest.mark.parametrize("headers", [{"x-api-key": KEY}, {"x-api-key": OTHER_KEY}, {"Authorization": f"Bearer {KEY}"}])
def test_auth_accepts_every_configured_key(client, headers):
    assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 1}, headers=headers).status_code == 200


def test_auth_accepts_a_non_ascii_key_sent_as_utf8(make_app, fake_engine):
    app = make_app(fake_engine, api_key="clé-ü")
    header = "clé-ü".encode().decode("latin-1")  # what the server sees of UTF-8 bytes on the wire
    response = app.test_client().post(
        "/generate", json={"prompt": "hi", "max_new_tokens": 1}, headers={"x-api-key": header}
    )
    assert response.status_code == 200


def test_auth_runs_before_body_checks(client):
    assert_error(client.post("/generate", data="not json", headers={"content-type": "text/plain"}), 401)


def test_unknown_route_is_404_json(client):
    assert_error(client.get("/nope"), 404)


def test_wrong_method_is_405_json_with_allow(client, auth):
    response = client.get("/generate", headers=auth)
    assert_error(response, 405)
    assert "POST" in response.headers["Allow"]


def test_malformed_json_is_400(client, auth):
    response = client.post("/generate", data="{bad", headers={**auth, "content-type": "application/json"})
    assert_error(response, 400)


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_non_json_content_type_is_415(client, auth, content_type):
    headers = {**auth, **({"content-type": content_type} if content_type else {})}
    assert_error(client.post("/generate", data='{"prompt": "hi"}', headers=headers), 415)


def test_body_over_the_limit_is_413(client, auth, app):
    limit = app.config["MAX_CONTENT_LENGTH"]
    assert_error(
        client.post(
            "/generate", data=json.dumps({"prompt": "x" * limit}), headers={**auth, "content-type": "application/json"}
        ),
        413,
    )


VALID = {"prompt": "hello there"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 12}, "prompt"),
        ({"prompt": ["a"]}, "prompt"),
        ({"prompt": "x" * 201}, "prompt"),
        ({**VALID, "max_new_tokens": "12"}, "max_new_tokens"),
        ({**VALID, "max_new_tokens": 5.7}, "max_new_tokens"),
        ({**VALID, "max_new_tokens": 5.0}, "max_new_tokens"),
        ({**VALID, "max_new_tokens": True}, "max_new_tokens"),
        ({**VALID, "max_new_tokens": 0}, "max_new_tokens"),
        ({**VALID, "max_new_tokens": -1}, "max_new_tokens"),
        ({**VALID, "max_new_tokens": 49}, "max_new_tokens"),
        ({**VALID, "max_new_tokens": 10**30}, "max_new_tokens"),
        ({**VALID, "max_new_tokens": None}, "max_new_tokens"),
        ({**VALID, "unknown": 1}, "unknown"),
        ({**VALID, "temperature": -0.1}, "temperature"),
        ({**VALID, "temperature": "hot"}, "temperature"),
        ({**VALID, "temperature": True}, "temperature"),
        ({**VALID, "top_p": 0}, "top_p"),
        ({**VALID, "top_p": 1.5}, "top_p"),
        ({**VALID, "top_k": -1}, "top_k"),
        ({**VALID, "top_k": 1.5}, "top_k"),
        ({**VALID, "repetition_penalty": 0}, "repetition_penalty"),
        ({**VALID, "do_sample": "yes"}, "do_sample"),
        ({**VALID, "do_sample": 1}, "do_sample"),
        ({**VALID, "seed": -1}, "seed"),
        ({**VALID, "seed": 2**63}, "seed"),
        ({**VALID, "seed": "1"}, "seed"),
        ({**VALID, "stop": ""}, "stop"),
        ({**VALID, "stop": []}, "stop"),
        ({**VALID, "stop": ["a", ""]}, "stop"),
        ({**VALID, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**VALID, "stop": [1]}, "stop"),
        ({**VALID, "stop": "x" * 257}, "stop"),
        ({**VALID, "min_new_tokens": -1}, "min_new_tokens"),
        ({**VALID, "max_new_tokens": 5, "min_new_tokens": 6}, "min_new_tokens"),
        ({**VALID, "timeout_ms": 0}, "timeout_ms"),
        ({**VALID, "timeout_ms": 120_001}, "timeout_ms"),
        ({**VALID, "stream": "true"}, "stream"),
        ({**VALID, "return_full_text": None}, "return_full_text"),
    ],
)
def test_validation_rejects_bad_fields_with_422(client, auth, body, param):
    assert_error(client.post("/generate", json=body, headers=auth), 422, param=param)


@pytest.mark.parametrize("body", [[], "prompt", 12, None])
def test_validation_rejects_non_object_bodies(client, auth, body):
    assert_error(
        client.post("/generate", data=json.dumps(body), headers={**auth, "content-type": "application/json"}), 422
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_validation_rejects_special_floats(client, auth, value):
    raw = json.dumps({"prompt": "hi", "temperature": value})
    assert_error(
        client.post("/generate", data=raw, headers={**auth, "content-type": "application/json"}),
        422,
        param="temperature",
    )


def test_context_overflow_is_422_with_the_numbers(client, auth):
    error = assert_error(client.post("/generate", json={"prompt": "a " * 30, "max_new_tokens": 40}, headers=auth), 422)
    assert error["param"] == "max_new_tokens"
    for number in ("64", "30", "40", "70"):
        assert number in error["message"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompt": "hi"}, {"do_sample": False}),
        ({"prompt": "hi", "temperature": 0.7}, {"do_sample": True, "temperature": 0.7}),
        ({"prompt": "hi", "temperature": 0}, {"greedy": True}),
        ({"prompt": "hi", "top_k": 5, "do_sample": False}, {"do_sample": False}),
        ({"prompt": "hi", "stop": "x"}, {"stop": ("x",)}),
        ({"prompt": "hi", "stop": ["x", "yz"]}, {"stop": ("x", "yz")}),
        ({"prompt": "hi", "timeout_ms": 1500}, {"timeout_s": 1.5}),
        ({"prompt": "hi", "seed": 7}, {"seed": 7}),
        ({"prompt": "hi", "frequency_penalty": 1.5, "presence_penalty": -2}, {"frequency_penalty": 1.5}),
        ({"prompt": "hi", "logit_bias": {"3": -100}, "min_p": 0.2}, {"logit_bias": ((3, -100.0),), "min_p": 0.2}),
        ({"prompt": "hi", "details": True}, {"logprobs": 0, "prompt_logprobs": None}),
        ({"prompt": "hi", "details": True, "top_n_tokens": 2, "decoder_input_details": True}, {"prompt_logprobs": 2}),
        ({"prompt": "hi"}, {"logprobs": None, "grammar": None}),
        ({"prompt": "hi", "json_schema": {"type": "object"}}, {"grammar": Grammar("json_schema", '{"type":"object"}')}),
    ],
)
def test_generate_maps_controls_to_the_engine(client, auth, fake_engine, body, expected):
    assert client.post("/generate", json=body, headers=auth).status_code == 200
    request = fake_engine.requests[-1]
    for name, value in expected.items():
        assert getattr(request, name) == value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_n_tokens": 2}, "top_n_tokens"),  # needs details
        ({"details": True, "top_n_tokens": 6}, "top_n_tokens"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"json_schema": "object"}, "json_schema"),
        ({"grammar": "root ::= x"}, "grammar"),  # unknown: /generate takes json_schema
    ],
)
def test_generate_refuses_bad_new_fields_naming_them(client, auth, body, param):
    assert_error(client.post("/generate", json={"prompt": "hi", **body}, headers=auth), 422, param=param)


def test_generate_details_shape(client, auth):
    answer = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2, "details": True}, headers=auth)
    details = answer.get_json()["details"]
    assert details == {"finish_reason": "length", "generated_tokens": 2, "seed": None, "tokens": []}


def test_stream_sends_pieces_then_the_answer(client, auth):
    response = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 3, "stream": True}, headers=auth)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["X-Accel-Buffering"] == "no"
    events = [json.loads(line[len("data: ") :]) for line in response.get_data(as_text=True).split("\n\n") if line]
    assert [e["token"]["text"] for e in events[:-1]] == [" tok"] * 3
    assert events[-1]["generated_text"] == "hi tok tok tok"
    assert events[-1]["usage"]["completion_tokens"] == 3


class BrokenEngine(FakeEngine):
    """An engine whose every request fails inside generation."""

    def submit(self, request):
        raise RuntimeError("secret internal detail")


def test_unexpected_error_is_500_without_details_and_logged_with_its_traceback(make_app, llmapi_log):
    app = make_app(BrokenEngine())
    response = app.test_client().post("/generate", json={"prompt": "hi"}, headers={"x-api-key": KEY})
    error = assert_error(response, 500)
    assert "secret" not in error["message"]
    logged = llmapi_log.getvalue()
    assert "unhandled error" in logged and "RuntimeError: secret internal detail" in logged


def test_engine_error_is_500_generic(make_app):
    class Failing(BrokenEngine):
        def submit(self, request):
            raise EngineError("boom inside")

    app = make_app(Failing())
    error = assert_error(app.test_client().post("/generate", json={"prompt": "hi"}, headers={"x-api-key": KEY}), 500)
    assert "boom" not in error["message"]


def test_model_load_failure_is_503_and_retried_later(make_app, fake_engine):
    calls = []

    def factory(settings):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("no such model: nowhere/nothing")
        return fake_engine

    app = make_app(model_retry_seconds=0, factory=factory)
    client = app.test_client()
    response = client.post("/generate", json={"prompt": "hi"}, headers={"x-api-key": KEY})
    error = assert_error(response, 503)
    assert "could not be loaded" in error["message"]
    assert response.headers["Retry-After"] == "1"  # the retry window is 0: try again at once
    assert client.get("/health").status_code == 200
    assert client.post("/generate", json={"prompt": "hi"}, headers={"x-api-key": KEY}).status_code == 200
    assert len(calls) == 2


def test_model_load_failure_is_not_retried_within_the_retry_window(make_app):
    calls = []

    def factory(settings):
        calls.append(1)
        raise OSError("nope")

    app = make_app(model_retry_seconds=60, factory=factory)
    client = app.test_client()
    for _ in range(3):
        response = client.post("/generate", json={"prompt": "hi"}, headers={"x-api-key": KEY})
        assert_error(response, 503)
        assert 59 <= int(response.headers["Retry-After"]) <= 60  # when the next load will be tried
    assert len(calls) == 1


def test_concurrent_first_requests_load_once(make_app, fake_engine):
    import threading
    import time

    calls = []

    def slow_factory(settings):
        calls.append(1)
        time.sleep(0.3)
        return fake_engine

    app = make_app(factory=slow_factory)
    statuses = []

    def hit():
        statuses.append(
            app.test_client().post("/generate", json={"prompt": "hi"}, headers={"x-api-key": KEY}).status_code
        )

    threads = [threading.Thread(target=hit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 6
    assert len(calls) == 1


@pytest.mark.parametrize(
    "extra",
    [
        {"max_new_tokens": 1},
        {"max_new_tokens": 48, "min_new_tokens": 48},
        {"temperature": 0},
        {"temperature": 0.0},
        {"temperature": 2},
        {"top_p": 1},
        {"top_p": 0.01},
        {"top_k": 0},
        {"top_k": 50},
        {"repetition_penalty": 1.3},
        {"do_sample": True},
        {"do_sample": False, "temperature": 0.5},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"stop": "x"},
        {"stop": ["a", "b", "c", "d"]},
        {"stop": "é🎉"},
        {"return_full_text": False},
        {"timeout_ms": 1},
        {"timeout_ms": 120_000},
        {"stream": False},
    ],
)
def test_validation_accepts_good_values(client, auth, extra):
    response = client.post("/generate", json={"prompt": "hi", **extra}, headers=auth)
    assert response.status_code == 200, response.get_json()


def test_stream_reports_an_engine_failure_in_band(make_app, auth, fake_engine):
    class FailingHandle:
        def pieces(self):
            yield Piece(" ok")
            raise EngineError("torch broke")

        def cancel(self):
            self.cancelled = True

    class Engine(FakeEngine):
        def submit(self, request):
            return FailingHandle()

    app = make_app(Engine())
    response = app.test_client().post("/generate", json={"prompt": "hi", "stream": True}, headers=auth)
    assert response.status_code == 200
    events = [json.loads(chunk[len("data: ") :]) for chunk in response.get_data(as_text=True).split("\n\n") if chunk]
    assert events[0] == {"token": {"text": " ok"}}
    assert events[-1]["error"]["code"] == 500
    assert "torch" not in events[-1]["error"]["message"]
