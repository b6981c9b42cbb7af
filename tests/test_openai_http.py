"""The /v1 OpenAI-compatible routes with a fake engine: shapes, parameter mapping, validation, streams, errors."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from llmapi.config import Settings
from llmapi.engine.chat import ChatTemplateError, default_template
from llmapi.engine.types import EngineError, GenerationRequest, GenerationResult, Piece
from llmapi.http.openai.formats import finish_reason
from tests.conftest import FAKE_CONTEXT, KEY, FakeEngine, FakeHandle
from tests.test_http import assert_error

BEARER = {"Authorization": f"Bearer {KEY}"}
SERVED = "tiny"
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]}


@pytest.fixture
def app(make_app, fake_engine: FakeEngine):
    """The app with a served model name, small limits and the fake engine."""
    return make_app(fake_engine, served_model_name=SERVED, max_new_tokens_limit=48, max_prompt_chars=200)


def events(response) -> list[Any]:
    """Parse a data-only SSE body into its JSON payloads, keeping the final [DONE] as a string."""
    raw = [block for block in response.get_data(as_text=True).split("\n\n") if block]
    assert all(block.startswith("data: ") for block in raw)
    return [block[6:] if block[6:] == "[DONE]" else json.loads(block[6:]) for block in raw]


def post(client, path: str, body: dict[str, Any]):
    """POST to /v1 with the key as a Bearer token."""
    return client.post(f"/v1{path}", json=body, headers=BEARER)


class FailingHandle(FakeHandle):
    """A generation that fails after its first piece."""

    def pieces(self):
        yield Piece(" tok")
        raise EngineError("generation failed: RuntimeError")


class RecordingEngine(FakeEngine):
    """A fake engine that keeps its handles, and can make them fail."""

    def __init__(self, handle_type: type[FakeHandle] = FakeHandle) -> None:
        super().__init__()
        self.handles: list[FakeHandle] = []
        self.handle_type = handle_type

    def submit(self, request: GenerationRequest) -> FakeHandle:
        super().submit(request)  # the context check and the record
        handle = self.handle_type(request, [" tok"] * request.max_new_tokens)
        self.handles.append(handle)
        return handle


# --- models ---


def test_openai_models_lists_the_served_model_without_loading(client, app):
    body = client.get("/v1/models", headers=BEARER).get_json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [(SERVED, "model", "llmapi")]
    assert isinstance(body["data"][0]["created"], int)
    assert not app.extensions["llmapi.engine"].loaded


def test_openai_served_name_defaults_to_model_name(make_app, fake_engine):
    app = make_app(fake_engine, model_name="org/some-model")
    client = app.test_client()
    assert client.get("/v1/models", headers=BEARER).get_json()["data"][0]["id"] == "org/some-model"
    assert post(client, "/completions", {"model": "org/some-model", "prompt": "hi"}).status_code == 200


def test_openai_unknown_model_is_404(client):
    for response in (
        post(client, "/completions", {"model": "other", "prompt": "hi"}),
        post(client, "/chat/completions", {**CHAT, "model": "gpt-4o"}),
    ):
        error = assert_error(response, 404, param="model")
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path"), [("get", "/v1/models"), ("post", "/v1/completions"), ("post", "/v1/chat/completions")]
)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_openai_routes_need_a_key(client, method, path, headers):
    response = getattr(client, method)(path, json={"prompt": "hi"}, headers=headers)
    assert assert_error(response, 401)["type"] == "authentication_error"


def test_openai_accepts_x_api_key_too(client):
    assert client.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200


def test_openai_model_load_failure_is_503_but_models_answers(make_app):
    def broken(settings: Settings) -> FakeEngine:
        raise OSError("no such model")

    client = make_app(factory=broken).test_client()
    assert client.get("/v1/models", headers=BEARER).status_code == 200
    response = post(client, "/completions", {"prompt": "hi"})
    assert_error(response, 503)
    assert "Retry-After" in response.headers


# --- completions ---


def test_openai_completion_answers_in_openai_form(client):
    response = post(client, "/completions", {"model": SERVED, "prompt": "Say this", "max_tokens": 3})
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == SERVED and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": " tok tok tok", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_openai_completion_ids_are_unique(client):
    ids = {post(client, "/completions", {"prompt": "hi", "max_tokens": 1}).get_json()["id"] for _ in range(3)}
    assert len(ids) == 3


def test_openai_prompt_list_and_n_are_prompt_major(client, fake_engine):
    body = post(client, "/completions", {"prompt": ["one", "two words"], "n": 2, "max_tokens": 1, "seed": 9}).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [(r.prompt, r.seed) for r in fake_engine.requests] == [
        ("one", 9),
        ("one", 10),
        ("two words", 9),
        ("two words", 10),
    ]
    # Each prompt is counted once; every choice's completion counts.
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_openai_seed_wraps_at_the_top_of_its_range(client, fake_engine):
    post(client, "/completions", {"prompt": "hi", "n": 2, "max_tokens": 1, "seed": 2**63 - 1})
    assert [r.seed for r in fake_engine.requests] == [2**63 - 1, 0]


def test_openai_echo_prepends_the_prompt(client):
    body = post(client, "/completions", {"prompt": "hi", "max_tokens": 2, "echo": True}).get_json()
    assert body["choices"][0]["text"] == "hi tok tok"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, {"greedy": False, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 40, "seed": None, "stop": ()}),
        ({"temperature": 0}, {"greedy": True}),
        ({"temperature": 0.5, "top_p": 0.9}, {"greedy": False, "temperature": 0.5, "top_p": 0.9}),
        ({"max_tokens": 7}, {"max_new_tokens": 7}),
        ({"stop": "x"}, {"stop": ("x",)}),
        ({"stop": ["x", "yz"]}, {"stop": ("x", "yz")}),
        ({"stop": []}, {"stop": ()}),
        ({"seed": 3}, {"seed": 3}),
        ({"max_tokens": None, "temperature": None, "stop": None, "n": None}, {"max_new_tokens": 40, "greedy": False}),
        ({"user": "someone"}, {"timeout_s": 60.0}),
    ],
)
def test_openai_completion_maps_parameters_to_the_engine(make_app, fake_engine, body, expected):
    app = make_app(fake_engine)
    assert post(app.test_client(), "/completions", {"prompt": "hi", **body}).status_code == 200
    request = fake_engine.requests[-1]
    for name, value in expected.items():
        assert getattr(request, name) == value


def test_openai_user_is_never_logged(client, caplog):
    with caplog.at_level(logging.DEBUG):
        assert post(client, "/completions", {"prompt": "hi", "max_tokens": 1, "user": "alice-7f3"}).status_code == 200
    assert "alice-7f3" not in caplog.text


@pytest.mark.parametrize(
    "extra",
    [
        {"presence_penalty": 0},
        {"frequency_penalty": 0.0},
        {"logit_bias": {}},
        {"logprobs": None},
        {"suffix": ""},
        {"best_of": 1},
        {"echo": False},
        {"stream": False},
        {"user": None},
        {"stream_options": {"include_usage": True}},
    ],
)
def test_openai_completion_accepts_neutral_values(client, extra):
    assert post(client, "/completions", {"prompt": "hi", "max_tokens": 1, "n": 2, **extra}).status_code == 200


# --- chat ---


def test_openai_chat_answers_in_openai_form(client, fake_engine):
    body = post(client, "/chat/completions", {**CHAT, "max_tokens": 2}).get_json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " tok tok"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert fake_engine.requests[-1].prompt == default_template(CHAT["messages"])
    assert body["usage"]["prompt_tokens"] == len(default_template(CHAT["messages"]).split())


def test_openai_chat_joins_text_parts(client, fake_engine):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    assert post(client, "/chat/completions", {"messages": [{"role": "user", "content": parts}]}).status_code == 200
    assert fake_engine.requests[-1].prompt == default_template([{"role": "user", "content": "Hello\nthere"}])


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        ({"max_completion_tokens": 5}, 5),
        ({"max_tokens": 4}, 4),
        ({"max_tokens": 9, "max_completion_tokens": 5}, 5),
        ({}, 40),
    ],
)
def test_openai_chat_max_completion_tokens_is_max_tokens(make_app, fake_engine, body, tokens):
    client = make_app(fake_engine).test_client()
    assert post(client, "/chat/completions", {**CHAT, **body}).status_code == 200
    assert fake_engine.requests[-1].max_new_tokens == tokens


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": []},
        {"tool_choice": "none"},
        {"logprobs": False},
        {"top_logprobs": 0},
        {"response_format": {"type": "text"}},
        {"parallel_tool_calls": True},
        {"store": False},
        {"metadata": {}},
        {"service_tier": "auto"},
        {"modalities": ["text"]},
        {"presence_penalty": 0},
        {"stream_options": None},
    ],
)
def test_openai_chat_accepts_neutral_values(client, extra):
    assert post(client, "/chat/completions", {**CHAT, "max_tokens": 1, **extra}).status_code == 200


class TemplateRefusingEngine(FakeEngine):
    """An engine whose chat template refuses every conversation."""

    def render_chat(self, messages: Any) -> str:
        raise ChatTemplateError("Conversation roles must alternate user/assistant/user/assistant/...")


def test_openai_chat_template_refusal_is_400(make_app):
    engine = TemplateRefusingEngine()
    client = make_app(engine).test_client()
    error = assert_error(post(client, "/chat/completions", CHAT), 400, param="messages")
    assert "alternate" in error["message"]


# --- validation ---

PROMPT = {"prompt": "hi"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completions", {}, "prompt"),
        ("/completions", {"prompt": ""}, "prompt"),
        ("/completions", {"prompt": None}, "prompt"),
        ("/completions", {"prompt": []}, "prompt"),
        ("/completions", {"prompt": [1, -2, 3]}, "prompt"),
        ("/completions", {"prompt": [[1, 2], []]}, "prompt"),
        ("/completions", {"prompt": [1, True]}, "prompt"),
        ("/completions", {"prompt": [[1]] * 9}, "prompt"),
        ("/completions", {"prompt": [1, "a"]}, "prompt"),
        ("/completions", {"prompt": ["ok", ""]}, "prompt"),
        ("/completions", {"prompt": "x" * 201}, "prompt"),
        ("/completions", {"prompt": ["a"] * 9}, "prompt"),
        ("/completions", {"prompt": ["a", "b", "c"], "n": 3}, "n"),
        ("/completions", {**PROMPT, "model": ""}, "model"),
        ("/completions", {**PROMPT, "model": 5}, "model"),
        ("/completions", {**PROMPT, "max_tokens": 0}, "max_tokens"),
        ("/completions", {**PROMPT, "max_tokens": 49}, "max_tokens"),
        ("/completions", {**PROMPT, "max_tokens": "5"}, "max_tokens"),
        ("/completions", {**PROMPT, "max_tokens": 5.0}, "max_tokens"),
        ("/completions", {**PROMPT, "max_tokens": True}, "max_tokens"),
        ("/completions", {**PROMPT, "temperature": -0.1}, "temperature"),
        ("/completions", {**PROMPT, "temperature": 2.1}, "temperature"),
        ("/completions", {**PROMPT, "temperature": "1"}, "temperature"),
        ("/completions", {**PROMPT, "top_p": 0}, "top_p"),
        ("/completions", {**PROMPT, "top_p": 1.1}, "top_p"),
        ("/completions", {**PROMPT, "n": 0}, "n"),
        ("/completions", {**PROMPT, "n": 9}, "n"),
        ("/completions", {**PROMPT, "n": 2.0}, "n"),
        ("/completions", {**PROMPT, "stop": ""}, "stop"),
        ("/completions", {**PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/completions", {**PROMPT, "stop": [1]}, "stop"),
        ("/completions", {**PROMPT, "seed": -1}, "seed"),
        ("/completions", {**PROMPT, "seed": 2**63}, "seed"),
        ("/completions", {**PROMPT, "stream": "true"}, "stream"),
        (
            "/completions",
            {**PROMPT, "stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        ("/completions", {**PROMPT, "stream": True, "stream_options": {"other": True}}, "stream_options.other"),
        (
            "/completions",
            {**PROMPT, "stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
        ("/completions", {**PROMPT, "user": 5}, "user"),
        ("/completions", {**PROMPT, "user": "u" * 257}, "user"),
        ("/completions", {**PROMPT, "echo": 1}, "echo"),
        ("/completions", {**PROMPT, "unknown": 1}, "unknown"),
        ("/completions", {**PROMPT, "messages": []}, "messages"),
        ("/chat/completions", {}, "messages"),
        ("/chat/completions", {"messages": []}, "messages"),
        ("/chat/completions", {"messages": "hi"}, "messages"),
        ("/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
        ("/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
        ("/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.tool_call_id"),
        ("/chat/completions", {"messages": [{"role": "critic", "content": "hi"}]}, "messages.0.role"),
        ("/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
        ("/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 201}]}, "messages.0.content"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 150}] * 2}, "messages"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "b" * 65}]}, "messages.0.name"),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
        ),
        ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content"),
        ("/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ("/chat/completions", {**CHAT, "max_completion_tokens": 49}, "max_completion_tokens"),
        ("/chat/completions", {**CHAT, "prompt": "hi"}, "prompt"),
    ],
)
def test_openai_validation_is_400_naming_the_parameter(client, path, body, param):
    error = assert_error(post(client, path, body), 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "param", "value"),
    [
        ("/completions", "suffix", " end"),
        ("/completions", "best_of", 2),
        ("/chat/completions", "tool_choice", "auto"),  # without tools
        ("/chat/completions", "functions", [{"name": "f"}]),
        ("/chat/completions", "function_call", "auto"),
        ("/chat/completions", "audio", {"voice": "alloy"}),
        ("/chat/completions", "modalities", ["text", "audio"]),
        ("/chat/completions", "reasoning_effort", "low"),
        ("/chat/completions", "store", True),
        ("/chat/completions", "parallel_tool_calls", 1),
        ("/chat/completions", "metadata", {"team": "a"}),
        ("/chat/completions", "service_tier", "flex"),
    ],
)
def test_openai_unsupported_parameters_are_400_naming_them(client, path, param, value):
    body = {**(CHAT if "chat" in path else PROMPT), param: value}
    error = assert_error(post(client, path, body), 400, param=param)
    assert param in error["message"]


@pytest.mark.parametrize(
    ("path", "param", "value"),
    [
        ("/completions", "logprobs", 6),
        ("/completions", "logprobs", True),
        ("/completions", "max_tokens", 0),  # 0 only with echo
        ("/completions", "presence_penalty", 2.5),
        ("/completions", "frequency_penalty", -2.01),
        ("/completions", "logit_bias", {"x": 1}),
        ("/completions", "logit_bias", {"1": 101}),
        ("/completions", "logit_bias", [1]),
        ("/completions", "min_p", 1.5),
        ("/completions", "top_k", -2),
        ("/completions", "min_tokens", 99),  # above max_tokens
        ("/chat/completions", "top_logprobs", 21),
        ("/chat/completions", "top_logprobs", 2),  # without logprobs: true
        ("/chat/completions", "logprobs", 1),
        ("/chat/completions", "response_format", {"type": "xml"}),
        ("/chat/completions", "response_format", {"type": "json_schema"}),
        ("/chat/completions", "response_format", {"type": "json_schema", "json_schema": {"name": "a", "schema": 3}}),
        # json_schema has its declared shape whatever the type (schemathesis found a nameless one let through)
        ("/completions", "response_format", {"type": "text", "json_schema": {"schema": {}}}),
        ("/completions", "response_format", {"type": "json_object", "json_schema": {"name": "a", "description": 5}}),
        ("/chat/completions", "repetition_penalty", 0),
    ],
)
def test_openai_new_parameters_out_of_range_are_400_naming_them(client, path, param, value):
    body = {**(CHAT if "chat" in path else PROMPT), "max_tokens": 4, param: value}
    assert_error(post(client, path, body), 400, param=param)


def test_openai_generate_keeps_its_422(client):
    assert_error(client.post("/generate", json={"prompt": ""}, headers=BEARER), 422, param="prompt")


@pytest.mark.parametrize("body", [[], "prompt", 12, None])
def test_openai_non_object_bodies_are_400(client, body):
    headers = {**BEARER, "content-type": "application/json"}
    assert_error(client.post("/v1/completions", data=json.dumps(body), headers=headers), 400)


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/completions", '{"prompt": "\\ud800 lone"}', "prompt"),
        ("/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt"),
        ("/completions", '{"prompt": "hi", "stop": "\\ud800"}', "stop"),
        ("/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ],
)
def test_openai_unpaired_surrogates_are_400(client, path, raw, param):
    headers = {**BEARER, "content-type": "application/json"}
    assert_error(client.post(f"/v1{path}", data=raw, headers=headers), 400, param=param)


def test_openai_malformed_json_is_400(client):
    response = client.post("/v1/completions", data="{bad", headers={**BEARER, "content-type": "application/json"})
    assert_error(response, 400)


def test_openai_non_json_is_415(client):
    assert_error(client.post("/v1/completions", data="prompt=hi", headers=BEARER), 415)


LONG = "a " * 40
LONG_CHAT = [{"role": "user", "content": LONG}]


@pytest.mark.parametrize(
    ("path", "body", "where", "prompt_tokens"),
    [
        ("/completions", {"prompt": LONG}, "prompt", 40),
        ("/chat/completions", {"messages": LONG_CHAT}, "messages", len(default_template(LONG_CHAT).split())),
    ],
)
def test_openai_context_overflow_is_400_with_openai_wording(client, path, body, where, prompt_tokens):
    error = assert_error(post(client, path, {**body, "max_tokens": 30}), 400, param=where)
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"This model's maximum context length is {FAKE_CONTEXT} tokens.")
    assert (
        f"you requested {prompt_tokens + 30} tokens ({prompt_tokens} in the {where}, 30 in the completion)"
        in (error["message"])
    )


def test_openai_overflow_of_a_later_prompt_cancels_the_earlier_ones(make_app):
    engine = RecordingEngine()
    client = make_app(engine).test_client()
    assert_error(post(client, "/completions", {"prompt": ["short", LONG], "max_tokens": 30}), 400, param="prompt")
    assert len(engine.handles) == 1 and engine.handles[0].cancelled


# --- finish reasons ---


@pytest.mark.parametrize(
    ("ours", "openai"), [("length", "length"), ("eos", "stop"), ("stop", "stop"), ("timeout", "timeout")]
)
def test_openai_finish_reasons(ours, openai):
    result = GenerationResult(text="", finish_reason=ours, prompt_tokens=1, completion_tokens=0, model="m")
    assert finish_reason(result) == openai


# --- streaming ---


def test_openai_completion_stream_chunks(client):
    response = post(client, "/completions", {"prompt": "hi", "max_tokens": 3, "stream": True})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Accel-Buffering"] == "no"
    *chunks, done = events(response)
    assert done == "[DONE]"
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert "".join(c["choices"][0]["text"] for c in chunks) == " tok tok tok"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert all("usage" not in c for c in chunks)


def test_openai_chat_stream_chunks_with_usage(client):
    body = {**CHAT, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    *chunks, usage, done = events(post(client, "/chat/completions", body))
    assert done == "[DONE]"
    assert {c["object"] for c in [*chunks, usage]} == {"chat.completion.chunk"}
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": " tok"},
        {"content": " tok"},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)
    prompt_tokens = len(default_template(CHAT["messages"]).split())
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 2, "total_tokens": prompt_tokens + 2}


def test_openai_stream_with_n_and_prompts_carries_every_choice(client):
    body = {"prompt": ["a", "b c"], "n": 2, "max_tokens": 2, "stream": True, "echo": True}
    body["stream_options"] = {"include_usage": True}
    *chunks, usage, done = events(post(client, "/completions", body))
    assert done == "[DONE]"
    texts: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "a tok tok", 1: "a tok tok", 2: "b c tok tok", 3: "b c tok tok"}
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}


@pytest.mark.parametrize("n", [1, 3])
def test_openai_stream_error_goes_in_band_then_done(make_app, n):
    engine = RecordingEngine(FailingHandle)
    client = make_app(engine).test_client()
    *chunks, error, done = events(post(client, "/completions", {"prompt": "hi", "n": n, "stream": True}))
    assert done == "[DONE]"
    assert error["error"]["code"] == 500 and error["error"]["type"] == "server_error"
    assert all("choices" in c for c in chunks)
    assert all(handle.cancelled for handle in engine.handles)


def test_openai_stream_hang_up_cancels_every_choice(make_app):
    engine = RecordingEngine()
    client = make_app(engine).test_client()
    body = {"messages": CHAT["messages"], "n": 2, "max_tokens": 40, "stream": True}
    response = client.post("/v1/chat/completions", json=body, headers=BEARER, buffered=False)
    next(iter(response.response))
    response.close()  # what the server does when the client goes away
    assert len(engine.handles) == 2 and all(handle.cancelled for handle in engine.handles)


def test_openai_new_parameters_reach_the_engine_request(client, fake_engine):
    body = {
        **PROMPT,
        "max_tokens": 4,
        "logprobs": 3,
        "echo": True,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "logit_bias": {"7": -100, "9": 2.5},
        "top_k": -1,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "min_tokens": 2,
        "response_format": {"type": "json_object"},
    }
    assert post(client, "/completions", body).status_code == 200
    request = fake_engine.requests[-1]
    assert (request.logprobs, request.prompt_logprobs) == (3, 3)
    assert (request.frequency_penalty, request.presence_penalty, request.logit_bias) == (
        0.5,
        -0.5,
        ((7, -100.0), (9, 2.5)),
    )
    assert (request.top_k, request.min_p, request.repetition_penalty, request.min_new_tokens) == (0, 0.1, 1.2, 2)
    assert request.grammar.kind == "json_object"


def test_openai_chat_logprobs_and_schema_reach_the_engine_request(client, fake_engine):
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    body = {**CHAT, "logprobs": True, "top_logprobs": 4, "response_format": response_format}
    answer = post(client, "/chat/completions", body).get_json()
    request = fake_engine.requests[-1]
    assert request.logprobs == 4 and request.prompt_logprobs is None
    assert json.loads(request.grammar.source) == schema and request.grammar.kind == "json_schema"
    assert answer["choices"][0]["logprobs"] == {"content": []}  # the fake engine scores nothing


def test_openai_echo_scores_with_max_tokens_0(client, fake_engine):
    assert post(client, "/completions", {**PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}).status_code == 200
    assert fake_engine.requests[-1].max_new_tokens == 0


def test_openai_token_id_prompts_reach_the_engine(client, fake_engine):
    assert post(client, "/completions", {"prompt": [[5, 6], [7]], "max_tokens": 1}).status_code == 200
    assert [r.prompt_ids for r in fake_engine.requests[-2:]] == [(5, 6), (7,)]
    assert post(client, "/completions", {"prompt": [3, 4], "max_tokens": 1}).status_code == 200
    assert fake_engine.requests[-1].prompt_ids == (3, 4) and fake_engine.requests[-1].prompt == ""
